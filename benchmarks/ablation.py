"""Multi-seed ablation of the hybrid pre-training on the synthetic world.

    python benchmarks/ablation.py --out runs/ablation            # full table (<= 3 h on 2 CPU cores)
    python benchmarks/ablation.py --quick --out runs/ablation_q  # init kinds, without IAM / L_con (<= 30 min)
    python benchmarks/ablation.py --device cuda --out runs/abl   # the same, longer schedules, on a GPU

The whole chain per configuration and seed, through the project's own command-line tools:
synthetic world (``data_prep synth``, a fixed world) -> shards (``data_prep build``) ->
pre-training (``python -m hybridps.pretrain``) -> NAE fine-tuning on the synthetic PRW-format target
(``python -m hybridps.finetune train``) -> the standard PRW evaluation (``python -m hybridps.finetune eval``,
>= 100 queries).  Pre-training and fine-tuning seeds both vary with the seed.  Every job runs
with one intra-op thread, so a job's numbers do not depend on ``--jobs`` (jobs run side by
side) and the same seed on the same machine gives identical numbers.

Writes ``OUT/ablation.json`` = {"configs": {NAME: {"seeds", "mAP", "top1", "det_ap", ...}},
"comparisons": [...], "protocol": {...}, "timing": {...}} and ``OUT/ablation.md`` (mean +- std
per configuration and the paired differences with 95% t-intervals).  Finished jobs are kept
(a job is redone only if its result file is missing), so an interrupted run continues.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_CFG = ROOT / "pretrain" / "configs" / "tiny.yaml"
FINETUNE_CFG = ROOT / "finetune" / "configs" / "tiny.yaml"
SOURCES5 = ("crowdhuman", "ecp", "msmt17", "cuhk03", "luperson")
SOURCES2 = ("crowdhuman", "ecp")          # Fig. 6's smallest mix: the two detection sets
DEFAULT_GAP, STRONG_GAP = 1.0, 2.5
NO_IAM = ("hybrid.loss.adv_det=false", "hybrid.loss.adv_reid=false")
OIM_SAMPLE = 128                          # LUT rows scored per OIM call; the 5-source world has 788 ids

# pre-training variants: name -> (world gap, sources, config overrides)
PRETRAINS = {
    "default": (DEFAULT_GAP, SOURCES5, ()),
    "no_iam": (DEFAULT_GAP, SOURCES5, NO_IAM),
    "no_con": (DEFAULT_GAP, SOURCES5, ("hybrid.loss.con=false",)),
    "inter_task": (DEFAULT_GAP, SOURCES5, ("hybrid.loss.inter_task=true",)),
    "random_paste": (DEFAULT_GAP, SOURCES5, ("data.reid_canvas=random_paste",)),
    "oim_two_view": (DEFAULT_GAP, SOURCES5, ("hybrid.loss.oim_two_view=true",)),
    "oim_sampled": (DEFAULT_GAP, SOURCES5, (f"model.oim_sample={OIM_SAMPLE}",)),
    "2ds": (DEFAULT_GAP, SOURCES2, ()),
    "2ds_no_iam": (DEFAULT_GAP, SOURCES2, NO_IAM),
    f"gap{STRONG_GAP:g}": (STRONG_GAP, SOURCES5, ()),
    f"gap{STRONG_GAP:g}_no_iam": (STRONG_GAP, SOURCES5, NO_IAM),
}


@dataclass(frozen=True)
class Row:
    """One table row: how the fine-tuned model is initialised and on how much target data."""

    name: str
    pretrain: str | None        # a PRETRAINS key, None = random init
    scope: str = "full"         # backbone | full
    fraction: float = 1.0
    paper: str = ""             # the paper's analogue


def rows(quick: bool) -> list[Row]:
    out = [
        Row("random", None, paper="Fig. 5, ImageNet/random init"),
        Row("backbone", "default", "backbone", paper="Fig. 5, backbone-only init"),
        Row("full", "default", paper="Fig. 5, full init (our default)"),
        Row("no_iam", "no_iam", paper="Tab. 5 / Fig. 6, without IAM"),
        Row("no_con", "no_con", paper="without L_con"),
    ]
    if quick:
        return out
    out += [
        Row("inter_task", "inter_task", paper="Tab. 5, + inter-task alignment"),
        Row("random_paste", "random_paste", paper="Tab. 4, random_paste"),
        Row("oim_two_view", "oim_two_view", paper="(ours) OIM two-view positive"),
        Row("oim_sampled", "oim_sampled", paper=f"(ours) sampled OIM, {OIM_SAMPLE} LUT rows per call"),
        Row("2ds", "2ds", paper="Fig. 6, 2 datasets with IAM"),
        Row("2ds_no_iam", "2ds_no_iam", paper="Fig. 6, 2 datasets without IAM"),
        Row(f"gap{STRONG_GAP:g}", f"gap{STRONG_GAP:g}", paper=f"domain gap x{STRONG_GAP:g}, with IAM"),
        Row(f"gap{STRONG_GAP:g}_no_iam", f"gap{STRONG_GAP:g}_no_iam", paper=f"domain gap x{STRONG_GAP:g}, without IAM"),
    ]
    for frac in (0.1, 0.3, 0.6):
        pct = int(round(frac * 100))
        out += [Row(f"random@{pct}%", None, fraction=frac, paper=f"Fig. 5, {pct}% target data"),
                Row(f"full@{pct}%", "default", fraction=frac, paper=f"Fig. 5, {pct}% target data")]
    return out


def comparisons(names: set[str]) -> list[tuple[str, str, str]]:
    """(a, b, what a - b measures) for the pairs present."""
    pairs = [("full", "random", "pre-training (full init) vs random init"),
             ("backbone", "random", "pre-training (backbone init) vs random init"),
             ("full", "backbone", "full vs backbone-only init"),
             ("full", "no_iam", "IAM (gap 1)"),
             ("full", "no_con", "L_con"),
             ("inter_task", "full", "adding inter-task alignment"),
             ("full", "random_paste", "expand_resize vs random_paste"),
             ("oim_two_view", "full", "OIM two-view positive"),
             ("oim_sampled", "full", f"sampled OIM ({OIM_SAMPLE} LUT rows) vs full OIM"),
             ("2ds", "2ds_no_iam", "IAM with 2 datasets"),
             ("full", "2ds", "5 vs 2 pre-training datasets (with IAM)"),
             (f"gap{STRONG_GAP:g}", f"gap{STRONG_GAP:g}_no_iam", f"IAM (gap {STRONG_GAP:g})")]
    for pct in (10, 30, 60):
        pairs.append((f"full@{pct}%", f"random@{pct}%", f"pre-training with {pct}% target data"))
    pairs.append(("full@60%", "random", "pre-trained on 60% vs random on 100%"))
    return [p for p in pairs if p[0] in names and p[1] in names]


# --------------------------------------------------------------------------- job running
@dataclass
class Runner:
    out: Path
    device: str
    log_lock: threading.Lock = field(default_factory=threading.Lock)
    timing: dict = field(default_factory=dict)

    def env(self) -> dict:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0",
                   HYBRIDPS_THREADS="1")
        env.pop("HYBRIDPS_DEBUG", None)
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def run(self, name: str, cmd: list[str], log: Path) -> None:
        t0 = time.perf_counter()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env(), cwd=ROOT)
        dt = time.perf_counter() - t0
        with self.log_lock:
            self.timing[name] = round(dt, 1)
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {'ok' if proc.returncode == 0 else 'FAILED'} "
                  f"in {dt:.0f}s", flush=True)
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{name} failed (exit {proc.returncode}); log {log}:\n" + "\n".join(tail))


def py(*args: str) -> list[str]:
    return [sys.executable, *args]


def prepare_worlds(runner: Runner, gaps: set[float], mixes: set[tuple[str, ...]], world_seed: int) -> dict:
    """Synthetic worlds (one per gap) and their shard builds (one per gap and mix)."""
    shards = {}
    for gap in sorted(gaps):
        world = runner.out / f"world_gap{gap:g}"
        if not (world / "synth_truth.json").is_file():
            shutil.rmtree(world, ignore_errors=True)
            runner.run(f"synth gap {gap:g}", py("-m", "hybridps.data_prep", "synth", str(world), "--seed", str(world_seed),
                                                "--size", "bench", "--domain-gap", str(gap), "--only",
                                                ",".join(SOURCES5 + ("prw",))), runner.out / "logs" / f"synth_{gap:g}.log")
        for mix in sorted(mixes):
            dest = runner.out / f"shards_gap{gap:g}_{len(mix)}ds"
            if not (dest / "manifest.json").is_file():
                shutil.rmtree(dest, ignore_errors=True)
                cmd = py("-m", "hybridps.data_prep", "build", str(dest), "--seed", str(world_seed))
                for src in mix:
                    cmd += ["--source", f"{src}={world / src}"]
                if "luperson" in mix:
                    cmd += ["--limit", "luperson=200"]
                runner.run(f"build gap {gap:g} {len(mix)}ds", cmd, runner.out / "logs" / f"build_{gap:g}_{len(mix)}.log")
            shards[(gap, mix)] = dest
    return shards


def pretrain_job(runner: Runner, name: str, seed: int, shards: Path, steps: int) -> Path:
    gap, mix, overrides = PRETRAINS[name]
    out = runner.out / "pretrain" / f"{name}_s{seed}"
    if (out / "meta.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    cmd = py("-m", "hybridps.pretrain", "--config", str(PRETRAIN_CFG), "--shards", str(shards), "--out", str(out),
             "--max-steps", str(steps), f"train.seed={seed}", "train.log_with=null", "train.progress=false",
             *overrides)
    runner.run(f"pretrain {name} s{seed}", cmd, runner.out / "logs" / f"pretrain_{name}_s{seed}.log")
    return out


def finetune_job(runner: Runner, row: Row, seed: int, init: Path | None, target: Path, steps: int,
                 overrides: tuple[str, ...] = ()) -> dict:
    tag = row.name.replace("%", "pct").replace("@", "_")
    out = runner.out / "finetune" / f"{tag}_s{seed}"
    metrics = out / "eval" / "metrics.json"
    if not metrics.is_file():
        shutil.rmtree(out, ignore_errors=True)
        init_args = ["--init", "none"] if init is None else ["--init", str(init), "--init-scope", row.scope]
        cmd = py("-m", "hybridps.finetune", "train", "--config", str(FINETUNE_CFG), "--dataset", "prw", "--root", str(target),
                 *init_args, "--out", str(out), "--max-steps", str(steps), "--seed", str(seed))
        if row.fraction < 1.0:
            cmd += ["--train-fraction", str(row.fraction)]
        cmd += list(overrides)      # finetune config key=value overrides (benchmarks/modules_ablation.py)
        runner.run(f"finetune {row.name} s{seed}", cmd, runner.out / "logs" / f"finetune_{tag}_s{seed}.log")
        cmd = py("-m", "hybridps.finetune", "eval", "--dataset", "prw", "--root", str(target), "--checkpoint", str(out),
                 "--out", str(out / "eval"), "--device", runner.device)
        runner.run(f"eval {row.name} s{seed}", cmd, runner.out / "logs" / f"eval_{tag}_s{seed}.log")
    m = json.loads(metrics.read_text())
    return {"mAP": 100 * m["search"]["mAP"], "top1": 100 * m["search"]["top1"],
            "det_ap": 100 * m["detection"]["ap"], "n_queries": m["search"]["n_queries"]}


# --------------------------------------------------------------------------- statistics
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (None for a single value: JSON has no NaN)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else None


def paired(a: list[float], b: list[float]) -> dict:
    """Mean paired difference a - b over seeds with its 95% t-interval."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    n = d.size
    mean = float(d.mean())
    if n < 2:
        return {"diff": mean, "ci95": None, "n": n}
    half = T975.get(n - 1, 1.96) * float(d.std(ddof=1)) / math.sqrt(n)
    return {"diff": mean, "ci95": [mean - half, mean + half], "n": n}


