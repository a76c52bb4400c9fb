"""hybridps: hybrid pre-training for person search.

One namespace for the four parts of the project:

* :mod:`hybridps.data_prep`   -- dataset releases -> webdataset shards  (``hybridps data``)
* :mod:`hybridps.pretrain`    -- pre-training of the whole search model  (``hybridps pretrain``)
* :mod:`hybridps.checkpoints` -- weights: registry, download, conversion (``hybridps ckpt``)
* :mod:`hybridps.finetune`    -- fine-tuning and evaluation             (``hybridps finetune``)

In the source tree the four parts are top-level folders (``data_prep/``, ...); an installed
wheel holds them inside this package.  In a source checkout (running from the repository,
or an editable install) the sub-packages are found next to this folder.
"""
from __future__ import annotations

from pathlib import Path as _Path

__version__ = "0.1.0"
PARTS = ("data_prep", "pretrain", "checkpoints", "finetune")

_here = _Path(__file__).resolve().parent
if not (_here / "pretrain").is_dir() and all((_here.parent / p / "__init__.py").is_file() for p in PARTS):
    __path__.append(str(_here.parent))      # source checkout: hybridps.pretrain = <repo>/pretrain
