"""``python -m hybridps.finetune {train,eval}`` -- NAE (or PSDiff) fine-tuning and the standard evaluation.

    python -m hybridps.finetune eval --dataset prw --root data/PRW --checkpoint runs/ft_prw
    python -m hybridps.finetune eval --dataset cuhk_sysu --root data/CUHK-SYSU --results other_model.npz --gallery-size -1
    python -m hybridps.finetune train --dataset prw --root data/PRW --init psvis-resnet50 --init-scope full --eval
    python -m hybridps.finetune search --weights runs/ft_prw --query q.jpg --box 10 20 60 150 --gallery frames/ --out hits.png
    python -m hybridps.finetune train --dataset prw --root data/PRW --init runs/pretrain --save-every 500 \
        --eval-every 2000 --log-with tensorboard          # later: the same command with --resume
    accelerate launch -m hybridps.finetune train --dataset cuhk_sysu --root data/CUHK-SYSU --init runs/pretrain
    python -m hybridps.finetune train --method psdiff --dataset prw --root data/PRW --init runs/pretrain --teacher runs/ft_prw
    python -m hybridps.finetune eval --dataset prw --root data/PRW --checkpoint runs/psdiff_prw --ddim-steps 1,2,4,8

See the README section "Fine-tuning and evaluation" for the protocol details and the results-file format.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch

from hybridps.runlog import cli_logging, final_error, log_to_folder, read_json_object, result, write_json
from hybridps.finetune import config as ftconfig
from hybridps.finetune.config import DATASETS, ConfigError, FinetuneConfig
from hybridps.finetune.datasets import DatasetError
from hybridps.finetune.evaluate import IOU_RULES, EvaluationError, SearchSettings, eval_detection, eval_search, subset_summary
from hybridps.finetune.init import SCOPES, InitError
from hybridps.finetune.results_io import ResultsFileError
from hybridps.errors import run_cli
from hybridps.pretrain.guard import end_distributed

RUN_KIND = "hybridps-finetune"
PROG = "hybridps finetune"
logger = logging.getLogger(__name__)
METHODS = ("nae", "psdiff")
USER_ERRORS = (ConfigError, DatasetError, EvaluationError, InitError, ResultsFileError, FileNotFoundError)


class CLIError(ValueError):
    """A command-line problem reported without a traceback."""


# --------------------------------------------------------------------------- arguments
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--root", required=True, help="the dataset release folder (e.g. data/PRW)")
    p.add_argument("--config", help="fine-tuning YAML (default: finetune/configs/<dataset>.yaml)")
    p.add_argument("--out", help="output folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=0.001")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridps finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="score a model (or a results file) with the standard protocol")
    _common(ev)
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="fine-tuning run dir, or any weight file the checkpoints package reads")
    src.add_argument("--results", help="a results .npz (finetune/results_io.py) from any model")
    ev.add_argument("--gallery-size", type=int, help="CUHK-SYSU: 50, 100, 500, 1000, 2000, 4000 or -1 (full)")
    ev.add_argument("--cbgm", action="store_true", help="context bipartite graph matching (SeqNet)")
    ev.add_argument("--det-thresh", type=float,
                    help="gallery detection score threshold (default: eval.det_thresh of the config, 0.5)")
    ev.add_argument("--cross-camera", action="store_true",
                    help="PRW multi-view variant: drop same-camera gallery frames (default: kept)")
    ev.add_argument("--iou-rule", choices=IOU_RULES,
                    help="when a detection counts as the query person: standard = IoU >= min(0.5, "
                         "wh/((w+10)(h+10))) (CUHK-SYSU/PRW protocol, relaxed for small persons), "
                         "fixed = IoU >= 0.5 (default: eval.iou_rule of the config, standard)")
    ev.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    ev.add_argument("--ddim-steps", help="PSDiff runs: comma-separated DDIM step counts, one evaluation each "
                                         "(default: model.ddim_steps of the run)")

    tr = sub.add_parser("train", help="NAE (default) or PSDiff fine-tuning from an INIT")
    _common(tr)
    tr.add_argument("--method", choices=METHODS, default="nae",
                    help="nae (default) or psdiff (config default: finetune/configs/psdiff_<dataset>.yaml)")
    tr.add_argument("--teacher", help="psdiff: frozen re-ID teacher with an embedding head (pre-training run, NAE "
                                      "fine-tuning run or weight file; default: the --init)")
    tr.add_argument("--init", required=True,
                    help="none | registry name | pre-training run dir | weight file")
    tr.add_argument("--init-scope", default="full", choices=tuple(SCOPES),
                    help="backbone: trunk + layer4 only; full: also RPN, box regressor, embedding head")
    tr.add_argument("--min-fraction", type=float, default=0.5,
                    help="refuse an INIT that matches less than this fraction of the scope's keys")
    tr.add_argument("--train-fraction", type=float, help="seeded fraction of training images to use")
    tr.add_argument("--max-steps", type=int, help="stop after N optimizer steps")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--eval", action="store_true", help="evaluate the fine-tuned model afterwards")
    tr.add_argument("--eval-every", type=int, metavar="N",
                    help="also evaluate every N steps (evals.jsonl, TensorBoard); the reported result stays the "
                         "final model's (implies --eval)")
    tr.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps (default: only at the end)")
    tr.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                    help="continue from CKPT, or from the newest complete checkpoint of --out")
    tr.add_argument("--log-with", choices=("tensorboard", "none"), help="experiment tracker (train.log_with)")
    tr.add_argument("--overwrite", action="store_true",
                    help="reuse an --out that already holds a model or checkpoints (they are replaced)")
    tr.add_argument("--offline", action="store_true", help="never download a registry INIT")
    se = sub.add_parser("search", help="rank gallery images for one query person and draw the result as a PNG")
    se.add_argument("--weights", required=True,
                    help="fine-tuning run dir, pre-training run dir, weight file, registry name or hf://OWNER/NAME")
    se.add_argument("--model", help="model name, e.g. nae_resnet50 (default: whatever --weights hold)")
    se.add_argument("--query", required=True, help="the query image")
    se.add_argument("--box", required=True, nargs=4, type=float, metavar=("X1", "Y1", "X2", "Y2"),
                    help="the query person's box in pixels")
    se.add_argument("--gallery", required=True, nargs="+", help="gallery images and/or folders of images")
    se.add_argument("--topk", type=int, default=5)
    se.add_argument("--det-thresh", type=float, help="gallery detection score threshold (default: the run's)")
    se.add_argument("--out", default="search.png", help="the PNG to write")
    se.add_argument("--json", help="also write the ranked hits here")
    se.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    se.add_argument("--offline", action="store_true", help="never download weights")
    cp = sub.add_parser("compare", help="one table from several eval outputs (metrics.json or their folders)")
    cp.add_argument("evals", nargs="+", help="eval --out folders or metrics.json files")
    cp.add_argument("--names", nargs="+", help="row names (default: the paths)")
    cp.add_argument("--out", help="also write the table (markdown) here")
    return parser


def cmd_search(args, log=print) -> list:
    from PIL import Image

    from hybridps.finetune.api import APIError, create_model, gallery_files
    from hybridps.finetune.visualize import draw_search

    try:
        model = create_model(args.model, args.weights, device=_device(args.device),
                             offline=True if args.offline else None)
        files = gallery_files(args.gallery)
        hits = model.search(args.query, args.box, [str(f) for f in files], topk=args.topk, det_thresh=args.det_thresh)
    except APIError as e:
        raise CLIError(str(e)) from None
    for rank, h in enumerate(hits, 1):
        log(f"{rank:>3}  {h.score:8.4f}  {files[h.gallery]}  box {[round(v, 1) for v in h.box]}")
    if not hits:
        log(f"no detection scored >= det_thresh {model.det_thresh if args.det_thresh is None else args.det_thresh} "
            "in the gallery")

    def rgb(path):
        with Image.open(path) as im:
            return im.convert("RGB")

    pictures = {h.gallery: rgb(files[h.gallery]) for h in hits}
    out = draw_search(rgb(args.query), args.box, pictures, hits, args.out, names=[f.name for f in files])
    log(f"wrote {out}")
    if args.json:
        path = Path(args.json)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(json.dumps([{"rank": r, "image": str(files[h.gallery]), "box": list(h.box),
                                    "score": h.score} for r, h in enumerate(hits, 1)], indent=1))
        tmp.replace(path)
        log(f"wrote {path}")
    return hits


def cmd_compare(args) -> None:
    from hybridps.finetune.compare import compare_table

    table = compare_table(args.evals, args.names)
    result(table)
    if args.out:
        Path(args.out).write_text(table)
        logger.info("wrote %s", args.out)


def load_cfg(args, base: Path | None = None) -> FinetuneConfig:
    path = Path(args.config) if args.config else (base or ftconfig.default_config_path(args.dataset))
    return ftconfig.load_config(path, list(args.overrides))


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- eval
def _settings(args, cfg: FinetuneConfig) -> SearchSettings:
    det = cfg.eval.det_thresh if args.det_thresh is None else args.det_thresh
    if not (isinstance(det, (int, float)) and 0.0 <= det <= 1.0):      # refuses nan and inf too
        raise CLIError(f"--det-thresh (or eval.det_thresh) must be in [0, 1], got {det!r}")
    return SearchSettings(det_thresh=det, cbgm=bool(args.cbgm or cfg.eval.cbgm),
                          cross_camera=bool(args.cross_camera or cfg.eval.cross_camera),
                          iou_rule=args.iou_rule or cfg.eval.iou_rule)


def load_model_for_eval(checkpoint: str, cfg: FinetuneConfig, log=logger.info):
    """A fine-tuning run dir loads strictly (``cfg`` must come from its
    config.yaml, see :func:`cmd_eval`); anything else
    goes through the checkpoints package (any layout) and must cover the
    whole model (detector and embedding head)."""
    from hybridps.pretrain.model import build_search_model

    from hybridps.finetune.init import load_scoped, resolve_init

    path = Path(checkpoint)
    meta = run_meta(path)
    if meta is not None:
        from safetensors.torch import load_file

        # cfg was read from the run's own config.yaml (plus any overrides)
        model = build_search_model(cfg.model)
        try:
            model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        except RuntimeError as e:
            raise CLIError(f"{path}/model.safetensors does not fit its config.yaml (after overrides): {e}") from None
        log(f"loaded fine-tuned model {path} ({meta.get('steps')} steps on {meta.get('dataset')})")
        return model, cfg
    weights = resolve_init(checkpoint)
    if weights.backbone != cfg.model.backbone:
        log(f"note: {checkpoint} holds a {weights.backbone}; building that instead of {cfg.model.backbone}")
        cfg = ftconfig.with_model(cfg, backbone=weights.backbone)
    model = build_search_model(cfg.model)
    load_scoped(model, weights, "full", min_fraction=0.95, log=log)
    return model, cfg


def run_meta(path: Path, error: type[Exception] = CLIError) -> dict | None:
    """The meta.json of a fine-tuned run folder (``finetune train --out``), or None when
    ``path`` is not one; a damaged meta.json raises ``error``.  Shared with the Python API."""
    meta = path / "meta.json"
    if not (path.is_dir() and meta.is_file() and (path / "model.safetensors").is_file()):
        return None
    data = read_json_object(meta, error)
    return data if data.get("kind") == RUN_KIND else None


def score(protocol, inputs, settings: SearchSettings):
    """Search metrics (the chosen protocol) and detection metrics (all GT)."""
    search = eval_search(protocol, inputs, settings)
    detection = eval_detection(protocol, inputs.gallery)
    labeled = eval_detection(protocol, inputs.gallery, labeled_only=True)
    return search, detection, labeled


def format_table(dataset: str, search, detection, labeled, settings: SearchSettings, protocol) -> str:
    if protocol.per_query_gallery is not None:
        size = protocol.gallery_size
        gallery = "full test set" if size == -1 else f"gallery size {size}"
    else:
        gallery = "all frames but the query's, " + ("other cameras only" if settings.cross_camera else "same camera included")
    head = f"{dataset}: {len(protocol.queries)} queries, {len(protocol.gallery)} gallery images ({gallery}); " \
           f"det_thresh {settings.det_thresh}{', CBGM' if settings.cbgm else ''}; IoU rule {iou_rule_text(settings.iou_rule)}"
    cols = ["mAP", "top-1", "top-5", "top-10", "det AP", "det recall", "labeled recall"]
    vals = [search.mAP, search.topk[1], search.topk[5], search.topk[10], detection.ap, detection.recall, labeled.recall]
    lines = [head, "  ".join(f"{c:>8}" for c in cols), "  ".join(f"{100 * v:8.2f}" for v in vals)]
    subsets = query_subsets(search, protocol)
    if subsets:
        lines.append("query subsets (same galleries and rule):  " + "   ".join(
            f"{name} ({s['n_queries']} queries): mAP {100 * s['mAP']:.2f}  top-1 {100 * s['top1']:.2f}"
            for name, s in subsets.items()))
    return "\n".join(lines)


def iou_rule_text(rule: str) -> str:
    return {"standard": "standard (IoU >= min(0.5, wh/((w+10)(h+10))))", "fixed": "fixed (IoU >= 0.5)"}[rule]


def query_subsets(search, protocol) -> dict:
    """mAP / top-k on each of the protocol's named query subsets (CUHK-SYSU occlusion, resolution)."""
    return {name: subset_summary(search, idx) for name, idx in protocol.query_subsets.items()}