def summarise(results: dict, seeds: list[int], all_rows: list[Row]) -> tuple[dict, list[dict]]:
    configs = {}
    for row in all_rows:
        per = [results[(row.name, s)] for s in seeds]
        configs[row.name] = {"seeds": seeds, "paper": row.paper, "pretrain": row.pretrain, "scope": row.scope,
                             "fraction": row.fraction,
                             **{k: [p[k] for p in per] for k in ("mAP", "top1", "det_ap")}}
    comps = []
    for a, b, what in comparisons(set(configs)):
        comps.append({"a": a, "b": b, "what": what,
                      **{k: paired(configs[a][k], configs[b][k]) for k in ("mAP", "top1", "det_ap")}})
    return configs, comps


def _fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.2f}" if s is None else f"{m:.2f} +- {s:.2f}"


def _fmt_diff(p: dict) -> str:
    if p["ci95"] is None:
        return f"{p['diff']:+.2f}"
    lo, hi = p["ci95"]
    return f"{p['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def markdown(report: dict) -> str:
    proto = report["protocol"]
    lines = [f"Seeds {proto['seeds']}; pre-training {proto['pretrain_steps']} steps, fine-tuning "
             f"{proto['finetune_steps']} steps; PRW protocol, {proto['n_queries']} queries; "
             f"mean +- std over seeds (%).", "",
             "| config | paper analogue | mAP | top-1 | det AP |", "|---|---|---:|---:|---:|"]
    for name, c in report["configs"].items():
        lines.append(f"| {name} | {c['paper']} | {_fmt(c['mAP'])} | {_fmt(c['top1'])} | {_fmt(c['det_ap'])} |")
    return "\n".join(lines + comparison_lines(report["comparisons"])) + "\n"


