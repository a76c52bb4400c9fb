"""MSMT17 (Wei et al. CVPR 2018), labelled re-ID crops, release layout.

Accepted layouts; ``root`` may be any of::

    msmt17/MSMT17_V1/{train,test}/<pid>/<name>.jpg + list_{train,val,query,gallery}.txt
    msmt17/MSMT17_V2/{mask_train_v2,mask_test_v2}/...  (V2: same lists, blurred faces)
    MSMT17_V1/ or MSMT17_V2/ itself, or any folder holding the split folders and lists

``MSMT17_V1`` is looked up before ``MSMT17_V2`` (torchreid's order).

List lines are ``<pid_dir>/<file> <label>``; CRLF line ends and blank lines
are tolerated, any other shape is ``Skip("malformed_annotation")``, a line
naming an absent file ``Skip("missing_file")``.  ``train`` and ``val`` read
images from the train folder and share one label space; ``query`` and
``gallery`` read the test folder and their labels restart at 0, so they
overlap the train labels numerically -- the builder keeps splits apart.
``Record.ids`` = the list label; ``camera`` = ``name.split('_')[2]`` (1..15).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


from ..imageio import ImageError, header_size
from ..textio import utf8_lines
from ..record import ImageRef, ParseItem, Record, Skip, safe_key

NAME = "msmt17"
ORDER = 30          # position in listings (hybridps.registry)
TASK = "reid"
LABELED = True
SPLITS = ("train", "val", "query", "gallery")
# Standard training uses list_train only (torchreid: adding val is "combineall").
DEFAULT_SPLITS = ("train",)
# train/val share one label space; query/gallery are other people whose labels restart at 0.
ID_SPACES = {"train": "train", "val": "train", "query": "test", "gallery": "test"}
LICENSE_NOTICE = (
    "MSMT17: non-commercial research only, obtained from PKU after signing a release "
    "agreement, no redistribution (exact wording not retrieved); images show "
    "identifiable people - treat as personal data and do not publish the shards."
)

VERSION_DIRS = ("MSMT17_V1", "MSMT17_V2")
# (train folder, test folder) per release version
IMAGE_DIRS = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}
LIST_FILES = {
    "train": "list_train.txt", "val": "list_val.txt",
    "query": "list_query.txt", "gallery": "list_gallery.txt",
}
FROM_TEST_DIR = ("query", "gallery")


@dataclass(frozen=True)
class Release:
    """A located MSMT17 copy: the folder with the lists and its version."""

    folder: Path
    version: str

    def image_dir(self, split: str) -> Path:
        train_dir, test_dir = IMAGE_DIRS[self.version]
        return self.folder / (test_dir if split in FROM_TEST_DIR else train_dir)


def _version_of(folder: Path) -> str | None:
    for version, dirs in IMAGE_DIRS.items():
        if all((folder / d).is_dir() for d in dirs):
            return version
    return None


def find_release(root: Path) -> Release:
    """Locate the release under ``root`` (see the module docstring)."""
    for folder in [root / d for d in VERSION_DIRS] + [root]:
        version = _version_of(folder)
        if version is not None:
            return Release(folder, version)
    raise FileNotFoundError(
        f"msmt17: no MSMT17 release under {root}: expected MSMT17_V1/ (train/, test/, "
        "list_*.txt) or MSMT17_V2/ (mask_train_v2/, mask_test_v2/, list_*.txt), or those "
        "folders directly under it"
    )


def parse_list_line(line: str) -> tuple[str, int] | None:
    """``(relative path, label)``, or None for a malformed line."""
    parts = line.split()
    if len(parts) != 2:
        return None
    rel, label = parts
    try:
        value = int(label)
    except ValueError:
        return None
    pieces = rel.split("/")
    if value < 0 or len(pieces) != 2 or ".." in pieces or not pieces[1]:
        return None
    return rel, value


def camera_of(filename: str) -> int | None:
    """Camera 1..15 from ``0000_000_01_0303morning_0015_0.jpg``."""
    fields = filename.split("_")
    if len(fields) < 3 or not fields[2].isdigit():
        return None
    return int(fields[2])


def _read_list(path: Path) -> Iterator[tuple[int, str | None, str]]:
    # bytes, one line decoded at a time: CRLF files parse like LF ones, and a bad byte costs one line
    return utf8_lines(path)


def _entry_item(release: Release, root: Path, split: str, source: str, line: str) -> ParseItem:
    """A Record for one list line, or the Skip that explains why not."""
    parsed = parse_list_line(line)
    if parsed is None:
        return Skip(NAME, split, "malformed_annotation", source, f"expected '<dir>/<file> <label>': {line!r}")
    rel, label = parsed
    filename = rel.split("/")[1]
    camera = camera_of(filename)
    if camera is None:
        return Skip(NAME, split, "malformed_annotation", source, f"no camera field in {filename!r}")
    path = release.image_dir(split) / rel
    rel_root = str(path.relative_to(root))
    if not path.is_file():
        return Skip(NAME, split, "missing_file", source, rel_root)
    try:
        width, height = header_size(path)
    except ImageError as e:
        return Skip(NAME, split, e.reason, rel_root, str(e))
    return Record(
        dataset=NAME, split=split, key=safe_key(Path(filename).stem), image=ImageRef("file", str(path)),
        task=TASK, labeled=LABELED, boxes=[[0.0, 0.0, float(width), float(height)]], ids=[label],
        width=width, height=height, camera=camera, source=rel_root,
        extra={"version": release.version},
    )


def parse(root, split: str) -> Iterator[ParseItem]:
    """Yield one :class:`Record` per usable line of ``list_<split>.txt``, sorted by key."""
    if split not in LIST_FILES:
        raise ValueError(f"msmt17: unknown split {split!r}; known: {', '.join(SPLITS)}")
    root = Path(root)
    release = find_release(root)
    list_path = release.folder / LIST_FILES[split]
    if not list_path.is_file():
        raise FileNotFoundError(f"msmt17: split {split!r} needs {list_path}")
    records: dict[str, Record] = {}
    for lineno, line, why in _read_list(list_path):
        source = f"{LIST_FILES[split]}:{lineno}"
        if line is None:
            yield Skip(NAME, split, "malformed_annotation", source, why)
            continue
        item = _entry_item(release, root, split, source, line)
        if isinstance(item, Record) and item.key in records:
            item = Skip(NAME, split, "duplicate_key", source, f"{item.key!r} listed twice")
        if isinstance(item, Record):
            records[item.key] = item
        else:
            yield item
    for key in sorted(records):
        yield records[key]
