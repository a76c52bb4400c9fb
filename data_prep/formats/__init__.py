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

Adding a dataset means adding one file here (found by :class:`hybridps.registry.Registry`)
and one writer in ``data_prep/synth/``; nothing else needs editing.
"""
from __future__ import annotations

from types import ModuleType

from hybridps.registry import Registry

#: every module of this package that defines NAME, TASK and parse (ORDER: listing position)
FORMATS: Registry[ModuleType] = Registry("dataset format", package=__name__, requires=("TASK", "parse"))


def get_format(name: str) -> ModuleType:
    return FORMATS.get(name)
