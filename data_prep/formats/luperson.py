"""LUPerson (Fu et al. 2021) and LUPerson-NL person crops, unlabeled re-ID.

The authors host no images; copies circulate in several shapes, and
``parse(root, "train")`` detects which one ``root`` is, in this order:

1. **LMDB** -- ``root/keys.pkl`` with the LMDB in ``root/lmdb/`` (the
   ``lmdbs/``, ``lmdb_300_30/`` and ``lupnl_lmdb/`` folders of the reference
   repos) or in ``root`` itself.  ``keys.pkl`` is a plain list of keys
   (LUPerson ``convert_lmdb.py``), a dict with ``'keys'`` (lup_moco,
   fast-reid), or a dict with ``'keys'`` and ``'pids'`` (LUPerson-NL).  Values
   are encoded image bytes.
2. **image folder** -- ``root/images/`` (``LUP/images/<name>.jpg``, the
   TransReID-SSL / HAP layout; other folders beside it are not read).
3. ``root`` has no ``images/`` but exactly one sub-folder holding a
   ``keys.pkl`` (e.g. ``LUP/`` with only ``lmdbs/``) -> that LMDB.
4. otherwise ``root`` itself, searched recursively for ``*.jpg``/``*.jpeg``/
   ``*.png`` (``extract.py``'s ``<country>/<city>[/<video>]/`` trees).

The layout the synthetic writer produces (``data_prep/synth/luperson.py``)::

    luperson/                  <- point here: the common LUP/ copy (case 2)
      images/00_00_0000_00000000.jpg ...
      CFS_list.pkl             basenames in CFS-score order (restricts + orders)
      lmdbs/{lmdb/,keys.pkl}        keys.pkl = list                 (case 1)
      lmdb_300_30/{lmdb/,keys.pkl}  keys.pkl = {'keys'}             (case 1)
      lupnl_lmdb/{lmdb/,keys.pkl}   keys.pkl = {'keys','pids'}      (case 1, NL)
      extracted/<country>/<city>/<frame>_<obj>.jpg                  (case 4)

A name list (``name_list``; by default ``root/CFS_list.pkl`` when present)
restricts the images to the listed names and yields them in list order;
``keep_num`` keeps its first N, as the CFS recipe does.  Without a name list
records come sorted by key.

One record per crop, box = the whole crop.  The crop names carry no identity,
so ids are -1 (unlabeled); with ``use_nl_pids=True`` the noisy tracker pids of
a LUPerson-NL ``keys.pkl`` become the ids (``labeled=True``).
"""
from __future__ import annotations

import io
import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from PIL import Image

from hybridps.bounded import BoundError, check_tree, node_budget

from ..imageio import ImageError, load_encoded
from ..record import ImageRef, ParseItem, Record, Skip, safe_key

NAME = "luperson"
ORDER = 50          # position in listings (hybridps.registry)
TASK = "reid"
LABELED = False
SPLITS = ("train",)
DEFAULT_SPLITS = ("train",)
LICENSE_NOTICE = (
    "LUPerson / LUPerson-NL: research use only, commercial use forbidden (LUPerson README); "
    "crops of third-party YouTube videos - identifiable people, treat as personal data and "
    "do not publish the shards (the repos' Apache-2.0 covers code, not images)."
)

KEYS_FILE = "keys.pkl"
LMDB_SUBDIR = "lmdb"
IMAGES_SUBDIR = "images"
NAME_LIST_FILE = "CFS_list.pkl"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# --------------------------------------------------------------------------- pickles
class _DataUnpickler(pickle.Unpickler):
    """Unpickles plain containers (and numpy arrays of ids) only: a keys.pkl
    from a third-party mirror must not be able to run code."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        return super().find_class(module, name)


def load_pickle(path: Path):
    """Load a data-only pickle; a clear ValueError for anything else.

    The result is walked (bounded, without recursion) before anyone else touches
    it: a self-referencing or "billion laughs" list would otherwise hang
    ``str()`` in the key reader."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = _DataUnpickler(f).load()
        check_tree(data, f"luperson: {path}", max_nodes=node_budget(size))
        return data
    except BoundError as e:
        raise ValueError(str(e)) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, RecursionError) as e:
        raise ValueError(f"luperson: cannot read {path}: {type(e).__name__}: {e}") from None


def _as_str(value) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii")
    if not isinstance(value, str):
        # a nested list would otherwise become its repr, a "key" no LMDB has
        raise ValueError(f"expected a string, got a {type(value).__name__}")
    return str(value)