def subset_notice(protocol) -> str | None:
    """One line when a dataset's query subsets could not be (fully) read, else None."""
    notes = {n: t for n, t in protocol.notes.get("query_subsets", {}).items() if n not in protocol.query_subsets}
    if not notes:
        return None
    return (f"note: {protocol.dataset} query subsets not scored: "
            + "; ".join(f"{n} {t}" for n, t in notes.items()) + " -- only the full query set is reported")


def write_eval(out: Path, dataset: str, protocol, search, detection, labeled, settings, source: str,
               vis: int, log=logger.info, model: dict | None = None) -> dict:
    """metrics.json, per_query.json and topk.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "dataset": dataset, "source": source,
        "settings": dataclasses.asdict(settings),
        "gallery_size": protocol.gallery_size,
        "search": search.summary(),
        "iou_rule": settings.iou_rule,
        "query_subsets": query_subsets(search, protocol),
        "query_subset_files": protocol.notes.get("query_subsets", {}),
        "detection": {**detection.summary(), "det_thresh": 0.01, "iou_thresh": 0.5},
        "detection_labeled_only": labeled.summary(),
    }
    if model is not None:
        metrics["model"] = model
    write_json(out / "metrics.json", metrics, indent=2)         # strict JSON, tmp + rename
    per_query = [{"index": q.index, "query_image": protocol.queries[q.index].image_key,
                  "query_box": protocol.queries[q.index].box, "ap": q.ap, "recall": q.recall,
                  "count_gt": q.count_gt, "count_tp": q.count_tp, "hits": {str(k): v for k, v in q.hits.items()},
                  "top": [dataclasses.asdict(h) for h in q.top]} for q in search.per_query]
    write_json(out / "per_query.json", per_query, indent=None)
    if vis > 0:
        from hybridps.finetune.visualize import draw_topk

        log(f"wrote {draw_topk(protocol, search, out / 'topk.png', n_queries=vis)}")
    return metrics


def cmd_eval(args, log=logger.info) -> dict:
    from hybridps.finetune.datasets import load_protocol
    from hybridps.finetune.results_io import check_against_protocol, read_results, write_results

    if args.gallery_size is not None and args.dataset != "cuhk_sysu":
        raise CLIError(f"--gallery-size applies to cuhk_sysu only; the {args.dataset} gallery is the whole test set")
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    meta = run_meta(ckpt) if ckpt is not None else None
    if meta is not None and meta.get("method", "nae") == "psdiff":
        from hybridps.finetune.psdiff.run import cmd_eval as cmd_eval_psdiff

        return cmd_eval_psdiff(args, log)
    if getattr(args, "ddim_steps", None) is not None:
        raise CLIError("--ddim-steps applies to PSDiff runs only")
    base = ckpt / "config.yaml" if meta is not None else None
    if base is not None and args.config:
        raise CLIError(f"{ckpt} is a fine-tuning run: its config.yaml defines the model; "
                       "drop --config (key=value overrides still apply)")
    cfg = load_cfg(args, base)
    gallery_size = cfg.eval.gallery_size if args.gallery_size is None else args.gallery_size
    settings = _settings(args, cfg)
    protocol = load_protocol(args.dataset, args.root, gallery_size)
    out = Path(args.out or (ckpt if ckpt is not None and ckpt.is_dir() else Path("runs/eval")) / f"eval_{args.dataset}")
    log_to_folder(out)
    model_info = None
    if args.results:
        inputs, meta = read_results(args.results)
        for warning in check_against_protocol(inputs, protocol):
            log(f"warning: {warning}")
        if settings.cbgm and inputs.query_context is None:
            raise CLIError(f"--cbgm needs query-image detections; {args.results} has no query_context_* arrays")
        source = f"results {args.results}"
    else:
        model, cfg = load_model_for_eval(args.checkpoint, cfg, log)
        device = _device(args.device)
        model.to(device)
        from hybridps.finetune.engine import run_inference

        inputs = run_inference(model, protocol, device, cfg.eval.batch_size, settings.cbgm, log)
        log(f"wrote {write_results(out / 'results.npz', inputs, args.dataset, {'checkpoint': str(args.checkpoint)})}")
        source = f"checkpoint {args.checkpoint}"
        meta = run_meta(ckpt) if ckpt is not None else None
        if meta is not None:
            # the run's final weights: no checkpoint is picked by its test score
            model_info = {"run": str(ckpt), "steps": meta.get("steps"), "selection": "last"}
    t0 = time.perf_counter()
    search, detection, labeled = score(protocol, inputs, settings)
    log(f"scored in {time.perf_counter() - t0:.2f}s")
    notice = subset_notice(protocol)
    if notice:
        log(notice)
    result(format_table(args.dataset, search, detection, labeled, settings, protocol))
    metrics = write_eval(out, args.dataset, protocol, search, detection, labeled, settings, source,
                         cfg.eval.visualize, log, model_info)
    log(f"wrote {out / 'metrics.json'}")
    return metrics


# --------------------------------------------------------------------------- train
def _apply_train_args(args, cfg: FinetuneConfig) -> FinetuneConfig:
    t = cfg.train
    given = {"max_steps": args.max_steps, "seed": args.seed, "train_fraction": args.train_fraction,
             "save_every": args.save_every, "eval_every": args.eval_every}
    if args.log_with is not None:
        given["log_with"] = None if args.log_with == "none" else args.log_with
    t = dataclasses.replace(t, **{k: v for k, v in given.items() if v is not None})
    cfg = dataclasses.replace(cfg, train=t)
    ftconfig.validate(cfg)
    return cfg


def _resume_target(out: Path, args) -> Path | None:
    """What ``out`` holds decides: a fresh run, a refused one, or the checkpoint to resume."""
    from hybridps.pretrain.state import CheckpointError, checkpoint_dirs, complete_checkpoints, pick_resume

    if args.resume is not None:
        if args.overwrite:
            raise CLIError("--resume continues the run in --out; --overwrite would replace it: pass one of them")
        try:
            return pick_resume(out, args.resume)
        except CheckpointError as e:
            raise CLIError(str(e)) from None
    if (out / "model.safetensors").exists() and not args.overwrite:
        raise CLIError(f"{out} already holds a fine-tuned model; pass --overwrite or another --out "
                       "(or --resume with a larger --max-steps to continue it)")
    if complete_checkpoints(out) and not args.overwrite:
        raise CLIError(f"{out} already holds checkpoints: pass --resume to continue, --overwrite to start over, "
                       "or choose another --out")
    if args.overwrite:
        import shutil

        for old in checkpoint_dirs(out) + list((out / "checkpoints").glob(".checkpoint_*.partial")):
            shutil.rmtree(old)
    return None


def _evaluator(args, cfg: FinetuneConfig, device):
    """``evaluate(model, step) -> metrics`` on the test protocol (periodic evaluation)."""
    from hybridps.finetune.datasets import load_protocol
    from hybridps.finetune.engine import run_inference

    protocol = load_protocol(args.dataset, args.root, cfg.eval.gallery_size)
    settings = SearchSettings(det_thresh=cfg.eval.det_thresh, cbgm=cfg.eval.cbgm, cross_camera=cfg.eval.cross_camera,
                              iou_rule=cfg.eval.iou_rule)

    def evaluate(model, step: int) -> dict:
        inputs = run_inference(model, protocol, device, cfg.eval.batch_size, settings.cbgm)
        search, detection, labeled = score(protocol, inputs, settings)
        row = {"mAP": search.mAP, "top1": search.topk[1], "top5": search.topk[5], "top10": search.topk[10],
               "det_ap": detection.ap, "det_recall": detection.recall}
        logger.info("eval at step %d (monitoring only): %s", step,
                    " ".join(f"{k} {100 * v:.2f}" for k, v in row.items()))
        return row

    return evaluate


def cmd_train(args, log=logger.info) -> Path:
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from hybridps.pretrain.loop import hparams, tracker_problem
    from hybridps.pretrain.model import build_search_model
    from hybridps.pretrain.state import CheckpointError, check_resumable

    from hybridps.finetune.datasets import PersonSearchDataset, load_train_records, relabel, train_subset
    from hybridps.finetune.engine import resume_config, train_loop
    from hybridps.finetune.init import load_scoped, model_changes_for_init, resolve_init

    if getattr(args, "method", "nae") == "psdiff":
        from hybridps.finetune.psdiff.run import cmd_train as cmd_train_psdiff

        return cmd_train_psdiff(args, log)
    if getattr(args, "teacher", None):
        raise CLIError("--teacher applies to --method psdiff only")
    cfg = _apply_train_args(args, load_cfg(args))
    t = cfg.train
    problem = tracker_problem(t.log_with, off="--log-with none")
    if problem:
        raise CLIError(problem)
    out = Path(args.out or f"runs/finetune_{args.dataset}")
    start_from = _resume_target(out, args)

    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        # without a GPU, several launched processes only form a (gloo) group when cpu=True
        cpu=not torch.cuda.is_available(),
        step_scheduler_with_optimizer=False,
        log_with=t.log_with, project_dir=str(out),
        # a batch without a labeled person leaves OIM-only parameters without gradient
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    log = log if accelerator.is_main_process else (lambda *_: None)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        log_to_folder(out)
    set_seed(t.seed)

    records, skipped = load_train_records(args.dataset, args.root)
    subset = train_subset(records, t.train_fraction, t.seed)
    subset, lab = relabel(subset)
    log(f"accelerate: {accelerator.num_processes} process(es), {accelerator.distributed_type}, device {accelerator.device}")
    log(f"{args.dataset}: {len(subset)}/{len(records)} training images (fraction {t.train_fraction}, seed {t.seed}), "
        f"{lab.num_ids} identities -> OIM LUT {lab.num_ids}, queue {cfg.model.cq_size}"
        + (f"; skipped {dict(skipped)}" if skipped else ""))

    weights = resolve_init(args.init, offline=True if args.offline else None)
    changes = {"num_pids": lab.num_ids}
    if weights is not None:
        changes.update(model_changes_for_init(weights, cfg.model.backbone, log))
        if weights.style == "caffe":
            logger.warning("INIT was trained caffe-style (stride in the 1x1 conv, BGR); our ResNet is pytorch-style")
    cfg = ftconfig.with_model(cfg, **changes)
    resume_cfg = resume_config(cfg, args.dataset, args.init, args.init_scope, [r.key for r in subset],
                               accelerator.num_processes)
    if start_from is not None:
        try:
            check_resumable(start_from, out, resume_cfg)
        except CheckpointError as e:
            raise CLIError(str(e)) from None
    model = build_search_model(cfg.model)
    init_report = None
    if weights is not None:
        init_report = load_scoped(model, weights, args.init_scope, args.min_fraction, log)
    else:
        log("INIT none: random initialisation")
    if t.log_with:
        accelerator.init_trackers("finetune", config=hparams(cfg))

    evaluate = _evaluator(args, cfg, accelerator.device) if t.eval_every and accelerator.is_main_process else None
    dataset = PersonSearchDataset(subset, flip_prob=t.flip_prob, seed=t.seed)
    outcome = train_loop(model, dataset, t, accelerator, out, start_from, resume_cfg, evaluate)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_run(out, accelerator.unwrap_model(model), cfg, args, lab, subset, outcome, init_report)
        log(f"saved {out} ({outcome.steps} steps, {outcome.seconds:.1f}s)")
        if args.eval or t.eval_every:
            eval_args = argparse.Namespace(dataset=args.dataset, root=args.root, config=None, overrides=[],
                                           out=str(out / f"eval_{args.dataset}"), checkpoint=str(out),
                                           results=None, gallery_size=None, cbgm=False, det_thresh=None,
                                           cross_camera=False, iou_rule=None, device=str(accelerator.device),
                                           ddim_steps=None)
            metrics = cmd_eval(eval_args, log)
            if t.eval_every:
                log(f"reported result: the final model (step {outcome.steps}), mAP {100 * metrics['search']['mAP']:.2f}; "
                    f"the {len(outcome.evals)} periodic evaluation(s) in {out / 'evals.jsonl'} are for monitoring "
                    "only (picking the best of them would select the model on the test set)")
    del model
    end_distributed(accelerator)
    return out


def save_run(out: Path, model, cfg: FinetuneConfig, args, lab, subset, outcome, init_report) -> None:
    """model.safetensors + config.yaml + meta.json + the subset and id map
    (history.jsonl and evals.jsonl are written during training)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = out / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"hybridps_layout": "hybridps"})
    os.replace(tmp, out / "model.safetensors")
    ftconfig.dump_config(cfg, out / "config.yaml")
    meta = {
        "kind": RUN_KIND, "dataset": args.dataset, "root": str(args.root), "init": args.init,
        "init_scope": args.init_scope, "train_fraction": cfg.train.train_fraction, "seed": cfg.train.seed,
        "train_images": len(subset), "num_train_ids": lab.num_ids, "steps": outcome.steps,
        "epochs": round(outcome.epochs_done, 3), "seconds": round(outcome.seconds, 1),
        "final_losses": outcome.last_losses, "backbone": cfg.model.backbone, "style": "pytorch",
        "mean": cfg.model.image_mean, "std": cfg.model.image_std,
        "init_matched_fraction": None if init_report is None else round(init_report.matched_fraction, 4),
        "resumed_from": outcome.resumed_from, "loss_history": "history.jsonl",
        "periodic_evals": "evals.jsonl" if cfg.train.eval_every else None,
        "result": "the final model (no selection on the test set)",
    }
    write_json(out / "meta.json", meta, indent=2)
    (out / "train_subset.json").write_text(json.dumps(sorted(r.key for r in subset)))
    (out / "id_map.json").write_text(json.dumps({str(k): v for k, v in lab.mapping.items()}))
    if init_report is not None:
        write_json(out / "init_report.json", init_report.as_dict())


# --------------------------------------------------------------------------- entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    resume = getattr(args, "resume", None)
    if resume and "=" in resume and not os.path.exists(resume):
        # `--resume key=value`: argparse gave the first override to --resume's optional value
        args.overrides.insert(0, resume)
        args.resume = "latest"
    with cli_logging(PROG, argv) as run:
        return _main(args, run)


def _main(args, run) -> int:
    from hybridps.finetune.compare import CompareError
    from hybridps.finetune.engine import TrainError

    command = globals()[f"cmd_{args.command}"]      # every sub-command NAME has its cmd_NAME

    def body() -> None:
        command(args)

    # TrainError: a non-finite loss or an unusable loader is the run's input, not a bug
    return run_cli(f"{PROG} {args.command}", body, (CLIError, CompareError, TrainError, *USER_ERRORS),
                   "continue with --resume" if args.command == "train" else "", report=final_error)
