"""PSDiff vs NAE on the synthetic world, multi-seed (issue 12), on top of benchmarks/ablation.py.

    python benchmarks/psdiff_ablation.py --ablation runs/ablation --out runs/psdiff_ablation

Reuses the finished multi-seed ablation (``--ablation``: its synthetic PRW-format target
``world_gap1/prw``, the pre-training runs ``pretrain/default_s<seed>`` and the NAE fine-tuning
runs ``finetune/{random,full}_s<seed>`` with their evaluations) and adds PSDiff fine-tuned
with the same step budget (``--steps``, default the ablation's 200 optimizer steps of batch 2)
through ``python -m hybridps.finetune train --method psdiff`` and evaluated by the shared evaluator at
DDIM steps 1/2/4/8 (``python -m hybridps.finetune eval --ddim-steps 1,2,4,8``).

Rows: ``psdiff_random`` (random init) and ``psdiff_full`` (our pre-trained init), both with the
fine-tuned NAE of the same seed (``finetune/full_s<seed>``) as the frozen re-ID teacher;
``psdiff_full_tpre`` (optional) uses the pre-training run itself as the teacher, so no
target-trained model enters.  One thread per job, jobs side by side (``--jobs``); finished
jobs are kept.  Writes ``OUT/psdiff_ablation.json`` and ``OUT/psdiff_ablation.md``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import ROOT, Runner, _fmt, comparison_lines, paired, py  # noqa: E402

PSDIFF_CFG = ROOT / "finetune" / "configs" / "psdiff_tiny.yaml"
DDIM_STEPS = (1, 2, 4, 8)
METRICS = ("mAP", "top1", "det_ap")
# name -> (init: "none" | "pretrain", teacher: "nae_full" | "pretrain")
PSDIFF_ROWS = {"psdiff_random": ("none", "nae_full"), "psdiff_full": ("pretrain", "nae_full"),
               "psdiff_full_tpre": ("pretrain", "pretrain")}
NAE_ROWS = {"nae_random": "random", "nae_full": "full"}


def nae_result(ablation: Path, name: str, seed: int) -> dict:
    m = json.loads((ablation / "finetune" / f"{NAE_ROWS[name]}_s{seed}" / "eval" / "metrics.json").read_text())
    return {"mAP": 100 * m["search"]["mAP"], "top1": 100 * m["search"]["top1"], "det_ap": 100 * m["detection"]["ap"]}


def partial_result(runner: Runner, name: str, seed: int) -> dict:
    """The DDIM step counts whose evaluation finished (``OUT/.../eval/ddim<k>/metrics.json``)."""
    out = {}
    for k in DDIM_STEPS:
        path = runner.out / "psdiff" / f"{name}_s{seed}" / "eval" / f"ddim{k}" / "metrics.json"
        if path.is_file():
            m = json.loads(path.read_text())
            out[str(k)] = {"mAP": 100 * m["search"]["mAP"], "top1": 100 * m["search"]["top1"],
                           "det_ap": 100 * m["detection"]["ap"]}
    return out


def psdiff_job(runner: Runner, ablation: Path, name: str, seed: int, steps: int) -> dict:
    init_kind, teacher_kind = PSDIFF_ROWS[name]
    out = runner.out / "psdiff" / f"{name}_s{seed}"
    metrics = out / "eval" / "metrics.json"
    target = ablation / "world_gap1" / "prw"
    pre = ablation / "pretrain" / f"default_s{seed}"
    if not metrics.is_file():
        shutil.rmtree(out, ignore_errors=True)
        teacher = ablation / "finetune" / f"full_s{seed}" if teacher_kind == "nae_full" else pre
        init = "none" if init_kind == "none" else str(pre)
        cmd = py("-m", "hybridps.finetune", "train", "--method", "psdiff", "--config", str(PSDIFF_CFG), "--dataset", "prw",
                 "--root", str(target), "--init", init, "--init-scope", "full", "--teacher", str(teacher),
                 "--out", str(out), "--max-steps", str(steps), "--seed", str(seed))
        runner.run(f"psdiff train {name} s{seed}", cmd, runner.out / "logs" / f"train_{name}_s{seed}.log")
        cmd = py("-m", "hybridps.finetune", "eval", "--dataset", "prw", "--root", str(target), "--checkpoint", str(out),
                 "--out", str(out / "eval"), "--device", runner.device,
                 "--ddim-steps", ",".join(str(k) for k in DDIM_STEPS))
        runner.run(f"psdiff eval {name} s{seed}", cmd, runner.out / "logs" / f"eval_{name}_s{seed}.log")
    m = json.loads(metrics.read_text())
    return {str(k): {"mAP": 100 * v["mAP"], "top1": 100 * v["top1"], "det_ap": 100 * v["det_ap"]}
            for k, v in m["per_ddim_steps"].items()}


def comparisons(names: set[str]) -> list[tuple[str, str, str]]:
    pairs = []
    for k in DDIM_STEPS:
        pairs += [(f"psdiff_full@{k}", "nae_full", f"PSDiff ({k} DDIM steps) vs NAE, both from our pre-trained init"),
                  (f"psdiff_random@{k}", "nae_random", f"PSDiff ({k} DDIM steps) vs NAE, both from random init"),
                  (f"psdiff_full@{k}", f"psdiff_random@{k}", f"our pre-trained vs random init, PSDiff ({k} steps)")]
    for k in DDIM_STEPS[1:]:
        pairs += [(f"psdiff_full@{k}", "psdiff_full@1", f"{k} vs 1 DDIM steps (pre-trained init)"),
                  (f"psdiff_random@{k}", "psdiff_random@1", f"{k} vs 1 DDIM steps (random init)")]
    pairs += [("psdiff_full_tpre@8", "psdiff_full@8", "teacher: pre-training run vs fine-tuned NAE"),
              ("nae_full", "nae_random", "our pre-trained vs random init, NAE (the ablation's runs)")]
    return [p for p in pairs if p[0] in names and p[1] in names]


def markdown(report: dict) -> str:
    p = report["protocol"]
    lines = [f"Seeds {p['seeds']}; {p['steps']} fine-tuning steps (batch 2) for every row; synthetic PRW target, "
             f"PRW protocol, {p['n_queries']} queries; mean +- std over seeds (%).", "",
             "| row | DDIM steps | mAP | top-1 | det AP |", "|---|---:|---:|---:|---:|"]
    for name, row in report["rows"].items():
        lines.append(f"| {name.split('@')[0]} | {name.split('@')[1] if '@' in name else '-'} | {_fmt(row['mAP'])} | "
                     f"{_fmt(row['top1'])} | {_fmt(row['det_ap'])} |")
    return "\n".join(lines + comparison_lines(report["comparisons"])) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ablation", default="runs/ablation", help="a finished benchmarks/ablation.py output")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning optimizer steps (the ablation's NAE budget)")
    ap.add_argument("--rows", default="psdiff_random,psdiff_full", help=f"subset of {list(PSDIFF_ROWS)}")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--partial", action="store_true",
                    help="run nothing: summarise the DDIM step counts already evaluated for every seed")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(PSDIFF_ROWS))
    if unknown:
        ap.error(f"unknown --rows {unknown}; known: {list(PSDIFF_ROWS)}")
    ablation = Path(args.ablation)
    for s in seeds:
        for need in (ablation / "pretrain" / f"default_s{s}", ablation / "finetune" / f"full_s{s}" / "eval",
                     ablation / "finetune" / f"random_s{s}" / "eval", ablation / "world_gap1" / "prw"):
            if not need.exists():
                ap.error(f"{need} is missing: run benchmarks/ablation.py --quick --out {ablation} first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(out, args.device)
    t0 = time.perf_counter()
    if args.partial:
        results = {(r, s): partial_result(runner, r, s) for s in seeds for r in rows}
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {(r, s): pool.submit(psdiff_job, runner, ablation, r, s, args.steps) for s in seeds for r in rows}
            results = {key: fut.result() for key, fut in futures.items()}
    table: dict[str, dict[str, list[float]]] = {}
    for name in NAE_ROWS:
        per = [nae_result(ablation, name, s) for s in seeds]
        table[name] = {k: [p[k] for p in per] for k in METRICS}
    for name in rows:
        for k in DDIM_STEPS:
            if not all(str(k) in results[(name, s)] for s in seeds):
                continue                                   # --partial: not evaluated on every seed yet
            per = [results[(name, s)][str(k)] for s in seeds]
            table[f"{name}@{k}"] = {m: [p[m] for p in per] for m in METRICS}
    comps = [{"a": a, "b": b, "what": what, **{m: paired(table[a][m], table[b][m]) for m in METRICS}}
             for a, b, what in comparisons(set(table))]
    n_queries = json.loads((ablation / "finetune" / f"full_s{seeds[0]}" / "eval" / "metrics.json").read_text())
    report = {"rows": table, "comparisons": comps,
              "protocol": {"seeds": seeds, "steps": args.steps, "ddim_steps": list(DDIM_STEPS), "device": args.device,
                           "n_queries": n_queries["search"]["n_queries"], "ablation": str(ablation),
                           "psdiff_config": str(PSDIFF_CFG.relative_to(ROOT)), "threads_per_job": 1,
                           "psdiff_rows": {r: {"init": PSDIFF_ROWS[r][0], "teacher": PSDIFF_ROWS[r][1]} for r in rows},
                           "nae_rows": "the ablation's finetune/{random,full}_s<seed> (finetune/configs/tiny.yaml)"},
              "timing": {"wall_s": round(time.perf_counter() - t0, 1), "jobs_s": runner.timing}}
    stem = "psdiff_ablation_partial" if args.partial else "psdiff_ablation"
    report["protocol"]["partial"] = args.partial
    tmp = out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    tmp.replace(out / f"{stem}.json")
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