def read_keys_pickle(path: Path) -> tuple[list[str], list[int] | None]:
    """``(keys, pids or None)`` from a ``keys.pkl`` that is a list or a dict."""
    data = load_pickle(path)
    pids = None
    if isinstance(data, dict):
        if "keys" not in data:
            raise ValueError(f"luperson: {path} is a dict without 'keys' (has {sorted(map(str, data))})")
        keys, pids = data["keys"], data.get("pids")
    elif isinstance(data, (list, tuple)):
        keys = data
    else:
        raise ValueError(f"luperson: {path} holds a {type(data).__name__}; expected a list or a dict with 'keys'")
    try:
        keys = [_as_str(k) for k in keys]
    except UnicodeDecodeError as e:
        raise ValueError(f"luperson: {path} holds a non-ASCII key: {e}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"luperson: {path}: a key is not a string ({e})") from None
    if pids is not None:
        try:
            pids = [int(p) for p in pids]
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"luperson: {path}: a pid is not an integer ({e})") from None
        if len(pids) != len(keys):
            raise ValueError(f"luperson: {path} has {len(keys)} keys but {len(pids)} pids")
    return keys, pids


def read_name_list(path: Path) -> list[str]:
    """A CFS-style pickled list of image names (basenames or stems)."""
    data = load_pickle(path)
    if not isinstance(data, (list, tuple)):
        raise ValueError(f"luperson: name list {path} holds a {type(data).__name__}, expected a list of names")
    try:
        return [_as_str(n) for n in data]
    except (TypeError, ValueError) as e:    # UnicodeDecodeError is a ValueError
        raise ValueError(f"luperson: name list {path}: a name is not an ASCII string ({e})") from None


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """Where the crops of a LUPerson copy are: an LMDB or an image folder."""

    kind: str                 # "lmdb" | "images"
    root: Path                # the folder the user gave (name lists are looked up here)
    data: Path                # LMDB directory, or the image folder
    keys_file: Path | None = None


def _lmdb_layout(root: Path, folder: Path) -> Layout:
    for data in (folder / LMDB_SUBDIR, folder):
        if (data / "data.mdb").is_file():
            return Layout("lmdb", root, data, folder / KEYS_FILE)
    raise FileNotFoundError(
        f"luperson: {folder / KEYS_FILE} exists but there is no LMDB next to it "
        f"(expected {folder / LMDB_SUBDIR / 'data.mdb'} or {folder / 'data.mdb'})"
    )


def _has_images(folder: Path) -> bool:
    for _, _, files in os.walk(folder):
        if any(os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES for f in files):
            return True
    return False


