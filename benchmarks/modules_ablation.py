"""Multi-seed ablation of the UGAS / IIDFC fine-tuning options on the synthetic world.

    python benchmarks/modules_ablation.py --out runs/modules            # every row, 3 seeds
    python benchmarks/modules_ablation.py --out runs/modules --configs full+all,full+ugas,full+iidfc

Same protocol and machinery as ``benchmarks/ablation.py`` (imported, not copied): the fixed
synthetic world, pre-training runs ``OUT/pretrain/default_s{seed}`` (made if missing), NAE
fine-tuning on the synthetic PRW target with ``finetune train`` + ``finetune eval``, one thread
per job, paired differences with 95% t-intervals over the seeds.  The rows here add model
options to the fine-tuning command (``model.ugas_*`` / ``model.iidfc_*`` overrides); ``random``
and ``full`` are the plain NAE rows of ``benchmarks/ablation.py`` (same job names, so finished
results of that benchmark can be hard-linked into OUT and are reused).

Writes ``OUT/modules_ablation.json`` and ``OUT/modules_ablation.md``; only rows whose every seed
finished are tabulated (``--partial`` tabulates finished seeds of unfinished rows too, marked).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ablation as ab  # noqa: E402  (benchmarks/ablation.py)

UGAS = ("model.ugas_sfm=true", "model.ugas_distill=true", "model.ugas_uncertainty=true")
IIDFC = ("model.iidfc_fc=true", "model.iidfc_pam=true")
OPTIONS = {
    "": (),
    "+ugas": UGAS,
    "+iidfc": IIDFC,
    "+all": UGAS + IIDFC,
    "+sfm": ("model.ugas_sfm=true",),
    "+sfm_sd": ("model.ugas_sfm=true", "model.ugas_distill=true"),
    "+ug": ("model.ugas_uncertainty=true",),
    "+fc": ("model.iidfc_fc=true",),
    "+pam": ("model.iidfc_pam=true",),
}
# priority order: + all vs NAE from the pre-trained init, then each module, then random init,
# then the single components
ORDER = ["full", "full+all", "full+ugas", "full+iidfc", "random", "random+all", "random+ugas", "random+iidfc",
         "full+sfm", "full+sfm_sd", "full+ug", "full+fc", "full+pam"]


def row_of(name: str) -> tuple[ab.Row, tuple[str, ...]]:
    init, _, opt = name.partition("+")
    if init not in ("random", "full") or ("+" + opt if opt else "") not in OPTIONS:
        raise ValueError(name)
    return ab.Row(name, None if init == "random" else "default"), OPTIONS["+" + opt if opt else ""]


def comparisons(names: set[str]) -> list[tuple[str, str, str]]:
    pairs = []
    for init in ("full", "random"):
        for opt, what in (("+all", "UGAS + IIDFC"), ("+ugas", "UGAS (SFM + SD + UG)"), ("+iidfc", "IIDFC (FC + PAM)"),
                          ("+sfm", "SFM"), ("+sfm_sd", "SFM + self-distillation"), ("+ug", "uncertainty guidance"),
                          ("+fc", "FC loss"), ("+pam", "PAM")):
            pairs.append((init + opt, init, f"{what}, {'pre-trained' if init == 'full' else 'random'} init"))
    pairs.append(("full+all", "random+all", "pre-training with UGAS + IIDFC"))
    return [p for p in pairs if p[0] in names and p[1] in names]


def summarise(results: dict, seeds: list[int], names: list[str], partial: bool) -> tuple[dict, list[dict]]:
    configs = {}
    for name in names:
        done = [s for s in seeds if (name, s) in results]
        if not done or (len(done) < len(seeds) and not partial):
            continue
        per = [results[(name, s)] for s in done]
        row, opts = row_of(name)
        configs[name] = {"seeds": done, "paper": " ".join(opts) or "plain NAE", "pretrain": row.pretrain,
                         "complete": len(done) == len(seeds),
                         **{k: [p[k] for p in per] for k in ("mAP", "top1", "det_ap")}}
    comps = []
    for a, b, what in comparisons(set(configs)):
        common = [s for s in configs[a]["seeds"] if s in configs[b]["seeds"]]
        pick = lambda c, k: [c[k][c["seeds"].index(s)] for s in common]  # noqa: E731
        comps.append({"a": a, "b": b, "what": what, "seeds": common,
                      **{k: ab.paired(pick(configs[a], k), pick(configs[b], k)) for k in ("mAP", "top1", "det_ap")}})
    return configs, comps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (finished jobs in it are reused)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--finetune-steps", type=int, default=None)
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--configs", help=f"comma-separated rows in run order (default: {','.join(ORDER)})")
    p.add_argument("--partial", action="store_true", help="also tabulate rows with some seeds missing")
    p.add_argument("--report-only", action="store_true", help="tabulate finished jobs, run nothing")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    names = [c.strip() for c in args.configs.split(",") if c.strip()] if args.configs else list(ORDER)
    for n in names:
        try:
            row_of(n)
        except ValueError:
            p.error(f"unknown config {n!r}; known: {ORDER}")
    scale = 4 if args.device == "cuda" else 1
    pre_steps = args.pretrain_steps or 200 * scale
    ft_steps = args.finetune_steps or 200 * scale
    jobs = args.jobs or (1 if args.device == "cuda" else 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = ab.Runner(out, args.device)
    target = out / f"world_gap{ab.DEFAULT_GAP:g}" / "prw"
    t0 = time.perf_counter()
    results: dict = {}

    def finished(name: str, seed: int) -> dict | None:
        tag = name.replace("%", "pct").replace("@", "_")
        f = out / "finetune" / f"{tag}_s{seed}" / "eval" / "metrics.json"
        if not f.is_file():
            return None
        m = json.loads(f.read_text())
        return {"mAP": 100 * m["search"]["mAP"], "top1": 100 * m["search"]["top1"],
                "det_ap": 100 * m["detection"]["ap"], "n_queries": m["search"]["n_queries"]}

    if args.report_only:
        for n in names:
            for s in seeds:
                r = finished(n, s)
                if r is not None:
                    results[(n, s)] = r
    else:
        shards = ab.prepare_worlds(runner, {ab.DEFAULT_GAP}, {ab.SOURCES5}, args.world_seed)
        with ThreadPoolExecutor(jobs) as pool:
            pre = {s: pool.submit(ab.pretrain_job, runner, "default", s, shards[(ab.DEFAULT_GAP, ab.SOURCES5)],
                                  pre_steps) for s in seeds}

            def chain(name: str, seed: int) -> dict:
                row, opts = row_of(name)
                init = pre[seed].result() if row.pretrain else None
                return ab.finetune_job(runner, row, seed, init, target, ft_steps, opts)

            futures = {(n, s): pool.submit(chain, n, s) for n in names for s in seeds}
            for key, fut in futures.items():
                try:
                    results[key] = fut.result()
                except RuntimeError as e:
                    print(f"{key}: {e}", file=sys.stderr)
    configs, comps = summarise(results, seeds, names, args.partial)
    n_queries = sorted({v["n_queries"] for v in results.values()})
    report = {"configs": configs, "comparisons": comps,
              "protocol": {"seeds": seeds, "device": args.device, "pretrain_steps": pre_steps,
                           "finetune_steps": ft_steps, "n_queries": n_queries[0] if len(n_queries) == 1 else n_queries,
                           "target": "synthetic PRW (size bench), PRW protocol", "world_seed": args.world_seed,
                           "finetune_config": str(ab.FINETUNE_CFG.relative_to(ab.ROOT)), "threads_per_job": 1,
                           "jobs": jobs, "options": {k: list(v) for k, v in OPTIONS.items() if k}},
              "timing": {"wall_s": round(time.perf_counter() - t0, 1), "jobs_s": runner.timing}}
    tmp = out / "modules_ablation.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    tmp.replace(out / "modules_ablation.json")
    md = ab.markdown({**report, "protocol": {**report["protocol"], "seeds": seeds}})
    tmp = out / "modules_ablation.md.tmp"
    tmp.write_text(md)
    tmp.replace(out / "modules_ablation.md")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
