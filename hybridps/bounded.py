"""A non-recursive, bounded check of unpickled (or JSON-decoded) plain data.

A pickle of a few hundred bytes can rebuild a list that holds itself, or a
list of two references to a list of two references ... 50 levels deep
("billion laughs"): unpickling is instant because the memo shares objects, but
anything that then walks the result (``str()``, ``json.dumps``, a recursive
type check) visits 2**50 nodes or recurses until RecursionError.  Every
loader that hands unpickled data to the rest of the code walks it here first,
with an explicit stack, so such a file is refused in time proportional to its
size, with a message that says why.
"""
from __future__ import annotations

from collections.abc import Mapping
from itertools import chain
from typing import Any

MAX_DEPTH = 64
# A pickle needs at least one opcode byte per element it adds to a container,
# so legitimate data never expands to more than a few nodes per file byte.
NODES_PER_BYTE = 4
MIN_NODES = 100_000


class BoundError(ValueError):
    """The data nests too deep, refers to itself, or expands far beyond its file size."""


def node_budget(nbytes: int) -> int:
    return max(MIN_NODES, NODES_PER_BYTE * int(nbytes))


def check_tree(obj: Any, where: str, *, max_nodes: int = MIN_NODES, max_depth: int = MAX_DEPTH) -> None:
    """Raise BoundError unless ``obj`` is a finite tree of at most ``max_nodes`` nodes."""
    nodes = 0
    on_path: list[int] = []          # ids of the containers from the root to the current one
    on_path_set: set[int] = set()
    stack = [iter((obj,))]
    while stack:
        try:
            item = next(stack[-1])
        except StopIteration:
            stack.pop()
            if on_path:
                on_path_set.discard(on_path.pop())
            continue
        nodes += 1
        if nodes > max_nodes:
            raise BoundError(f"{where}: expands to more than {max_nodes} elements (shared references "
                             "repeated level after level: a 'billion laughs' file); refusing it")
        if isinstance(item, Mapping):
            children = chain(item.keys(), item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = iter(item)
        else:
            continue
        if id(item) in on_path_set:
            raise BoundError(f"{where}: a container that contains itself; refusing it")
        if len(on_path) >= max_depth:
            raise BoundError(f"{where}: nested more than {max_depth} levels deep; refusing it")
        on_path.append(id(item))
        on_path_set.add(id(item))
        stack.append(children)
