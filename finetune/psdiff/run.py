"""``python -m hybridps.finetune train --method psdiff`` and ``eval`` of a PSDiff run (the shared CLI
dispatches here): the teacher, the init from our checkpoints, training, per-step evaluation."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from hybridps.runlog import result, write_json
from hybridps.finetune import config as ftconfig
from hybridps.finetune.init import (InitError, InitWeights, load_scoped, model_changes_for_init,
                                    normalization_for_model, resolve_init)
from hybridps.finetune.psdiff import config as psconfig
from hybridps.finetune.psdiff.config import PSDiffConfig
from hybridps.finetune.psdiff.model import PSDiff, build_psdiff
from hybridps.pretrain.optim import param_groups, sgd

# PSDiff has no RPN, box regressor or NAE embedding head: both scopes move the trunk and layer4
# (the teacher carries the embedding knowledge).  Our checkpoints keep layer4 under the NAE RoI head.
SCOPES = {"backbone": ("backbone.", "backbone_c5."), "full": ("backbone.", "backbone_c5.")}
LAYER4_FROM, LAYER4_TO = "roi_heads.box_head.", "backbone_c5."
METHOD = "psdiff"


# --------------------------------------------------------------------------- teacher and init
def load_teacher(source: str, student: psconfig.PSDiffModelConfig, log=print):
    """A frozen NAE-layout model with an embedding head (our pre-training run, a fine-tuned NAE
    run, or any weight file the checkpoints package converts); it embeds the gt boxes."""
    from hybridps.finetune.cli import CLIError, load_model_for_eval, run_meta
    from hybridps.pretrain.model.config import ModelConfig

    path = Path(source)
    meta = run_meta(path)
    if meta is not None:
        if meta.get("method", "nae") != "nae":
            raise InitError(f"--teacher {source} is a {meta.get('method')} run; the teacher must be an NAE-layout "
                            "model with an embedding head (a pre-training run or an NAE fine-tuning run)")
        tcfg = ftconfig.load_config(path / "config.yaml")
    else:
        weights = resolve_init(source)
        if weights is None:
            raise InitError("--teacher none: PSDiff needs a teacher with an embedding head")
        model_cfg = ModelConfig(backbone=weights.backbone, min_size=student.min_size, max_size=student.max_size,
                                num_pids=1, cq_size=0)
        norm = normalization_for_model(weights.normalization)
        if norm is not None:
            model_cfg = dataclasses.replace(model_cfg, image_mean=norm[0], image_std=norm[1])
        tcfg = ftconfig.FinetuneConfig(model=model_cfg)
    try:
        teacher, _ = load_model_for_eval(source, tcfg, log=lambda m: log(f"teacher: {m}"))
    except (InitError, CLIError) as e:
        raise InitError(f"--teacher {source} cannot serve as the re-ID teacher (it needs an embedding head): "
                        f"{e}") from None
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def to_psdiff_layout(weights: InitWeights) -> InitWeights:
    state = {(LAYER4_TO + k[len(LAYER4_FROM):] if k.startswith(LAYER4_FROM) else k): v
             for k, v in weights.state_dict.items()}
    return dataclasses.replace(weights, state_dict=state)


def load_init(model: PSDiff, weights: InitWeights, scope: str, min_fraction: float, log=print):
    """Scoped load with the per-module report (the NAE init machinery, PSDiff's key prefixes)."""
    if scope == "full":
        log("note: PSDiff has no RPN / box regressor / NAE embedding head; scope 'full' loads the trunk "
            "and layer4 (the teacher supplies the re-ID embeddings)")
    return load_scoped(model, to_psdiff_layout(weights), scope, min_fraction, log, scopes=SCOPES)


def build_optimizer(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    """AdamW (paper) or SGD; biases and norm affine parameters without weight decay (our choice)."""
    if t.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, t.weight_decay, decay_bias=t.decay_bias), lr=t.lr)
    return sgd(model, t.lr, t.momentum, t.weight_decay, decay_bias=t.decay_bias)


def load_cfg(args, base: Path | None = None) -> PSDiffConfig:
    path = Path(args.config) if args.config else (base or psconfig.default_config_path(args.dataset))
    return psconfig.load_config(path, list(args.overrides))