def comparison_lines(comparisons: list[dict]) -> list[str]:
    """The paired-differences table (markdown lines) of a report's comparisons."""
    lines = ["", "Paired differences a - b over the same seeds (mean [95% t-interval], percentage points):", "",
             "| a - b | measures | mAP | top-1 | det AP |", "|---|---|---:|---:|---:|"]
    for c in comparisons:
        lines.append(f"| {c['a']} - {c['b']} | {c['what']} | {_fmt_diff(c['mAP'])} | {_fmt_diff(c['top1'])} | "
                     f"{_fmt_diff(c['det_ap'])} |")
    return lines


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (finished jobs in it are reused)")
    p.add_argument("--quick", action="store_true", help="init kinds + without IAM + without L_con only")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 3 for claims)")
    p.add_argument("--jobs", type=int, default=None, help="jobs side by side (default: CPU cores, 1 on cuda)")
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--finetune-steps", type=int, default=None)
    p.add_argument("--world-seed", type=int, default=0, help="seed of the synthetic world (fixed across seeds)")
    p.add_argument("--configs", help="comma-separated subset of the rows (default: all of the mode)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    scale = 4 if args.device == "cuda" else 1
    pre_steps = args.pretrain_steps or 200 * scale
    ft_steps = args.finetune_steps or 200 * scale
    jobs = args.jobs or (1 if args.device == "cuda" else max(1, min(2, os.cpu_count() or 1)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(out, args.device)
    all_rows = rows(args.quick)
    if args.configs:
        wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = sorted(set(wanted) - {r.name for r in all_rows})
        if unknown:
            p.error(f"unknown --configs {unknown}; known: {[r.name for r in all_rows]}")
        all_rows = [r for r in all_rows if r.name in wanted]
    needed = {r.pretrain for r in all_rows if r.pretrain}
    gaps = {PRETRAINS[n][0] for n in needed} | {DEFAULT_GAP}
    mixes = {PRETRAINS[n][1] for n in needed}
    t0 = time.perf_counter()
    shards = prepare_worlds(runner, gaps, mixes, args.world_seed)
    target = out / f"world_gap{DEFAULT_GAP:g}" / "prw"     # PRW is the style reference: the same at every gap

    # Pre-training jobs first (longest first), then fine-tuning as its init becomes ready.
    results: dict = {}
    with ThreadPoolExecutor(jobs) as pool:
        pre_futures = {(n, s): pool.submit(pretrain_job, runner, n, s, shards[(PRETRAINS[n][0], PRETRAINS[n][1])],
                                           pre_steps)
                       for s in seeds for n in sorted(needed)}

        def chain(row: Row, seed: int):
            init = pre_futures[(row.pretrain, seed)].result() if row.pretrain else None
            return finetune_job(runner, row, seed, init, target, ft_steps)

        ft_futures = {(r.name, s): pool.submit(chain, r, s) for s in seeds for r in all_rows}
        for key, fut in ft_futures.items():
            results[key] = fut.result()
    configs, comps = summarise(results, seeds, all_rows)
    n_queries = sorted({v["n_queries"] for v in results.values()})
    report = {
        "configs": configs,
        "comparisons": comps,
        "protocol": {"seeds": seeds, "quick": args.quick, "device": args.device, "pretrain_steps": pre_steps,
                     "finetune_steps": ft_steps, "n_queries": n_queries[0] if len(n_queries) == 1 else n_queries,
                     "target": "synthetic PRW (size bench), PRW protocol", "world_seed": args.world_seed,
                     "domain_gaps": sorted(gaps), "pretrain_config": str(PRETRAIN_CFG.relative_to(ROOT)),
                     "finetune_config": str(FINETUNE_CFG.relative_to(ROOT)), "threads_per_job": 1, "jobs": jobs,
                     "pretrain_variants": {n: {"gap": PRETRAINS[n][0], "sources": list(PRETRAINS[n][1]),
                                               "overrides": list(PRETRAINS[n][2])} for n in sorted(needed)}},
        "timing": {"wall_s": round(time.perf_counter() - t0, 1), "jobs_s": runner.timing},
    }
    (out / "ablation.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    (out / "ablation.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'ablation.json'} and {out / 'ablation.md'} in {report['timing']['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
