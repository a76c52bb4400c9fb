"""The loader: one rank's epochs of batches through a torch DataLoader.

:class:`EpochDataset` plans one epoch and runs the stages for the batches of one
dataloader worker; :class:`PretrainLoader` iterates epochs endlessly and keeps the
``state_dict`` (epoch, batches consumed) that a resumed run continues from.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hybridps.pretrain.augment import ViewParams
from hybridps.pretrain.data.config import DataConfig, DataError
from hybridps.pretrain.data.decode import DECODERS
from hybridps.pretrain.data.plan import (_rng, aspect_groups, dataset_weights, epoch_plan, equalize, group_by_aspect,
                                         rank_batches, worker_batches)
from hybridps.pretrain.data.reader import ShardReader
from hybridps.pretrain.data.source import ShardSource
from hybridps.pretrain.data.stages import batch_stages, collate, device_batch


class EpochDataset(IterableDataset):
    """One rank's batches of one epoch, from batch ``start`` on; split across
    dataloader workers batch by batch."""

    def __init__(self, source: ShardSource, cfg: DataConfig, params: ViewParams, weights: dict[str, float],
                 seed: int, epoch: int, rank: int, world: int, start: int = 0, reader: ShardReader | None = None):
        self.source, self.cfg, self.params, self.weights = source, cfg, params, weights
        self.seed, self.epoch, self.rank, self.world, self.start = seed, epoch, rank, world, start
        self.reader = reader or ShardReader(source.shards, cfg.cache_dir, cfg.verify_shards)
        plan = equalize(epoch_plan(source, weights, seed, epoch), world, cfg.batch_size, cfg.remainder)
        if cfg.group_by_aspect:
            plan = group_by_aspect(plan, aspect_groups(source, cfg.canvas_size), world * cfg.batch_size)
        self.plan = plan
        self.batches = rank_batches(len(plan), rank, world, cfg.batch_size)

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)

    def _items(self, b: int):
        for pos in self.batches[b]:
            yield pos, self.plan[pos], int(_rng(self.seed, self.epoch, pos).integers(1 << 62))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for b in worker_batches(len(self.batches), self.start, worker, workers):
            samples = list(batch_stages(self._items(b), self.reader, self.cfg, self.params))
            yield {"encoded": samples} if self.cfg.decode == "cuda" else collate(samples)


class PretrainLoader:
    """Endless iterator over epochs of batches for one rank, with a
    ``state_dict`` (epoch, batches consumed) that accelerate checkpoints."""

    def __init__(self, source: ShardSource, cfg: DataConfig, params: ViewParams, seed: int,
                 rank: int = 0, world: int = 1, device: str | torch.device | None = None):
        self.source, self.cfg, self.params = source, cfg, params
        self.seed, self.rank, self.world = seed, rank, world
        if cfg.decode not in DECODERS:
            raise DataError(f"data.decode must be one of {DECODERS}, got {cfg.decode!r}")
        if cfg.decode == "cuda" and not torch.cuda.is_available():
            raise DataError("data.decode=cuda needs a CUDA device (none is visible); use data.decode=tensor")
        self.device = device or ("cuda" if cfg.decode == "cuda" else "cpu")   # where decode=cuda batches land
        self.weights = dataset_weights(source, cfg.weights)
        self.reader = ShardReader(source.shards, cfg.cache_dir, cfg.verify_shards)
        self.epoch = 0
        self.consumed = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world", self.world) != self.world or state.get("seed", self.seed) != self.seed:
            raise DataError(
                f"checkpoint loader state was made with world={state.get('world')} seed={state.get('seed')}; "
                f"this run has world={self.world} seed={self.seed}: the data order would not continue"
            )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    def epoch_dataset(self, epoch: int, start: int = 0) -> EpochDataset:
        return EpochDataset(self.source, self.cfg, self.params, self.weights, self.seed, epoch, self.rank,
                            self.world, start, self.reader)

    def batches_per_epoch(self) -> int:
        return len(self.epoch_dataset(self.epoch))

    def index_shards(self) -> None:
        """Index (and fetch, if remote) every shard in use once, here: worker
        processes get the index with the pickled dataset instead of each
        re-reading every tar header every epoch."""
        for s, info in enumerate(self.source.shards):
            if self.weights.get(info.dataset, 0) > 0:
                self.reader.index(s)

    def __iter__(self) -> Iterator[dict]:
        if self.cfg.num_workers > 0 or self.cfg.verify_shards:
            self.index_shards()
        while True:
            ds = self.epoch_dataset(self.epoch, self.consumed)
            if len(ds) > 0:
                # An explicit generator: DataLoader otherwise draws its worker seed from
                # torch's global RNG, which would shift the model's RNG stream on resume.
                gen = torch.Generator().manual_seed(int(_rng(self.seed, self.epoch, 0xD1).integers(1 << 62)))
                dl = DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                                collate_fn=_identity, persistent_workers=False, generator=gen)
                for batch in dl:
                    if "encoded" in batch:
                        batch = device_batch(batch["encoded"], self.cfg, self.params, self.device)
                    self.consumed += 1
                    yield batch
            self.epoch += 1
            self.consumed = 0


def _identity(batch):
    return batch