# --------------------------------------------------------------------------- train
def cmd_train(args, log=print) -> Path:
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed

    from hybridps.finetune.cli import CLIError, cmd_eval
    from hybridps.finetune.datasets import PersonSearchDataset, load_train_records, train_subset
    from hybridps.finetune.engine import train_loop
    from hybridps.pretrain.guard import end_distributed

    cfg = load_cfg(args)
    t = dataclasses.replace(cfg.train, **{k: v for k, v in (("max_steps", args.max_steps), ("seed", args.seed),
                                                           ("train_fraction", args.train_fraction)) if v is not None})
    cfg = dataclasses.replace(cfg, train=t)
    psconfig.validate(cfg)
    out = Path(args.out or f"runs/psdiff_{args.dataset}")
    if (out / "model.safetensors").exists() and not args.overwrite:
        raise CLIError(f"{out} already holds a fine-tuned model; pass --overwrite or another --out")
    teacher_src = args.teacher or (args.init if str(args.init).lower() != "none" else None)
    if teacher_src is None:
        raise CLIError("--method psdiff needs --teacher PATH (a checkpoint with an embedding head) when --init is none")

    accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=not torch.cuda.is_available(),
                              step_scheduler_with_optimizer=False,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    log = log if accelerator.is_main_process else (lambda *_: None)
    set_seed(t.seed)
    records, skipped = load_train_records(args.dataset, args.root)
    subset = train_subset(records, t.train_fraction, t.seed)
    log(f"psdiff: {args.dataset}: {len(subset)}/{len(records)} training images (fraction {t.train_fraction}, "
        f"seed {t.seed})" + (f"; skipped {dict(skipped)}" if skipped else ""))

    teacher = load_teacher(teacher_src, cfg.model, log)
    changes = {"emb_dim": int(teacher.cfg.emb_dim)}
    weights = resolve_init(args.init, offline=True if args.offline else None)
    if weights is not None:
        changes.update(model_changes_for_init(weights, cfg.model.backbone, log))
    cfg = psconfig.with_model(cfg, **changes)
    set_seed(t.seed)                       # the model's init does not depend on the teacher's loading
    model = build_psdiff(cfg.model)
    init_report = None
    if weights is not None:
        init_report = load_init(model, weights, args.init_scope, args.min_fraction, log)
    else:
        log("INIT none: random initialisation")
    model.set_teacher(teacher.to(accelerator.device))
    model.loss_weights = dict(t.loss_weights)
    log(f"teacher {teacher_src}: emb_dim {changes['emb_dim']}, frozen, run on the gt boxes")
    out.mkdir(parents=True, exist_ok=True)
    outcome = train_loop(model, PersonSearchDataset(subset, flip_prob=t.flip_prob, seed=t.seed), t, accelerator, out,
                         make_optimizer=build_optimizer)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_run(out, accelerator.unwrap_model(model), cfg, args, teacher_src, subset, outcome, init_report)
        log(f"saved {out} ({outcome.steps} steps, {outcome.seconds:.1f}s)")
        if args.eval:
            cmd_eval(argparse.Namespace(dataset=args.dataset, root=args.root, config=None, overrides=[],
                                        out=str(out / f"eval_{args.dataset}"), checkpoint=str(out), results=None,
                                        gallery_size=None, cbgm=False, det_thresh=None, cross_camera=False,
                                        iou_rule=None, device=str(accelerator.device), ddim_steps=None), log)
    del model
    end_distributed(accelerator)
    return out


def save_run(out: Path, model: PSDiff, cfg: PSDiffConfig, args, teacher_src, subset, outcome, init_report) -> None:
    from safetensors.torch import save_file

    from hybridps.finetune.cli import RUN_KIND

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"hybridps_layout": "psdiff"})
    psconfig.dump_config(cfg, out / "config.yaml")
    meta = {"kind": RUN_KIND, "method": METHOD, "dataset": args.dataset, "root": str(args.root), "init": args.init,
            "init_scope": args.init_scope, "teacher": str(teacher_src), "train_fraction": cfg.train.train_fraction,
            "seed": cfg.train.seed, "train_images": len(subset), "steps": outcome.steps,
            "epochs": round(outcome.epochs_done, 3), "seconds": round(outcome.seconds, 1),
            "final_losses": outcome.last_losses, "backbone": cfg.model.backbone,
            "init_matched_fraction": None if init_report is None else round(init_report.matched_fraction, 4)}
    meta["loss_history"] = "history.jsonl"          # written during training (train_loop)
    write_json(out / "meta.json", meta, indent=2)
    (out / "train_subset.json").write_text(json.dumps(sorted(r.key for r in subset)))
    if init_report is not None:
        write_json(out / "init_report.json", init_report.as_dict())
    tmp.replace(out / "model.safetensors")        # last: a run dir with a model is complete


