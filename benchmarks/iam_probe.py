"""Does the intra-task alignment module make backbone features domain-invariant?

Trains the tiny config twice on the same shards -- with IAM (detection and
re-ID alignment on) and without (both off) -- then fits a linear probe
(sklearn LogisticRegression, stratified k-fold cross-validation) that
predicts the dataset (domain) of an image from its globally pooled backbone
C4 features.  Lower probe accuracy = less domain information left in the
features, which is what the adversarial alignment aims for.  The probe is
fitted over all datasets and, because the IAMs are *intra-task*
(``hybrid.align_scope: task``), also within the detection datasets and within
the re-ID datasets separately.

    python benchmarks/iam_probe.py [--shards BUILD] [--steps 30] [--work DIR] [key=value ...]

Trailing ``key=value`` config overrides apply to both variants (e.g.
``hybrid.loss.lambda_adv=1.0``).

Without --shards it writes the synthetic world of the paper's five datasets
with the project's own tools first.  Prints one JSON line per variant and a
summary line; the numbers are a measurement, nothing here asserts them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "iam": [],
    "no_iam": ["hybrid.loss.adv_det=false", "hybrid.loss.adv_reid=false"],
}
SYNTH = ("crowdhuman", "ecp", "msmt17", "cuhk03", "luperson")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONPATH": str(ROOT)}


def synthetic_build(work: Path, size: str) -> Path:
    synth, build = work / "synth", work / "build"
    if not (build / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "hybridps.data_prep", "synth", str(synth), "--size", size,
                        "--only", ",".join(SYNTH)], check=True, env=_env(), capture_output=True)
        cmd = [sys.executable, "-m", "hybridps.data_prep", "build", str(build), "--workers", "1", "--quiet"]
        for name in SYNTH:
            cmd += ["--source", f"{name}={synth / name}"]
        subprocess.run(cmd, check=True, env=_env(), capture_output=True)
    return build


def train_variant(shards: Path, out: Path, steps: int, config: Path, overrides: list[str]) -> Path:
    """Train one variant (skipped when ``out`` already holds a model)."""
    if (out / "model.safetensors").is_file():
        return out
    cmd = [sys.executable, "-m", "hybridps.pretrain", "--config", str(config), "--shards", str(shards), "--out", str(out),
           "--max-steps", str(steps), "train.progress=false", "train.log_with=null", *overrides]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"training {out.name} failed:\n{proc.stderr[-3000:]}")
    return out


@torch.no_grad()
def pooled_features(run: Path, shards: Path) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Global-average-pooled C4 features and domain labels of every shard sample
    (re-ID crops on their expand_resize canvas, as in training), plus each
    domain's task ("det", "reid", "ps")."""
    from safetensors.torch import load_file

    from hybridps.pretrain import data as D
    from hybridps.pretrain.config import load_config
    from hybridps.pretrain.model import build_search_model

    cfg = load_config(run / "config.yaml")
    model = build_search_model(cfg.model)
    model.load_state_dict(load_file(str(run / "model.safetensors")), strict=False)
    model.eval()
    src = D.open_source(shards=str(shards))
    tasks = {i: src.manifest["datasets"][name]["task"] for i, name in enumerate(src.manifest["domains"])}
    reader = D.ShardReader(src.shards)
    items = [(n, (s, i, 0), n) for n, (s, i) in
             enumerate((s, i) for s, info in enumerate(src.shards) for i in range(info.samples))]
    samples = D.unify_reid(D.decode_samples(D.read_samples(items, reader)), cfg.data.reid_canvas,
                           cfg.data.canvas_size, cfg.data.canvas_ratio, cfg.data.paste_scale)
    feats, domains = [], []
    for sample in samples:
        image = sample["image"].float() / 255
        batch = model.transform([image])[0].tensors
        feats.append(model.backbone(batch).mean(dim=(2, 3))[0].numpy())
        domains.append(sample["domain"])
    return np.stack(feats), np.asarray(domains), tasks


def probe_accuracy(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[float, float, int]:
    """Mean cross-validated accuracy of a linear domain classifier, the
    majority-class rate, and the number of folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _, y = np.unique(y, return_inverse=True)   # subsets: labels need not start at 0
    counts = np.bincount(y)
    folds = int(min(5, counts.min()))
    if folds < 2:
        raise SystemExit("every domain needs >= 2 samples for cross-validation")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(clf, x, y, cv=cv)
    return float(scores.mean()), float(counts.max() / counts.sum()), folds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, help="data_prep build dir (default: build the synthetic world)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--config", type=Path, default=ROOT / "pretrain" / "configs" / "tiny.yaml")
    p.add_argument("--size", default="tiny", choices=("tiny", "small"), help="synthetic world size")
    p.add_argument("--work", type=Path, help="working dir (kept; default: a temporary dir)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for both variants")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="iam_probe_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        shards = args.shards or synthetic_build(work, args.size)
        results: dict[str, dict[str, float]] = {}
        for name, overrides in VARIANTS.items():
            run = train_variant(shards, work / name, args.steps, args.config, [*args.overrides, *overrides])
            x, y, tasks = pooled_features(run, shards)
            groups = {"all": np.ones(len(y), bool),
                      "det": np.isin(y, [d for d, t in tasks.items() if t != "reid"]),
                      "reid": np.isin(y, [d for d, t in tasks.items() if t == "reid"])}
            results[name] = {}
            for group, keep in groups.items():
                if len(np.unique(y[keep])) < 2:
                    continue
                acc, chance, folds = probe_accuracy(x[keep], y[keep])
                results[name][group] = acc
                print(json.dumps({"variant": name, "group": group, "steps": args.steps,
                                  "samples": int(keep.sum()), "domains": int(len(np.unique(y[keep]))),
                                  "folds": folds, "probe_accuracy": round(acc, 4),
                                  "majority_rate": round(chance, 4)}))
        for group in results["iam"]:
            print(f"domain probe accuracy ({group} datasets): with IAM {results['iam'][group]:.3f}, "
                  f"without IAM {results['no_iam'][group]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
