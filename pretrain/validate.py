"""Range checks for every config field, run on the merged YAML before the
dataclasses are built, so every bad value is reported at once (one message
per field) instead of surfacing steps later as a ZeroDivisionError, a NaN, or
a run that trains on a silently wrong setting.

``RULES`` maps each dotted field name to a check; ``tests/test_hostile_pretrain.py``
asserts that every dataclass field has one, so a new field cannot skip it.  (A
rule may name a field this branch does not have yet: it is simply unused.)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

Check = Callable[[Any], "str | None"]


# --------------------------------------------------------------------------- checks
def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def rng(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A finite number in [lo, hi] (open ends with ``*_open``); None = unbounded."""
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"

    def check(v):
        if not _num(v):
            return None                      # types are checked by the coercion
        if not math.isfinite(v):
            return f"must be a finite number, got {v!r}"
        if lo is not None and (v < lo or (lo_open and v == lo)) or hi is not None and (v > hi or (hi_open and v == hi)):
            return f"must be in {span}, got {v!r}"
        return None
    return check


def choice(*allowed) -> Check:
    return lambda v: None if v in allowed else f"must be one of {list(allowed)}, got {v!r}"


def each(inner: Check, length: int | None = None, nonempty: bool = False, ordered: bool = False) -> Check:
    def check(v):
        if v is None:
            return None
        if length is not None and len(v) != length:
            return f"takes {length} values, got {len(v)}"
        if nonempty and not v:
            return "must not be empty"
        for i, x in enumerate(v):
            msg = inner(x)
            if msg:
                return f"item {i} {msg}"
        if ordered and list(v) != sorted(v):
            return f"must be in increasing order, got {list(v)}"
        return None
    return check


def values(inner: Check) -> Check:
    """Every value of a mapping (None = not set)."""
    def check(v):
        for k, x in (v or {}).items():
            msg = inner(x)
            if msg:
                return f"[{k!r}] {msg}"
        return None
    return check


def nonempty_str(v):
    return None if isinstance(v, str) and v.strip() else f"must be a non-empty string, got {v!r}"


def anything(v):
    return None


PROB, UNIT, POS, NONNEG = rng(0, 1), rng(0, 1), rng(0, None, lo_open=True), rng(0)
IPOS, INONNEG = rng(1), rng(0)
WEIGHT = rng(0)          # loss weights: 0 switches a term off, negative would maximise it

RULES: dict[str, Check] = {
    # model (pretrain/model/config.py)
    "model.backbone": nonempty_str, "model.pretrained": choice(False, "imagenet"),
    "model.norm_layer": choice("bn", "frozen_bn", "syncbn"), "model.freeze_stem": anything,
    "model.min_size": IPOS, "model.max_size": IPOS,
    "model.image_mean": each(rng(), 3), "model.image_std": each(POS, 3),
    "model.anchor_sizes": each(IPOS, nonempty=True), "model.aspect_ratios": each(POS, nonempty=True),
    "model.rpn_fg_iou": UNIT, "model.rpn_bg_iou": UNIT, "model.rpn_batch_size": IPOS,
    "model.rpn_pos_fraction": rng(0, 1, lo_open=True),
    "model.rpn_pre_nms_train": IPOS, "model.rpn_pre_nms_test": IPOS,
    "model.rpn_post_nms_train": IPOS, "model.rpn_post_nms_test": IPOS, "model.rpn_nms_thresh": UNIT,
    "model.roi_fg_iou": UNIT, "model.roi_bg_iou": UNIT, "model.roi_batch_size": IPOS,
    "model.roi_pos_fraction": rng(0, 1, lo_open=True), "model.roi_output_size": IPOS,
    "model.roi_sampling_ratio": rng(-1),   # <= 0: torchvision's adaptive sampling
    "model.ignore_ioa": UNIT, "model.box_coder_weights": each(POS, 4),
    "model.emb_dim": rng(2), "model.num_pids": IPOS, "model.cq_size": INONNEG,
    "model.oim_momentum": UNIT, "model.oim_scalar": POS, "model.oim_sample": INONNEG,
    "model.lut_dtype": choice("float32", "bfloat16", "float16"),
    "model.box_loss_beta": NONNEG,          # smooth-L1 beta; 0 = plain L1
    **{f"model.{k}": anything for k in ("ugas_sfm", "ugas_distill", "ugas_uncertainty", "iidfc_fc", "iidfc_pam")},
    "model.ugas_sfm_dim": IPOS, "model.ugas_sfm_channels": IPOS, "model.ugas_distill_temp": POS,
    "model.iidfc_m1": POS, "model.iidfc_m2": rng(), "model.iidfc_pam_channels": IPOS,
    "model.score_thresh": UNIT, "model.nms_thresh": UNIT, "model.detections_per_img": IPOS,
    # hybrid (pretrain/hybrid.py)
    "hybrid.num_domains": IPOS, "hybrid.grl_coef": NONNEG, "hybrid.predictor_hidden": IPOS,
    "hybrid.iam_hidden": IPOS, "hybrid.align_scope": choice("task", "all"),
    "hybrid.det_domains": each(INONNEG), "hybrid.reid_domains": each(INONNEG), "hybrid.max_con_boxes": INONNEG,
    **{f"hybrid.loss.{k}": anything for k in ("det", "reid", "con", "adv_det", "adv_reid", "consistency",
                                              "inter_task", "oim_two_view")},
    **{f"hybrid.loss.{k}": WEIGHT for k in ("eta", "lambda_adv", "w_rpn_cls", "w_rpn_reg", "w_box_reg",
                                            "w_det_cls", "w_reid", "w_img", "w_ins", "w_cst", "w_inter")},
    # data (pretrain/data/config.py)
    "data.shards": anything, "data.urls": anything, "data.manifest": anything, "data.cache_dir": anything,
    "data.splits": anything, "data.weights": values(rng(0)),
    "data.batch_size": IPOS, "data.num_workers": INONNEG,
    "data.remainder": choice("drop", "pad"), "data.reid_canvas": choice("expand_resize", "random_paste"),
    "data.canvas_size": each(IPOS, 2), "data.canvas_ratio": each(POS, 2, ordered=True),
    "data.paste_scale": each(POS, 2, ordered=True),
    "data.flip_prob": PROB, "data.crop_prob": PROB,
    "data.crop_scale": each(rng(0, 1, lo_open=True), 2, ordered=True),
    "data.min_visible": UNIT, "data.min_box_size": NONNEG,
    "data.color_jitter": each(NONNEG, 4), "data.max_pixels": IPOS, "data.verify_shards": anything,
    "data.group_by_aspect": anything, "data.decode": choice("tensor", "pil", "cuda"),
    # train (pretrain/config.py)
    "train.output_dir": nonempty_str, "train.max_steps": IPOS, "train.seed": rng(0, 2 ** 32 - 1),
    "train.lr": POS, "train.momentum": rng(0, 1, hi_open=True), "train.weight_decay": NONNEG,
    "train.warmup_steps": INONNEG, "train.warmup_factor": rng(0, 1, lo_open=True),
    "train.schedule": choice("step", "cosine", "constant"), "train.milestones": each(IPOS, ordered=True),
    "train.gamma": POS, "train.grad_clip": NONNEG, "train.grad_accum": IPOS,
    "train.mixed_precision": choice("no", "fp16", "bf16"), "train.sync_bn": anything,
    "train.log_with": choice(None, "tensorboard"), "train.log_every": IPOS, "train.save_every": INONNEG,
    "train.total_limit": IPOS, "train.progress": anything,
}


