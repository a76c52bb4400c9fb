"""The pre-training loader: small webdataset-style stages over plain dicts.

Pipeline (each stage is a generator function you can test on its own)::

    epoch_plan -> equalize -> rank_batches -> worker_batches      (addresses only)
      -> read_samples -> decode_samples -> unify_reid -> make_views -> collate

Stages and the module each lives in (this package re-exports the public names)::

    config   DataConfig (the ``data:`` section of a run config), DataError
    source   the manifest and where each shard's bytes are (open_source, fetch_to_cache)
    reader   ShardReader: sample i of shard s by byte offset
    plan     dataset_weights, epoch_plan, equalize, group_by_aspect, rank_batches, worker_batches
    decode   decode_samples (CPU decoders), decode_on_device (nvjpeg)
    stages   read_samples, unify_reid, make_views, collate; batch_stages composes them
    loader   EpochDataset, PretrainLoader

Why an explicit *plan* instead of streaming shards through
``split_by_node``/``split_by_worker``: the paper mixes datasets of very
different sizes with per-dataset weights, and a distributed run must give
every rank exactly the same number of batches (uneven counts deadlock the
gradient all-reduce) while no sample is seen twice across ranks.  Shard-level
splitting cannot guarantee either.  So the epoch is planned over *sample
addresses* ``(shard, index in shard, repeat)`` known from the manifest; the
plan is a pure function of ``(seed, epoch)`` and every rank computes the same
one, takes its interleaved slice, and each dataloader worker takes every
``num_workers``-th batch of that slice.  Samples are then read by byte offset
from the (uncompressed) tar shards; remote or ``pipe:`` shards are first
fetched once into a local cache (checked against the manifest sha256).

Epoch semantics:

* per-dataset quota = ``weight * n_samples``: the integer part repeats every
  sample, the fractional part adds a seeded random subset (new each epoch);
  repeats get keys ``<key>@<r>`` so each plan entry is unique;
* the plan is shuffled with a generator seeded by ``(seed, epoch)``;
* ``remainder="drop"`` truncates the plan to a multiple of
  ``world * batch_size`` (the dropped tail is a different random set every
  epoch); ``"pad"`` repeats the head of the shuffled plan to fill the last
  global batch (the only duplicates in an epoch);
* augmentation randomness is seeded per plan position, so batches do not
  depend on the number of workers, and a resumed run (which skips the batches
  already consumed, without reading them) sees the same data.

The loader is never passed through ``accelerator.prepare``: accelerate would
dispatch or re-shard it (see the README, "Data pipeline").
"""
from __future__ import annotations

from hybridps.pretrain.data.config import DataConfig, DataError
from hybridps.pretrain.data.decode import (DECODERS, _decode_one, decode_jpeg_chw, decode_on_device,
                                           decode_samples)
from hybridps.pretrain.data.loader import EpochDataset, PretrainLoader, _identity
from hybridps.pretrain.data.plan import (PlanItem, aspect_groups, dataset_weights, epoch_plan, equalize,
                                         group_by_aspect, plan_keys, rank_batches, worker_batches)
from hybridps.pretrain.data.reader import ShardReader
from hybridps.pretrain.data.source import ShardInfo, ShardSource, fetch_to_cache, open_source
from hybridps.pretrain.data.stages import (batch_stages, collate, device_batch, make_views, read_samples, unify_reid,
                                           view_stages)

__all__ = [
    "DataConfig", "DataError",
    "ShardInfo", "ShardSource", "open_source", "fetch_to_cache",
    "ShardReader",
    "PlanItem", "dataset_weights", "epoch_plan", "equalize", "aspect_groups", "group_by_aspect",
    "rank_batches", "worker_batches", "plan_keys",
    "DECODERS", "decode_jpeg_chw", "decode_samples", "decode_on_device",
    "read_samples", "unify_reid", "make_views", "collate", "view_stages", "batch_stages", "device_batch",
    "EpochDataset", "PretrainLoader",
    # private helpers that tests and benchmarks/loader.py reach through the package
    "_decode_one", "_identity",
]
