"""``data_prep build``: dataset releases -> webdataset shards + manifest.

Stages: :mod:`.plan` (parsers, ``--limit`` subsets, global ids; no pixels;
records streamed through an on-disk :mod:`.spill`, never all in memory),
:mod:`.encode` (per-record image check/encode, in worker processes),
:mod:`.shards` (atomic reproducible tar shards, progress journal) and
:mod:`.pipeline` (the driver, resume, manifest).  Nothing here knows about
any particular dataset.
"""
from .options import BuildError, BuildOptions, CanvasOptions
from .pipeline import run_build

__all__ = ["BuildError", "BuildOptions", "CanvasOptions", "run_build"]