# --------------------------------------------------------------------------- eval
def parse_steps(text: str | None, default: int) -> list[int]:
    from hybridps.finetune.cli import CLIError

    if text is None:
        return [default]
    try:
        steps = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise CLIError(f"--ddim-steps takes comma-separated integers, got {text!r}") from None
    if not steps or any(s < 1 for s in steps):
        raise CLIError(f"--ddim-steps needs integers >= 1, got {text!r}")
    return list(dict.fromkeys(steps))


def load_run(path: Path, cfg: PSDiffConfig) -> PSDiff:
    from safetensors.torch import load_file

    from hybridps.finetune.cli import CLIError

    model = build_psdiff(cfg.model)
    try:
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    except RuntimeError as e:
        raise CLIError(f"{path}/model.safetensors does not fit its config.yaml (after overrides): {e}") from None
    return model


def cmd_eval(args, log=print) -> dict:
    """Evaluate a PSDiff run once per DDIM step count; ``OUT/ddim<k>/`` holds each full
    evaluation, ``OUT/metrics.json`` the model's default step count plus ``per_ddim_steps``."""
    from hybridps.finetune import cli
    from hybridps.finetune.datasets import load_protocol
    from hybridps.finetune.engine import run_inference
    from hybridps.finetune.results_io import write_results

    ckpt = Path(args.checkpoint)
    if args.config:
        raise cli.CLIError(f"{ckpt} is a fine-tuning run: its config.yaml defines the model; "
                           "drop --config (key=value overrides still apply)")
    if args.results:
        raise cli.CLIError("--results is scored without a model; PSDiff runs are evaluated with --checkpoint")
    cfg = load_cfg(args, ckpt / "config.yaml")
    if args.gallery_size is not None and args.dataset != "cuhk_sysu":
        raise cli.CLIError(f"--gallery-size applies to cuhk_sysu only; the {args.dataset} gallery is the whole test set")
    steps = parse_steps(getattr(args, "ddim_steps", None), cfg.model.ddim_steps)
    if max(steps) > cfg.model.timesteps:
        raise cli.CLIError(f"--ddim-steps {max(steps)} exceeds the model's {cfg.model.timesteps} diffusion steps")
    gallery_size = cfg.eval.gallery_size if args.gallery_size is None else args.gallery_size
    settings = cli._settings(args, cfg)
    protocol = load_protocol(args.dataset, args.root, gallery_size)
    out = Path(args.out or ckpt / f"eval_{args.dataset}")
    model = load_run(ckpt, cfg)
    device = cli._device(args.device)
    model.to(device)
    log(f"loaded PSDiff run {ckpt}; DDIM steps {steps}")
    per: dict[int, dict] = {}
    for k in steps:
        model.cfg = dataclasses.replace(model.cfg, ddim_steps=k)
        inputs = run_inference(model, protocol, device, cfg.eval.batch_size, settings.cbgm, log)
        sub = out / f"ddim{k}"
        write_results(sub / "results.npz", inputs, args.dataset, {"checkpoint": str(ckpt), "ddim_steps": k})
        search, detection, labeled = cli.score(protocol, inputs, settings)
        result(f"DDIM steps {k}:\n" + cli.format_table(args.dataset, search, detection, labeled, settings, protocol))
        main = k == (cfg.model.ddim_steps if cfg.model.ddim_steps in steps else steps[-1])
        per[k] = cli.write_eval(sub, args.dataset, protocol, search, detection, labeled, settings,
                                f"checkpoint {ckpt} (psdiff, {k} DDIM steps)", cfg.eval.visualize if main else 0,
                                log=lambda *_: None)
    chosen = cfg.model.ddim_steps if cfg.model.ddim_steps in per else steps[-1]
    table = {str(k): {"mAP": m["search"]["mAP"], "top1": m["search"]["top1"], "det_ap": m["detection"]["ap"],
                      "det_recall": m["detection"]["recall"]} for k, m in per.items()}
    metrics = {**per[chosen], "method": METHOD, "ddim_steps": chosen, "per_ddim_steps": table}
    write_json(out / "metrics.json", metrics, indent=2)
    lines = ["DDIM steps   mAP    top-1   det AP  det recall"]
    for k, row in table.items():
        lines.append(f"{k:>10} {100 * row['mAP']:6.2f} {100 * row['top1']:7.2f} {100 * row['det_ap']:7.2f} "
                     f"{100 * row['det_recall']:8.2f}")
    result("\n".join(lines))
    log(f"wrote {out / 'metrics.json'}")
    return metrics
