"""The one registry idiom of the project: name -> thing, filled where the thing is defined.

Every extensible part (dataset formats, key layouts, backbones, export targets, ...) keeps
one :class:`Registry`.  Adding an entry is adding one file:

* module-shaped entries (a dataset format, a key layout) are discovered: every module of the
  package that has the attributes the registry asks for is registered under its ``NAME``,
  ordered by its ``ORDER`` (default 100), then by module name;
* object-shaped entries (a backbone builder, an export target) register themselves with
  ``@REGISTRY.register("name")`` or ``REGISTRY.add("name", obj)`` in the module that defines them.

``Registry.get`` names the known entries when a name is unknown.  The module imports only
the standard library, so every part of the project (also the leaf packages ``data_prep``
and ``checkpoints``) may use it.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name the registry does not hold (a KeyError and a ValueError, for either caller style)."""

    def __str__(self) -> str:          # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class Registry(Mapping[str, T], Generic[T]):
    """An ordered, read-only mapping ``name -> entry`` with registration helpers.

    ``package`` + ``requires``: entries are the package's modules that define every attribute in
    ``requires`` (``NAME`` is always required), found the first time the registry is read.
    """

    def __init__(self, kind: str, *, package: str | None = None, requires: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._package = package
        self._requires = ("NAME", *requires)
        self._entries: dict[str, tuple[float, int, T]] = {}
        self._discovered = package is None

    # ------------------------------------------------------------------ filling
    def add(self, name: str, entry: T, *, order: float = 100.0) -> T:
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries and self._entries[name][2] is not entry:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = (float(order), len(self._entries), entry)
        return entry

    def register(self, name: str, *, order: float = 100.0) -> Callable[[T], T]:
        """Decorator: ``@BACKBONES.register("resnet50")``."""
        def wrap(entry: T) -> T:
            return self.add(name, entry, order=order)
        return wrap

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        pkg = importlib.import_module(self._package)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if info.name.startswith("_") or info.ispkg:
                continue
            module: ModuleType = importlib.import_module(f"{self._package}.{info.name}")
            if all(hasattr(module, attr) for attr in self._requires):
                self.add(module.NAME, module, order=getattr(module, "ORDER", 100.0))

    # ------------------------------------------------------------------ reading
    def _ordered(self) -> list[str]:
        self._discover()
        return [n for n, _ in sorted(self._entries.items(), key=lambda kv: kv[1][:2])]

    def get(self, name: str) -> T:            # type: ignore[override]
        self._discover()
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {', '.join(self._ordered())}")
        return self._entries[name][2]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ordered())

    def __len__(self) -> int:
        self._discover()
        return len(self._entries)

    def __contains__(self, name: Any) -> bool:
        self._discover()
        return name in self._entries

    def names(self) -> tuple[str, ...]:
        return tuple(self._ordered())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._ordered())})"
