"""The pre-training loop (accelerate-examples style: build, prepare, loop, save).

Reads top to bottom in :func:`train`.  Design points that are easy to get
wrong with accelerate + webdataset (measured, see the README, "Pre-training"):

* the data loader is NOT passed to ``accelerator.prepare``: accelerate would
  either build every batch on rank 0 (dispatch) or shard an already sharded
  stream a second time.  :class:`pretrain.data.PretrainLoader` splits the
  epoch by rank and worker itself and gives every rank the same number of
  batches, so collectives never wait on a rank that ran out of data;
* the scheduler steps once per optimizer step whatever the world size
  (``step_scheduler_with_optimizer=False``: accelerate would otherwise step
  it ``num_processes`` times per call);
* progress follows hybridps/runlog.py (a bar on a terminal, periodic plain
  lines with step, loss, speed, ETA and memory otherwise; both in log.txt), and
  every step goes to ``history.jsonl`` (pretrain/history.py, shared with finetune);
* a checkpoint (pretrain/state.py, not ``save_state``: no pickle, and
  crash-safe with ``total_limit``) carries the model (with the OIM LUT/queue
  buffers), optimizer, scheduler, RNG states, the loader position and the
  step, so ``--resume`` continues with the same data order and loss trajectory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed

from hybridps.runlog import Progress, dumps
from hybridps.pretrain.augment import ViewParams
from hybridps.pretrain.config import PretrainConfig, dump_config
from hybridps.pretrain.data import PretrainLoader, ShardSource, open_source
from hybridps.pretrain.export import export_run
from hybridps.pretrain.guard import end_distributed, nonfinite_losses, nonfinite_parameters
from hybridps.pretrain.history import History, lines_up_to, record
from hybridps.pretrain.hybrid import HybridModel
from hybridps.pretrain.losses.oim import init_sync_group
from hybridps.pretrain.model.norm import convert_sync_batchnorm
from hybridps.pretrain.loop import hparams, reduce_means, to_device, tracker_problem
from hybridps.pretrain.optim import linear_warmup, sgd, step_decay
from hybridps.pretrain.state import (CheckpointError, check_resumable, complete_checkpoints, load_checkpoint,
                                     next_checkpoint_number, pick_resume, resume_config, save_checkpoint)

log = logging.getLogger(__name__)


class TrainError(RuntimeError):
    """A run that cannot start or continue (bad resume target, missing tracker...)."""


class TrainState:
    """Step counter (saved in the checkpoint's state.json)."""

    def __init__(self) -> None:
        self.step = 0


# --------------------------------------------------------------------------- builders
def task_domains(manifest: dict) -> tuple[list[int], list[int]]:
    """Domain indices of the detection-side (det, ps) and the re-ID datasets of a build."""
    det, reid = [], []
    for i, name in enumerate(manifest["domains"]):
        task = manifest["datasets"][name]["task"]
        (reid if task == "reid" else det).append(i)
    return det, reid


def resolve_for_data(cfg: PretrainConfig, source: ShardSource) -> PretrainConfig:
    """Fill what comes from the build: OIM LUT rows, domain count and, for
    ``hybrid.align_scope: task``, which datasets each IAM aligns."""
    model = dataclasses.replace(cfg.model, num_pids=source.num_ids)
    hybrid = dataclasses.replace(cfg.hybrid, num_domains=len(source.domains))
    if hybrid.align_scope not in ("task", "all"):
        raise TrainError(f"hybrid.align_scope must be 'task' or 'all', got {hybrid.align_scope!r}")
    if hybrid.align_scope == "task":
        det, reid = task_domains(source.manifest)
        hybrid = dataclasses.replace(
            hybrid,
            det_domains=hybrid.det_domains if hybrid.det_domains is not None else det,
            reid_domains=hybrid.reid_domains if hybrid.reid_domains is not None else reid,
        )
    check_alignment_domains(hybrid, len(source.domains))
    return dataclasses.replace(cfg, model=model, hybrid=hybrid)


def check_alignment_domains(hybrid, num_domains: int) -> None:
    """An IAM is a domain classifier: with fewer than two datasets it has
    nothing to tell apart (the model would fail deep inside with a traceback)."""
    if (hybrid.loss.adv_det or hybrid.loss.adv_reid) and num_domains < 2:
        raise TrainError(f"the build has {num_domains} dataset(s) but domain alignment (IAM) needs >= 2: "
                         "pass hybrid.loss.adv_det=false hybrid.loss.adv_reid=false")
    for name, on, domains in (("det", hybrid.loss.adv_det, hybrid.det_domains),
                              ("reid", hybrid.loss.adv_reid, hybrid.reid_domains)):
        if domains is not None and any(not 0 <= d < num_domains for d in domains):
            raise TrainError(f"hybrid.{name}_domains {domains} names domains outside 0..{num_domains - 1}")


def build_optimizer(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    """NAE-style SGD over the trainable parameters; biases and norm parameters undecayed."""
    return sgd(model, t.lr, t.momentum, t.weight_decay)


def lr_factor(step: int, t) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps: linear
    warm-up from ``warmup_factor``, then step decay, cosine or constant."""
    warm = linear_warmup(step, t.warmup_steps, t.warmup_factor)
    if t.schedule == "step":
        return warm * step_decay(step, t.milestones, t.gamma)
    if t.schedule == "cosine":
        progress = min(1.0, max(0.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)))
        return warm * 0.5 * (1 + math.cos(math.pi * progress))
    return warm


def build_scheduler(optimizer, t) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t))


def make_accelerator(cfg: PretrainConfig, out: Path) -> Accelerator:
    t = cfg.train
    return Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.grad_accum,
        log_with=t.log_with,
        project_config=ProjectConfiguration(project_dir=str(out), automatic_checkpoint_naming=True,
                                            total_limit=t.total_limit),
        step_scheduler_with_optimizer=False,
        # The hybrid model touches every parameter every step; the kwargs only
        # make the assumption explicit (a wrong one fails loudly in DDP).
        # broadcast_buffers=False: the OIM LUT/queue are already identical on
        # every rank (updated from all-gathered features), and re-broadcasting
        # them each step would move the whole table (1 GB at 10^6 ids).  BN
        # running statistics stay per rank, as with SyncBN off on any DDP run.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False)],
    )


def resolve_resume(out: Path, resume: str | None) -> Path | None:
    """``None`` -> fresh run; ``"latest"`` -> newest *complete* checkpoint of
    ``out`` (a half-written or damaged newer one is skipped with a warning); else a path."""
    if resume is None:
        if complete_checkpoints(out):
            raise TrainError(f"{out} already holds checkpoints: pass --resume to continue or choose another --out")
        return None
    try:
        return pick_resume(out, resume)
    except CheckpointError as e:
        raise TrainError(str(e)) from None


def save(accelerator, out: Path, model, optimizer, scheduler, loader, step: int, resume_cfg: dict, t) -> Path:
    bad = nonfinite_parameters(accelerator.unwrap_model(model))
    if bad:
        raise TrainError(f"step {step}: non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); "
                         "not saved or exported")
    return save_checkpoint(accelerator, out, next_checkpoint_number(out), model, optimizer, scheduler, loader,
                           step, resume_cfg, t.total_limit)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


# --------------------------------------------------------------------------- the loop
def train(cfg: PretrainConfig, resume: str | None = None) -> Path:
    """Run (or continue) a pre-training run; returns the run directory."""
    out = Path(cfg.train.output_dir)
    t = cfg.train
    start_from = resolve_resume(out, resume)
    accelerator = make_accelerator(cfg, out)
    set_seed(t.seed)

    source = open_source(cfg.data.shards, cfg.data.urls, cfg.data.manifest, cfg.data.splits)
    cfg = resolve_for_data(cfg, source)
    resume_cfg = resume_config(cfg, accelerator.num_processes, source.manifest_sha256)
    if start_from is not None:
        try:
            check_resumable(start_from, out, resume_cfg)
        except CheckpointError as e:
            raise TrainError(str(e)) from None
    try:
        model = HybridModel(cfg.model, cfg.hybrid)
    except ValueError as e:     # the model's own checks of the config (e.g. an unknown backbone name)
        raise TrainError(f"cannot build the model: {e}") from None
    if accelerator.num_processes > 1 and (t.sync_bn or cfg.model.norm_layer == "syncbn"):
        model = convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    init_sync_group()     # the OIM table sync's own process group: a collective, so at setup

    loader = PretrainLoader(source, cfg.data, ViewParams.from_config(cfg.data, cfg.model), t.seed,
                            accelerator.process_index, accelerator.num_processes)
    state = TrainState()

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    if t.log_with:
        # checked on every rank before any collective, so a missing package cannot strand the others
        problem = tracker_problem(t.log_with)
        if problem:
            raise TrainError(problem)
        accelerator.init_trackers("pretrain", config=hparams(cfg))
        if accelerator.is_main_process and not accelerator.trackers:
            raise TrainError(f"log_with={t.log_with!r} but no tracker started (is tensorboard installed?)")
    if start_from is not None:
        try:
            state.step = load_checkpoint(accelerator, start_from, model, optimizer, scheduler, loader)
        except CheckpointError as e:
            raise TrainError(str(e)) from None
        log.info("resumed from %s at step %d (epoch %d, batch %d)", start_from, state.step, loader.epoch,
                 loader.consumed)

    history = History(out, state.step, accelerator.is_main_process)
    keys_log = _open_keys_log(out, accelerator.process_index, state.step)
    # a bar on a terminal (train.progress: false turns it off), else plain lines (hybridps/runlog.py)
    progress = Progress(t.max_steps, "step", unit="step", initial=state.step, logger=log, memory=True,
                        bar=None if (t.progress and accelerator.is_local_main_process) else False)
    started = time.monotonic() - history.elapsed_before
    window: dict[str, list[float]] = {}
    model.train()
    batches = iter(loader)
    last = {}
    while state.step < t.max_steps:
        for _ in range(t.grad_accum):
            batch = next(batches)
            keys_log.write("".join(f"{state.step + 1}\t{k}\n" for k in batch["keys"]))
            with accelerator.accumulate(model):
                out_losses = model(to_device(batch, accelerator.device))
                accelerator.backward(out_losses["loss"])
                if accelerator.sync_gradients and t.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            for k, v in out_losses.items():
                window.setdefault(k, []).append(float(v.detach()))
        state.step += 1
        last = reduce_means(accelerator, window)
        diverged = nonfinite_losses(accelerator, window)
        window.clear()
        last["lr"] = scheduler.get_last_lr()[0]
        history.write(record(state.step, last["lr"], {k: v for k, v in last.items() if k != "lr"},
                             time.monotonic() - started))
        if diverged:
            kept = complete_checkpoints(out)
            raise TrainError(f"step {state.step}: non-finite loss ({', '.join(diverged)}); stopped without saving "
                             f"or exporting (lower train.lr?); last checkpoint: "
                             f"{kept[-1] if kept else 'none'}")
        if t.log_with and (state.step % t.log_every == 0 or state.step == t.max_steps):
            accelerator.log(last, step=state.step)
        progress.update(1, loss=last["loss"], lr=last["lr"])
        if t.save_every and state.step % t.save_every == 0 and state.step < t.max_steps:
            save(accelerator, out, model, optimizer, scheduler, loader, state.step, resume_cfg, t)
    progress.close()
    keys_log.close()

    save(accelerator, out, model, optimizer, scheduler, loader, state.step, resume_cfg, t)
    accelerator.wait_for_everyone()
    _write_rank_report(out, accelerator, model, state.step)
    history.close()
    if accelerator.is_main_process:
        export_run(accelerator.unwrap_model(model), cfg, source, out, steps=state.step, final_losses=last,
                   world_size=accelerator.num_processes, distributed_type=_enum_value(accelerator.distributed_type))
    del model, optimizer, scheduler, loader
    end_distributed(accelerator)
    return out


def _open_keys_log(out: Path, rank: int, step: int):
    """``ranks/keys_rank<r>.tsv``: step and sample key of every sample this
    rank trained on (audit trail for the no-duplicate / full-coverage checks)."""
    path = out / "ranks" / f"keys_rank{rank}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = lines_up_to(path, step, lambda ln: int(ln.split("\t")[0])) if step else []
    f = open(path, "w")
    f.write("".join(ln + "\n" for ln in kept))
    return f


def _write_rank_report(out: Path, accelerator: Accelerator, model, steps: int) -> None:
    """``ranks/rank<r>.json``: world size and hashes of the state every rank
    must agree on (parameters, OIM LUT and queue)."""
    inner = accelerator.unwrap_model(model)
    reid = inner.search_model.roi_heads.reid_loss
    params = torch.cat([p.detach().float().reshape(-1).cpu() for p in inner.parameters()])
    report = {
        "rank": accelerator.process_index, "world_size": accelerator.num_processes,
        "distributed_type": _enum_value(accelerator.distributed_type), "steps": steps,
        "lut_sha256": _sha(reid.lut), "cq_sha256": _sha(reid.cq), "params_sha256": _sha(params),
    }
    (out / "ranks" / f"rank{accelerator.process_index}.json").write_text(dumps(report, indent=1))


def _enum_value(value) -> str:
    """``DistributedType.NO`` -> ``"NO"``: a plain string in JSON files."""
    return str(getattr(value, "value", value))