def _cross(v: dict[str, Any]) -> list[str]:
    """Checks between fields (only when both fields passed their own)."""
    out = []
    if _num(v.get("model.min_size")) and _num(v.get("model.max_size")) and v["model.max_size"] < v["model.min_size"]:
        out.append(f"model.max_size must be >= model.min_size, got {v['model.max_size']} < {v['model.min_size']}")
    for part in ("rpn", "roi"):
        bg, fg = v.get(f"model.{part}_bg_iou"), v.get(f"model.{part}_fg_iou")
        if _num(bg) and _num(fg) and bg > fg:
            out.append(f"model.{part}_bg_iou must be <= model.{part}_fg_iou, got {bg} > {fg}")
    emb = v.get("model.emb_dim")
    if isinstance(emb, int) and emb % 2:
        out.append(f"model.emb_dim must be even (split between res4 and res5), got {emb}")
    jitter = v.get("data.color_jitter")
    if isinstance(jitter, list) and len(jitter) == 4 and _num(jitter[3]) and jitter[3] > 0.5:
        out.append(f"data.color_jitter hue (4th value) must be <= 0.5, got {jitter[3]}")
    if v.get("data.urls") and not v.get("data.manifest"):
        out.append("data.urls needs data.manifest (the build's manifest.json)")
    return out


# --------------------------------------------------------------------------- the walk
def rule_names(cls, prefix: str = "") -> list[str]:
    """Dotted names of every leaf field of a config dataclass tree."""
    from hybridps.pretrain.config import _hints

    hints, out = _hints(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += rule_names(tp, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def check_tree(cls, data: Any, prefix: str = "", flat: dict | None = None) -> list[str]:
    """Every problem of a raw (merged YAML) config: unknown keys, types, ranges."""
    from hybridps.pretrain.config import ConfigError, _coerce, _hints, _unknown_key_error

    top = flat is None
    flat = {} if top else flat
    if not isinstance(data, dict):
        return [f"{prefix[:-1] or 'config'}: expected a mapping, got {data!r}"]
    problems = []
    hints, fields = _hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            problems.append(str(_unknown_key_error(prefix, key, list(fields))))
    for name, f in fields.items():
        tp, where = hints[name], prefix + name
        if dataclasses.is_dataclass(tp):
            problems += check_tree(tp, data.get(name) or {}, where + ".", flat)
            continue
        if name in data:
            try:
                value = _coerce(data[name], tp, where)
            except ConfigError as e:
                problems.append(str(e))
                continue
        else:
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rule = RULES.get(where, _finite)
        msg = rule(value)
        if msg:
            problems.append(f"{where} {msg}")
        else:
            flat[where] = value
    if top:
        problems += _cross(flat)
    return problems


def _finite(v: Any) -> str | None:
    """Fields without a rule yet: at least no NaN/inf."""
    return "must be a finite number" if isinstance(v, float) and not math.isfinite(v) else None
