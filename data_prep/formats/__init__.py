"""One module per dataset release format.

Every format module defines:

* ``NAME`` (str), ``TASK`` ("det" | "reid" | "ps"), ``LABELED`` (bool: the
  dataset carries real identity labels), ``SPLITS`` (all splits it knows),
  ``DEFAULT_SPLITS`` (the splits used for pre-training shards), and
  ``LICENSE_NOTICE`` (one line, printed by the CLI).
* ``parse(root, split, **options) -> Iterator[Record | Skip | Fix]`` yielding
  records in a deterministic (sorted) order.  Annotations only: pixels stay
  behind ``Record.image`` (an :class:`~data_prep.record.ImageRef`).

Person-search formats (``TASK == "ps"``) also define
``load_protocol(root, gallery_size=None) -> data_prep.protocol.Protocol``.

Adding a dataset means adding one file here and one writer in
``data_prep/synth/``; nothing else needs editing.
"""
from __future__ import annotations

import importlib
from types import ModuleType

FORMATS = (
    "crowdhuman",
    "ecp",
    "msmt17",
    "cuhk03",
    "luperson",
    "market1501",
    "cuhk_sysu",
    "prw",
    "posetrack21",
    "coco",          # your own data: COCO-format person detection
    "crops",         # your own data: a folder of re-ID crops
)


def get_format(name: str) -> ModuleType:
    if name not in FORMATS:
        raise KeyError(f"unknown dataset format {name!r}; known: {', '.join(FORMATS)}")
    return importlib.import_module(f"{__name__}.{name}")
