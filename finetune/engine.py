"""NAE fine-tuning loop and the inference that produces the evaluator's inputs.

Training reads top to bottom in :func:`train_loop` (accelerate-examples style:
build, prepare, loop, backward, clip, step, log).  Inference follows NAE
(docs/protocol.md section 11): gallery features are the unit embeddings times the
detection score (CWS); a query's feature is the embedding RoI-pooled on its
ground-truth box (no CWS).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from hybridps.runlog import Progress, dumps
from hybridps.finetune.config import FinetuneTrainConfig
from hybridps.finetune.datasets import EpochSampler, ImageListDataset, PersonSearchDataset, collate, read_image
from hybridps.finetune.evaluate import Detections, SearchInputs, box_iou_matrix
from hybridps.pretrain.history import History, lines_up_to, record
from hybridps.pretrain.losses.oim import init_sync_group
from hybridps.pretrain.loop import flatten, reduce_means, to_device
from hybridps.pretrain.optim import linear_warmup, sgd, step_decay


logger = logging.getLogger(__name__)


class TrainError(RuntimeError):
    """A run that cannot continue (diverged loss, empty loader)."""


# --------------------------------------------------------------------------- optimisation
def build_optimizer(model: torch.nn.Module, t: FinetuneTrainConfig) -> torch.optim.Optimizer:
    """SGD over trainable parameters; biases without weight decay unless
    ``decay_bias`` (NAE4PS's default).  Norm layers' affine parameters are decayed here as in
    NAE4PS, so fine-tuning numbers stay comparable with the published ones."""
    return sgd(model, t.lr, t.momentum, t.weight_decay, decay_bias=t.decay_bias, decay_norm=True)


def lr_factor(step: int, iters_per_epoch: int, t: FinetuneTrainConfig) -> float:
    """Multiplier of the base lr before optimizer step ``step``: linear warm-up
    from ``warmup_factor`` over the first epoch (``iters - 1`` steps, as
    NAE4PS/SeqNet), then x gamma at each epoch milestone."""
    warm_iters = t.warmup_iters if t.warmup_iters is not None else max(0, iters_per_epoch - 1)
    epoch = step // max(1, iters_per_epoch)
    return linear_warmup(step, warm_iters, t.warmup_factor) * step_decay(epoch, t.milestones, t.gamma)


def weighted_total(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    unknown = set(weights) - set(losses)
    if unknown:
        raise TrainError(f"train.loss_weights names unknown losses {sorted(unknown)}; the model returns {sorted(losses)}")
    return sum(weights.get(k, 1.0) * v for k, v in losses.items())


@dataclass
class TrainOutcome:
    steps: int
    epochs_done: float
    seconds: float
    last_losses: dict[str, float]
    evals: list[dict] = field(default_factory=list)
    resumed_from: str | None = None


# Settings a resumed run may change: how long it runs and what it logs, not what it computes.
RESUME_FREE = ("train.epochs", "train.max_steps", "train.num_workers", "train.log_every", "train.save_every",
               "train.total_limit", "train.log_with", "train.eval_every", "train.progress")


def resume_config(cfg, dataset: str, init: str, init_scope: str, train_keys: list[str], world_size: int) -> dict:
    """The settings a resumed fine-tuning run must share with the saved one
    (dotted keys, compared by pretrain/state.py's ``compare_resume_config``)."""
    from hybridps.pretrain.config import to_dict

    flat = flatten({"model": to_dict(cfg.model), "train": to_dict(cfg.train)})
    keep = {k: v for k, v in flat.items() if k not in RESUME_FREE}
    keep.update(dataset=dataset, init=init, init_scope=init_scope, world_size=world_size,
                train_keys_sha256=hashlib.sha256("\n".join(sorted(train_keys)).encode()).hexdigest())
    return keep


class _Position:
    """Where the loop is in the data (checkpointed in state.json as ``loader``)."""

    def __init__(self, iters_per_epoch: int) -> None:
        self.iters_per_epoch, self.step = iters_per_epoch, 0

    def state_dict(self) -> dict:
        epoch, consumed = divmod(self.step, self.iters_per_epoch)
        return {"epoch": epoch, "consumed": consumed, "iters_per_epoch": self.iters_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("iters_per_epoch") != self.iters_per_epoch:
            raise TrainError(f"the checkpoint was written with {state.get('iters_per_epoch')} steps per epoch, "
                             f"this run has {self.iters_per_epoch} (another batch size, subset or process count)")


def _preserving_rng(fn):
    """Run ``fn`` and put every RNG back: an evaluation in the middle of
    training must not change what follows (a resumed run skips it)."""
    from hybridps.pretrain.state import rng_files, set_rng

    tensors, meta = rng_files()
    try:
        return fn()
    finally:
        set_rng(tensors, meta)


def train_loop(model: torch.nn.Module, dataset: PersonSearchDataset, t: FinetuneTrainConfig, accelerator,
               out: Path, resume: Path | None = None, resume_cfg: dict | None = None,
               evaluate: Callable[[torch.nn.Module, int], dict] | None = None,
               make_optimizer=build_optimizer) -> TrainOutcome:
    """Run the schedule of ``t`` on ``dataset``; ``model`` is trained in place.

    Checkpoints (``t.save_every`` and at the end) use pretrain/state.py: no
    pickle, crash-safe, and the model, optimizer, scheduler, RNG states and data
    position are restored by ``resume``, so a resumed run ends with the same
    weights as an uninterrupted one.  ``evaluate(model, step)`` runs every
    ``t.eval_every`` steps on rank 0 (RNG states preserved around it); its
    metrics go to ``evals.jsonl`` and the tracker, for monitoring only.
    ``make_optimizer(model, t)``: NAE's SGD unless a method brings its own (PSDiff: AdamW)."""
    from hybridps.pretrain.state import CheckpointError, load_checkpoint, next_checkpoint_number, save_checkpoint

    out = Path(out)
    sampler = EpochSampler(len(dataset), t.seed)
    # a generator of its own: a fresh loader iterator draws its worker seed from it, not from the
    # global RNG the model samples RoIs with (a resumed run creates one iterator more)
    loader = DataLoader(dataset, batch_size=t.batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=t.num_workers, generator=torch.Generator().manual_seed(t.seed), drop_last=False,
                        persistent_workers=t.num_workers > 0)
    optimizer = make_optimizer(model, t)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    init_sync_group()     # the OIM table sync's own process group: a collective, so at setup
    iters_per_epoch = len(loader)
    if iters_per_epoch == 0:
        raise TrainError("the training loader is empty")
    # stepped by hand once per optimizer step: accelerate would step a prepared
    # scheduler num_processes times per call
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, iters_per_epoch, t))
    total = t.epochs * iters_per_epoch if t.max_steps is None else min(t.max_steps, t.epochs * iters_per_epoch)
    position = _Position(iters_per_epoch)
    step = 0
    if resume is not None:
        try:
            step = load_checkpoint(accelerator, resume, model, optimizer, scheduler, position)
        except CheckpointError as e:
            raise TrainError(str(e)) from None
        logger.info("resumed from %s at step %d (epoch %d, batch %d of %d)", resume, step,
                    step // iters_per_epoch, step % iters_per_epoch, iters_per_epoch)
        if step > total:
            raise TrainError(f"--resume: the checkpoint is at step {step}, past this run's {total} steps")

    def save(at: int) -> Path:
        position.step = at
        return save_checkpoint(accelerator, out, next_checkpoint_number(out), model, optimizer, scheduler,
                               position, at, resume_cfg or {}, t.total_limit)

    main = accelerator.is_main_process
    history = History(out, step, main)
    evals = EvalLog(out, step, main)
    progress = Progress(total, "step", unit="step", initial=step, logger=logger, memory=True,
                        bar=None if (t.progress and accelerator.is_local_main_process) else False)
    started = time.monotonic() - history.elapsed_before
    params = [p for p in model.parameters() if p.requires_grad]
    window: dict[str, list[float]] = defaultdict(list)
    last: dict[str, float] = {}
    model.train()
    while step < total:
        epoch, done_in_epoch = divmod(step, iters_per_epoch)
        sampler.position(epoch, done_in_epoch * t.batch_size * accelerator.num_processes)
        for images, targets, _keys in loader:
            images, targets = to_device((images, targets), accelerator.device)
            with accelerator.autocast():
                losses = model(images, targets)
            loss = weighted_total(losses, t.loss_weights)
            if not torch.isfinite(loss):
                detail = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                raise TrainError(f"non-finite loss at step {step} ({detail}); lower train.lr or check the data")
            accelerator.backward(loss)
            if t.grad_clip > 0:
                accelerator.clip_grad_norm_(params, t.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            lr = optimizer.param_groups[0]["lr"]
            last = reduce_means(accelerator, {k: [float(v.detach())] for k, v in {"loss": loss, **losses}.items()})
            history.write(record(step, lr, last, time.monotonic() - started))
            for k, v in last.items():
                window[k].append(v)
            if t.log_with and (step % t.log_every == 0 or step == total):
                accelerator.log({"lr": lr, **{k: float(np.mean(v)) for k, v in window.items()}}, step=step)
                window.clear()
            progress.update(1, epoch=f"{step / iters_per_epoch:.2f}", loss=last["loss"], lr=lr)
            if t.save_every and step % t.save_every == 0 and step < total:
                save(step)
            if t.eval_every and step % t.eval_every == 0 and step < total:     # every rank: a barrier inside
                _periodic_eval(accelerator, model, evaluate, step, evals, t)
            if step >= total:
                break
    progress.close()
    save(step)
    history.close()
    outcome = TrainOutcome(step, step / iters_per_epoch, time.monotonic() - started, last, evals.rows,
                           None if resume is None else str(resume))
    return outcome


def _periodic_eval(accelerator, model, evaluate, step: int, evals: "EvalLog", t) -> None:
    """Rank 0 evaluates while the others wait at the barrier (every rank calls this)."""
    if accelerator.is_main_process and evaluate is not None:
        inner = accelerator.unwrap_model(model)
        try:
            metrics = _preserving_rng(lambda: evaluate(inner, step))
        finally:
            model.train()
        evals.write({"step": step, **metrics})
        if t.log_with:
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    accelerator.wait_for_everyone()


class EvalLog:
    """``evals.jsonl``: the metrics of each periodic evaluation (rank 0),
    trimmed to the resume step like history.jsonl."""

    NAME = "evals.jsonl"

    def __init__(self, out: Path, step: int, main: bool) -> None:
        self.rows: list[dict] = []
        self.main = main
        self.path = Path(out) / self.NAME
        if not main:
            return
        kept = lines_up_to(self.path, step, lambda ln: json.loads(ln)["step"]) if step else []
        self.rows = [json.loads(ln) for ln in kept]
        if kept or self.path.exists():          # no empty file for runs that never evaluate
            with open(self.path, "w") as f:
                f.write("".join(ln + "\n" for ln in kept))

    def write(self, row: dict) -> None:
        if not self.main:
            return
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(dumps(row) + "\n")


# --------------------------------------------------------------------------- inference
def _loader(items, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(ImageListDataset(items), batch_size=batch_size, shuffle=False, collate_fn=collate,
                      num_workers=num_workers)


@torch.no_grad()
def infer_gallery(model, protocol, device, batch_size: int = 2, cws: bool = True) -> dict[str, Detections]:
    """Detections of every gallery image: boxes, scores, features
    (unit embedding x score with CWS)."""
    model.eval()
    out: dict[str, Detections] = {}
    items = [(g.key, g.image) for g in protocol.gallery]
    with Progress(len(items), "gallery", unit="img", logger=logger) as meter:
        for images, keys in _loader(items, batch_size):
            for key, det in zip(keys, model([i.to(device) for i in images])):
                scores = det["scores"].float()
                emb = det["embeddings"].float()
                feats = emb * scores[:, None] if cws else emb
                out[key] = Detections(det["boxes"].float().cpu().numpy(), scores.cpu().numpy(), feats.cpu().numpy())
            meter.update(len(keys))
    return out


def _queries_by_image(protocol) -> dict[str, list]:
    by_image: dict[str, list] = defaultdict(list)
    for q in protocol.queries:
        by_image[q.image_key].append(q)
    return by_image


@torch.no_grad()
def infer_queries(model, protocol, device, batch_size: int = 2) -> np.ndarray:
    """(Q, D) unit embeddings of the ground-truth query boxes, protocol order."""
    model.eval()
    by_image = _queries_by_image(protocol)
    items = [(key, qs[0].image) for key, qs in by_image.items()]
    feats: dict[int, np.ndarray] = {}
    for images, keys in _loader(items, batch_size):
        boxes = [torch.as_tensor([q.box for q in by_image[k]], dtype=torch.float32, device=device) for k in keys]
        for key, emb in zip(keys, model.extract_query([i.to(device) for i in images], boxes)):
            for q, row in zip(by_image[key], emb.float().cpu().numpy()):
                feats[q.index] = row
    return np.stack([feats[q.index] for q in protocol.queries]).astype(np.float32)


@torch.no_grad()
def infer_query_context(model, protocol, query_feats: np.ndarray, device, suppress_iou: float) -> list[Detections]:
    """CBGM inputs: per query, the query image's persons with the GT query box
    as row 0 (score 1, its query feature) and the other detections after it by
    descending score, features without CWS.  Detections overlapping the query
    box by ``suppress_iou`` or more are the query person again and are dropped,
    as NMS with the forced GT box would (SeqNet)."""
    model.eval()
    out: list[Detections | None] = [None] * len(protocol.queries)
    for key, qs in _queries_by_image(protocol).items():
        det = model([read_image(qs[0].image).to(device)])[0]
        boxes, scores = det["boxes"].float().cpu().numpy(), det["scores"].float().cpu().numpy()
        emb = det["embeddings"].float().cpu().numpy()
        order = np.argsort(-scores, kind="stable")
        for q in qs:
            qbox = np.asarray([q.box], np.float32)
            keep = order[box_iou_matrix(qbox, boxes[order])[0] < suppress_iou] if len(order) else order
            out[q.index] = Detections(np.concatenate([qbox, boxes[keep]]),
                                      np.concatenate([[1.0], scores[keep]]).astype(np.float32),
                                      np.concatenate([query_feats[q.index][None], emb[keep]]).astype(np.float32))
    return out


def run_inference(model, protocol, device, batch_size: int = 2, cbgm: bool = False,
                  log: Callable[[str], None] = logger.info) -> SearchInputs:
    """Everything the evaluator needs from a model, for one protocol."""
    t0 = time.perf_counter()
    gallery = infer_gallery(model, protocol, device, batch_size)
    queries = infer_queries(model, protocol, device, batch_size)
    context = None
    if cbgm:
        context = infer_query_context(model, protocol, queries, device, float(model.cfg.nms_thresh))
    log(f"inference: {len(gallery)} gallery images, {len(protocol.queries)} queries in {time.perf_counter() - t0:.1f}s")
    return SearchInputs(gallery, queries, context)