def detect_layout(root) -> Layout:
    """Which LUPerson variant ``root`` is (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"luperson: {root} is not a directory")
    if (root / KEYS_FILE).is_file():
        return _lmdb_layout(root, root)
    if (root / IMAGES_SUBDIR).is_dir():
        return Layout("images", root, root / IMAGES_SUBDIR)
    with_keys = sorted(p for p in root.iterdir() if p.is_dir() and (p / KEYS_FILE).is_file())
    if len(with_keys) == 1:
        return _lmdb_layout(root, with_keys[0])
    if len(with_keys) > 1:
        names = ", ".join(p.name for p in with_keys)
        raise ValueError(f"luperson: {root} holds several LMDB copies ({names}); point at one of them")
    if _has_images(root):
        return Layout("images", root, root)
    raise FileNotFoundError(
        f"luperson: nothing recognisable in {root}: expected keys.pkl + lmdb/ (LMDB copy), "
        "an images/ folder, or *.jpg/*.png crops in <country>/<city>[/<video>]/ folders"
    )


# --------------------------------------------------------------------------- entries
@dataclass(frozen=True)
class _Entry:
    key: str                  # record key
    names: tuple[str, ...]    # what a name list may call it
    image: ImageRef
    source: str
    pid: int | None = None


def _image_entries(layout: Layout) -> list[_Entry]:
    entries = []
    for dirpath, dirnames, filenames in os.walk(layout.data):
        dirnames.sort()
        for name in sorted(filenames):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(layout.data)
            # nested trees repeat frame_obj names across cities: the key keeps the folders
            key = safe_key("_".join(rel.with_suffix("").parts))
            entries.append(_Entry(key, (name, stem, rel.as_posix()), ImageRef("file", str(path)),
                                  str(path.relative_to(layout.root))))
    return entries


def _lmdb_entries(layout: Layout, keys: list[str], pids: list[int] | None) -> list[_Entry]:
    # one canonical path per LMDB: lmdb refuses a second handle to the same file
    lmdb_path = str(layout.data.resolve())
    prefix = layout.data.relative_to(layout.root).as_posix() or "."
    return [_Entry(safe_key(k), (k,), ImageRef("lmdb", lmdb_path, k), f"{prefix}:{k}",
                   None if pids is None else pids[i]) for i, k in enumerate(keys)]


def _sorted_lmdb_entries(layout: Layout, keys: list[str], pids: list[int] | None,
                         split: str) -> tuple[Iterator[_Entry], list[Skip]]:
    """The LMDB's entries in key order, duplicates skipped (first wins), made
    one at a time: a 4M-crop copy holds its key list and an index, not 4M
    entry objects (which cost ~2 KB each)."""
    safe = []
    for k in keys:
        sk = safe_key(k)
        safe.append(k if sk == k else sk)          # share the string when the key is already safe
    order = sorted(range(len(safe)), key=safe.__getitem__)   # stable: the first of equal keys stays first
    lmdb_path = str(layout.data.resolve())
    prefix = layout.data.relative_to(layout.root).as_posix() or "."
    dups = {order[j] for j in range(1, len(order)) if safe[order[j]] == safe[order[j - 1]]}
    skips = [Skip(NAME, split, "duplicate_key", f"{prefix}:{keys[i]}", f"key {safe[i]!r} already used")
             for i in order if i in dups] if dups else []

    def entries() -> Iterator[_Entry]:
        for i in order:
            if i not in dups:
                yield _Entry(safe[i], (keys[i],), ImageRef("lmdb", lmdb_path, keys[i]), f"{prefix}:{keys[i]}",
                             None if pids is None else pids[i])

    return entries(), skips


def _resolve_name_list(layout: Layout, name_list) -> Path | None:
    if name_list is None:
        return None
    if name_list == "auto":
        path = layout.root / NAME_LIST_FILE
        return path if path.is_file() else None
    path = Path(name_list)
    if not path.is_file():
        raise FileNotFoundError(f"luperson: name list {path} not found")
    return path


def _lookup_names(entries: list[_Entry]) -> dict[str, _Entry]:
    lookup: dict[str, _Entry] = {}
    for e in entries:
        for n in e.names:
            lookup.setdefault(n, e)
            lookup.setdefault(os.path.splitext(n)[0], e)
    return lookup


def _select(entries, names: list[str], split: str, list_name: str) -> tuple[list[_Entry], list[Skip]]:
    """Entries in name-list order; names with no image become Skips."""
    lookup = _lookup_names(entries)
    chosen, skips = [], []
    for i, n in enumerate(names):
        e = lookup.get(n, lookup.get(os.path.splitext(n)[0]))
        if e is None:
            skips.append(Skip(NAME, split, "missing_file", f"{list_name}#{i}", f"listed name {n!r} not found"))
        else:
            chosen.append(e)
    return chosen, skips


def _dedupe(entries: Iterable[_Entry], split: str) -> tuple[list[_Entry], list[Skip]]:
    seen: set[str] = set()
    kept, skips = [], []
    for e in entries:
        if e.key in seen:
            skips.append(Skip(NAME, split, "duplicate_key", e.source, f"key {e.key!r} already used"))
        else:
            seen.add(e.key)
            kept.append(e)
    return kept, skips


def _entries(root, split, name_list, keep_num, keys, use_nl_pids) -> tuple[Layout, list[_Entry], list[Skip]]:
    if split not in SPLITS:
        raise ValueError(f"luperson: unknown split {split!r}; known: {', '.join(SPLITS)}")
    layout = detect_layout(root)
    if layout.kind == "lmdb":
        all_keys, pids = read_keys_pickle(layout.keys_file)
        if use_nl_pids and pids is None:
            raise ValueError(f"luperson: use_nl_pids=True but {layout.keys_file} has no 'pids' (not LUPerson-NL)")
        if _resolve_name_list(layout, name_list) is None and keep_num is None:
            entries, skips = _sorted_lmdb_entries(layout, all_keys, pids, split)
            if keys is not None:
                entries, key_skips = _restrict(entries, keys, split)
                skips += key_skips
            return layout, entries, skips
        entries = _lmdb_entries(layout, all_keys, pids)
    else:
        if use_nl_pids:
            raise ValueError("luperson: use_nl_pids=True needs a LUPerson-NL LMDB copy (keys.pkl with 'pids')")
        entries = _image_entries(layout)
    skips: list[Skip] = []
    list_path = _resolve_name_list(layout, name_list)
    if list_path is not None:
        names = read_name_list(list_path)
        if keep_num is not None:
            names = names[: int(keep_num)]
        entries, skips = _select(entries, names, split, list_path.name)
    elif keep_num is not None:
        raise ValueError("luperson: keep_num needs a name list (CFS_list.pkl or name_list=...)")
    else:
        entries = sorted(entries, key=lambda e: e.key)
    entries, dup_skips = _dedupe(entries, split)
    skips += dup_skips
    if keys is not None:
        entries, key_skips = _restrict(entries, keys, split)
        skips += key_skips
    return layout, entries, skips


def _restrict(entries: list[_Entry], keys: Iterable[str], split: str) -> tuple[list[_Entry], list[Skip]]:
    wanted = set(keys)
    kept = [e for e in entries if e.key in wanted]
    missing = sorted(wanted - {e.key for e in kept})
    return kept, [Skip(NAME, split, "missing_file", k, "requested key not in this copy") for k in missing]


# --------------------------------------------------------------------------- public API
def sample_keys(keys: Iterable[str], n: int, seed: int = 0) -> list[str]:
    """The deterministic "LUPerson-N" subset: ``random.Random(seed).sample``
    of the *sorted* keys (so it does not depend on listing order).  Returns
    the sample in sampled order; all keys, sorted, when ``n >= len(keys)``."""
    if n < 0:
        raise ValueError(f"sample_keys: n must be >= 0, got {n}")
    ordered = sorted(keys)
    if n >= len(ordered):
        return ordered
    return random.Random(seed).sample(ordered, n)


def list_keys(root, split: str = "train", name_list="auto", keep_num: int | None = None) -> list[str]:
    """The record keys ``parse`` would consider, in its order, without
    reading any image (cheap enough for millions of crops)."""
    _, entries, _ = _entries(root, split, name_list, keep_num, None, False)
    return [e.key for e in entries]


def _image_size(data: bytes | str) -> tuple[int, int]:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        return int(im.width), int(im.height)


def _read_size(entry: _Entry) -> tuple[int, int] | Skip:
    """Header size of one crop, or the Skip that explains why not."""
    if entry.image.kind == "lmdb":
        if not entry.image.key.isascii():
            return Skip(NAME, "", "malformed_annotation", entry.source, "non-ASCII LMDB key")
        # the builder's reader: shares its cached LMDB handle (lmdb allows one per process)
        try:
            payload, fmt = load_encoded(entry.image)
        except ImageError as e:
            return Skip(NAME, "", e.reason, entry.source, e.detail)
        except Exception as e:  # lmdb.Error: not an LMDB, wrong version, ...
            raise ValueError(f"luperson: cannot read LMDB {entry.image.path}: {e}") from None
        data: bytes | str = payload
    else:
        if not os.path.isfile(entry.image.path):
            return Skip(NAME, "", "missing_file", entry.source, "file vanished")
        data = entry.image.path  # PIL reads only the header from a path
    try:
        return _image_size(data)
    except Image.DecompressionBombError as e:
        return Skip(NAME, "", "too_large_image", entry.source, str(e))
    except Exception as e:  # PIL raises several types for garbage
        return Skip(NAME, "", "corrupt_image", entry.source, str(e))


def parse(
    root,
    split: str = "train",
    name_list="auto",
    keep_num: int | None = None,
    keys: Sequence[str] | None = None,
    use_nl_pids: bool = False,
) -> Iterator[ParseItem]:
    """Yield one whole-crop :class:`Record` per image.

    ``name_list``: ``"auto"`` (``root/CFS_list.pkl`` if present), ``None``
    (ignore any list) or a path.  ``keep_num``: first N of the name list.
    ``keys``: only these record keys (e.g. from :func:`sample_keys`).
    ``use_nl_pids``: LUPerson-NL tracker pids as (noisy) identity labels."""
    layout, entries, skips = _entries(root, split, name_list, keep_num, keys, use_nl_pids)
    yield from skips
    for entry in entries:
        size = _read_size(entry)
        if isinstance(size, Skip):
            yield Skip(NAME, split, size.reason, size.source, size.detail)
        elif use_nl_pids and entry.pid is not None and entry.pid < 0:
            yield Skip(NAME, split, "junk_id", entry.source, f"negative pid {entry.pid}")
        else:
            yield _record(entry, split, size, use_nl_pids)


def _record(entry: _Entry, split: str, size: tuple[int, int], use_nl_pids: bool) -> Record:
    width, height = size
    labeled = use_nl_pids and entry.pid is not None
    return Record(
        dataset=NAME, split=split, key=entry.key, image=entry.image, task=TASK, labeled=labeled,
        boxes=[[0.0, 0.0, float(width), float(height)]], ids=[entry.pid if labeled else -1],
        width=width, height=height, source=entry.source,
    )
