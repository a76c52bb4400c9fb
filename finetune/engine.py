"""NAE fine-tuning loop and the inference that produces the evaluator's inputs.

Training reads top to bottom in :func:`train_loop` (accelerate-examples style:
build, prepare, loop, backward, clip, step, log).  Inference follows NAE
(ps_datasets_eval.md 5.5): gallery features are the unit embeddings times the
detection score (CWS); a query's feature is the embedding RoI-pooled on its
ground-truth box (no CWS).
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from finetune.config import FinetuneTrainConfig
from finetune.datasets import ImageListDataset, PersonSearchDataset, collate, read_image
from finetune.evaluate import Detections, SearchInputs, box_iou_matrix
from pretrain.losses.oim import init_sync_group
from pretrain.optim import param_groups


class TrainError(RuntimeError):
    """A run that cannot continue (diverged loss, empty loader)."""


# --------------------------------------------------------------------------- optimisation
def build_optimizer(model: torch.nn.Module, t: FinetuneTrainConfig) -> torch.optim.Optimizer:
    """SGD over trainable parameters; biases without weight decay unless
    ``decay_bias`` (NAE4PS's default).  Norm layers' affine parameters are decayed here as in
    NAE4PS, so fine-tuning numbers stay comparable with the published ones."""
    groups = param_groups(model, t.weight_decay, decay_bias=t.decay_bias, decay_norm=True)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)


def lr_factor(step: int, iters_per_epoch: int, t: FinetuneTrainConfig) -> float:
    """Multiplier of the base lr before optimizer step ``step``: linear warm-up
    from ``warmup_factor`` over the first epoch (``iters - 1`` steps, as
    NAE4PS/SeqNet), then x gamma at each epoch milestone."""
    warm_iters = t.warmup_iters if t.warmup_iters is not None else max(0, iters_per_epoch - 1)
    warm = 1.0
    if step < warm_iters:
        alpha = step / warm_iters
        warm = t.warmup_factor * (1 - alpha) + alpha
    epoch = step // max(1, iters_per_epoch)
    return warm * t.gamma ** sum(epoch >= m for m in t.milestones)


def weighted_total(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    unknown = set(weights) - set(losses)
    if unknown:
        raise TrainError(f"train.loss_weights names unknown losses {sorted(unknown)}; the model returns {sorted(losses)}")
    return sum(weights.get(k, 1.0) * v for k, v in losses.items())


def _to_device(images, targets, device):
    return ([i.to(device, non_blocking=True) for i in images],
            [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets])


@dataclass
class TrainOutcome:
    steps: int
    epochs_done: float
    seconds: float
    last_losses: dict[str, float]
    history: list[dict] = field(default_factory=list)


def train_loop(model: torch.nn.Module, dataset: PersonSearchDataset, t: FinetuneTrainConfig, accelerator,
               log: Callable[[str], None] = print, make_optimizer=build_optimizer) -> TrainOutcome:
    """Run the schedule of ``t`` on ``dataset``; ``model`` is trained in place.
    ``make_optimizer(model, t)``: NAE's SGD unless a method brings its own (PSDiff: AdamW)."""
    generator = torch.Generator().manual_seed(t.seed)
    loader = DataLoader(dataset, batch_size=t.batch_size, shuffle=True, collate_fn=collate,
                        num_workers=t.num_workers, generator=generator, drop_last=False,
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
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    step, start, history, window = 0, time.perf_counter(), [], defaultdict(list)
    while step < total:
        for images, targets, _keys in loader:
            images, targets = _to_device(images, targets, accelerator.device)
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
            record = {"step": step, "lr": optimizer.param_groups[0]["lr"], "loss": loss.item(),
                      **{k: v.item() for k, v in losses.items()}}
            history.append(record)
            for k, v in record.items():
                window[k].append(v)
            if step % t.log_every == 0 or step == total:
                means = {k: float(np.mean(v)) for k, v in window.items() if k not in ("step", "lr")}
                log(f"step {step}/{total} epoch {step / iters_per_epoch:.2f} lr {record['lr']:.2e} "
                    + " ".join(f"{k} {v:.4f}" for k, v in means.items()))
                window.clear()
            if step >= total:
                break
    last = {k: v for k, v in history[-1].items() if k not in ("step",)} if history else {}
    return TrainOutcome(step, step / iters_per_epoch, time.perf_counter() - start, last, history)


# --------------------------------------------------------------------------- inference
def _loader(items, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(ImageListDataset(items), batch_size=batch_size, shuffle=False, collate_fn=collate,
                      num_workers=num_workers)


@torch.no_grad()
def infer_gallery(model, protocol, device, batch_size: int = 2, cws: bool = True,
                  log: Callable[[str], None] | None = None) -> dict[str, Detections]:
    """Detections of every gallery image: boxes, scores, features
    (unit embedding x score with CWS)."""
    model.eval()
    out: dict[str, Detections] = {}
    items = [(g.key, g.image) for g in protocol.gallery]
    for images, keys in _loader(items, batch_size):
        for key, det in zip(keys, model([i.to(device) for i in images])):
            scores = det["scores"].float()
            emb = det["embeddings"].float()
            feats = emb * scores[:, None] if cws else emb
            out[key] = Detections(det["boxes"].float().cpu().numpy(), scores.cpu().numpy(), feats.cpu().numpy())
        every = max(1, len(items) // 10)
        if log and (len(out) // every > (len(out) - len(keys)) // every or len(out) == len(items)):
            log(f"gallery {len(out)}/{len(items)}")
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
                  log: Callable[[str], None] = print) -> SearchInputs:
    """Everything the evaluator needs from a model, for one protocol."""
    t0 = time.perf_counter()
    gallery = infer_gallery(model, protocol, device, batch_size, log=log)
    queries = infer_queries(model, protocol, device, batch_size)
    context = None
    if cbgm:
        context = infer_query_context(model, protocol, queries, device, float(model.cfg.nms_thresh))
    log(f"inference: {len(gallery)} gallery images, {len(protocol.queries)} queries in {time.perf_counter() - t0:.1f}s")
    return SearchInputs(gallery, queries, context)
