"""One-command GPU check: the hybrid step at the paper's size, the loader, and the CLI chain.

    python benchmarks/gpu_check.py                      # on a CUDA machine, <= 8 minutes
    python benchmarks/gpu_check.py --json runs/gpu_check.json --out runs/gpu_check
    python benchmarks/gpu_check.py --dry-run-cpu        # every stage, tiny sizes, on the CPU (a test)

Stages, each timed and reported in one table (and ``--json``):

1. ``matmul``: the bf16 matmul peak of this card, measured now (best of repeated n x n x n
   products), the denominator of the MFU.
2. ``hybrid step``: ResNet-50 at 900x1500 (two views, SimSiam, both IAMs, OIM), bf16 autocast,
   forward + backward + SGD step: median time, FLOPs of one step from
   ``torch.utils.flop_counter.FlopCounterMode`` -> achieved TFLOP/s and MFU, peak memory.
3. ``largest batch``: images per GPU doubled from 1 until CUDA runs out of memory (or
   ``--max-batch``); the largest batch that ran and its peak memory.
4. ``loader``: the pre-training loader (read -> decode -> unify -> two views -> collate) over
   a synthetic build, images/s with ``--workers`` workers.  Decoding is on the CPU: the loader
   on this commit has no GPU decode option.
5. ``chain``: ``data_prep synth`` -> ``data_prep build`` -> ``python -m hybridps.pretrain`` ->
   ``python -m hybridps.finetune train`` -> ``python -m hybridps.finetune eval`` on the synthetic world; wall
   time of each and the resulting mAP (a smoke test of the whole path, not a result).

Without a CUDA device it prints "no GPU" and exits 0 (CI never runs it), unless
``--dry-run-cpu`` asks for the tiny CPU run of every stage (ResNet-18, tiny images, 2 steps),
which only proves the script works; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

SOURCES = ("crowdhuman", "msmt17")       # one detection and one re-ID set: both IAMs have 2 domains


# --------------------------------------------------------------------------- settings
def settings(args) -> dict:
    if args.dry_run_cpu:
        # tiny_config's RPN/RoI sizes: the RoI head (layer4 on every sampled RoI) dominates otherwise
        # fp32 without autocast: CPU bf16 autocast is slow and not the code the GPU runs anyway
        return dict(device="cpu", dtype=torch.float32, mm_n=256, mm_reps=3, backbone="resnet18", size=(96, 128),
                    model=dict(anchor_sizes=[16, 32, 64], rpn_pre_nms_train=300, rpn_post_nms_train=64,
                               rpn_batch_size=64, roi_batch_size=8, roi_output_size=7, cq_size=64),
                    batch=1, steps=1, warmup=0, max_batch=2, world="tiny", loader_batches=2, workers=1,
                    pre_steps=1, ft_steps=1)
    return dict(device="cuda", dtype=torch.bfloat16, mm_n=8192, mm_reps=20, backbone="resnet50", size=(900, 1500),
                model={},
                batch=args.batch, steps=args.steps, warmup=2, max_batch=args.max_batch, world="small",
                loader_batches=args.loader_batches, workers=args.workers, pre_steps=args.pretrain_steps,
                ft_steps=args.finetune_steps)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- stage 1: matmul peak
def matmul_peak(s: dict, device: torch.device) -> dict:
    n = s["mm_n"]
    a = torch.randn(n, n, device=device, dtype=s["dtype"])
    b = torch.randn(n, n, device=device, dtype=s["dtype"])
    for _ in range(2):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(s["mm_reps"]):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return {"n": n, "dtype": str(s["dtype"]).replace("torch.", ""), "tflops": 2 * n ** 3 / best / 1e12}


# --------------------------------------------------------------------------- stage 2/3: hybrid step
class HybridBench:
    """A ResNet hybrid model, an SGD optimizer and synthetic two-view batches of any size."""

    def __init__(self, s: dict, device: torch.device) -> None:
        from hybridps.pretrain.hybrid import HybridConfig, HybridModel
        from hybridps.pretrain.model import ModelConfig

        h, w = s["size"]
        self.s, self.device, self.h, self.w = s, device, h, w
        cfg = ModelConfig(**{"backbone": s["backbone"], "min_size": h, "max_size": w, "num_pids": 5532,
                             "cq_size": 5000, **s["model"]})
        torch.manual_seed(0)
        self.model = HybridModel(cfg, HybridConfig(num_domains=2)).to(device).train()
        self.opt = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def batch(self, n: int) -> dict:
        from train_step import synthetic_view

        domain = torch.arange(n) % 2
        return {"view1": synthetic_view(n, self.h, self.w, 0, self.device),
                "view2": synthetic_view(n, self.h, self.w, 1, self.device),
                "domain": domain.to(self.device), "labeled": domain == 0}

    def step(self, batch: dict) -> None:
        with torch.autocast(device_type=self.device.type, dtype=self.s["dtype"],
                            enabled=self.s["dtype"] != torch.float32):
            loss = self.model(batch)["loss"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def reset_memory(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if self.device.type == "cuda" else None


def hybrid_step(bench: HybridBench, s: dict, peak_tflops: float) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    batch = bench.batch(s["batch"])
    for _ in range(s["warmup"]):
        bench.step(batch)
    bench.reset_memory()
    times = []
    for _ in range(s["steps"]):
        sync(bench.device)
        t0 = time.perf_counter()
        bench.step(batch)
        sync(bench.device)
        times.append(time.perf_counter() - t0)
    peak = bench.peak_gib()
    counter = FlopCounterMode(display=False)
    with counter:
        bench.step(batch)
    flops = counter.get_total_flops()
    t = statistics.median(times)
    achieved = flops / t / 1e12
    return {"batch": s["batch"], "image": list(s["size"]), "backbone": s["backbone"], "step_s": t,
            "dtype": str(s["dtype"]).replace("torch.", ""),
            "step_s_all": [round(v, 4) for v in times], "gflop_per_step": flops / 1e9, "tflops": achieved,
            "mfu": achieved / peak_tflops if peak_tflops > 0 else None, "peak_mem_gib": peak}


def largest_batch(bench: HybridBench, s: dict) -> dict:
    """Double the images per GPU until out of memory; the last batch that ran."""
    ok, peak_at_ok, failed = None, None, None
    n = 1
    while n <= s["max_batch"]:
        bench.reset_memory()
        try:
            bench.step(bench.batch(n))
            sync(bench.device)
        except torch.cuda.OutOfMemoryError:
            failed = n
            bench.reset_memory()
            break
        ok, peak_at_ok = n, bench.peak_gib()
        n *= 2
    bench.reset_memory()
    return {"largest_batch": ok, "peak_mem_gib_at_largest": peak_at_ok, "first_oom_batch": failed,
            "cap": s["max_batch"]}


# --------------------------------------------------------------------------- stage 5 helpers: CLIs
def run_cli(args: list[str], log: Path, env: dict) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
        raise RuntimeError(f"{' '.join(args[:3])} failed (exit {proc.returncode}), log {log}:\n{tail}")
    return time.perf_counter() - t0


def make_world(s: dict, out: Path, env: dict) -> tuple[Path, Path, dict]:
    world, shards = out / "world", out / "shards"
    times = {"synth_s": run_cli(["-m", "hybridps.data_prep", "synth", str(world), "--seed", "0", "--size", s["world"],
                                 "--only", ",".join(SOURCES + ("prw",))], out / "synth.log", env)}
    build = ["-m", "hybridps.data_prep", "build", str(shards), "--seed", "0"]
    for src in SOURCES:
        build += ["--source", f"{src}={world / src}"]
    times["build_s"] = run_cli(build, out / "build.log", env)
    return world, shards, times


# --------------------------------------------------------------------------- stage 4: loader
def loader_speed(s: dict, shards: Path) -> dict:
    from hybridps.pretrain.augment import ViewParams
    from hybridps.pretrain.config import load_config
    from hybridps.pretrain.data import PretrainLoader, open_source
    from hybridps.pretrain.train import resolve_for_data

    # paper.yaml's data settings (canvases, augmentation, batch 4); its weights name the five
    # paper datasets, the check's build has two: every dataset of the build once per epoch.
    config = ROOT / "pretrain" / "configs" / "paper.yaml"
    cfg = load_config(config, [f"data.shards={shards}", f"data.num_workers={s['workers']}", "data.weights=null"])
    source = open_source(cfg.data.shards)
    cfg = resolve_for_data(cfg, source)
    it = iter(PretrainLoader(source, cfg.data, ViewParams.from_config(cfg.data, cfg.model), seed=0))
    next(it)                                   # worker start-up and shard indexing
    t0 = time.perf_counter()
    images = 0
    for _ in range(s["loader_batches"]):
        images += len(next(it)["view1"]["images"])
    dt = time.perf_counter() - t0
    return {"images_per_s": images / dt, "images": images, "workers": s["workers"], "decode": "cpu",
            "config": str(config.relative_to(ROOT)), "batch_size": cfg.data.batch_size,
            "note": "synthetic world images (small); the loader has no GPU decode option on this commit"}


# --------------------------------------------------------------------------- stage 5: chain
def chain(s: dict, world: Path, shards: Path, out: Path, env: dict) -> dict:
    pre, ft = out / "pretrain", out / "finetune"
    times = {}
    times["pretrain_s"] = run_cli(["-m", "hybridps.pretrain", "--config", str(ROOT / "pretrain/configs/tiny.yaml"),
                                   "--shards", str(shards), "--out", str(pre), "--max-steps", str(s["pre_steps"]),
                                   "train.seed=0", "train.log_with=null", "train.progress=false"],
                                  out / "pretrain.log", env)
    times["finetune_s"] = run_cli(["-m", "hybridps.finetune", "train", "--config", str(ROOT / "finetune/configs/tiny.yaml"),
                                   "--dataset", "prw", "--root", str(world / "prw"), "--init", str(pre),
                                   "--init-scope", "full", "--out", str(ft), "--max-steps", str(s["ft_steps"]),
                                   "--seed", "0"], out / "finetune.log", env)
    times["eval_s"] = run_cli(["-m", "hybridps.finetune", "eval", "--dataset", "prw", "--root", str(world / "prw"),
                               "--checkpoint", str(ft), "--out", str(ft / "eval"), "--device", s["device"]],
                              out / "eval.log", env)
    m = json.loads((ft / "eval" / "metrics.json").read_text())
    return {**times, "pretrain_steps": s["pre_steps"], "finetune_steps": s["ft_steps"],
            "mAP": 100 * m["search"]["mAP"], "top1": 100 * m["search"]["top1"],
            "n_queries": m["search"]["n_queries"]}


# --------------------------------------------------------------------------- report
def _f(v, fmt: str = "{:.3g}") -> str:
    return "-" if v is None else fmt.format(v)


def table(r: dict) -> str:
    rows = [("device", r["device"])]
    mm = r.get("matmul")
    if mm:
        rows.append((f"{mm['dtype']} matmul peak ({mm['n']}^3)", f"{mm['tflops']:.1f} TFLOP/s"))
    h = r.get("hybrid_step")
    if h:
        rows += [(f"hybrid step {h['backbone']} {h['image'][0]}x{h['image'][1]} {h['dtype']}, batch {h['batch']}/GPU",
                  f"{h['step_s'] * 1e3:.1f} ms"),
                 ("  FLOPs per step (FlopCounterMode)", f"{h['gflop_per_step']:.1f} GFLOP"),
                 ("  achieved", f"{h['tflops']:.2f} TFLOP/s"),
                 ("  MFU (vs the matmul peak above)", _f(h["mfu"] and 100 * h["mfu"], "{:.1f} %")),
                 ("  peak memory", _f(h["peak_mem_gib"], "{:.2f} GiB"))]
    b = r.get("largest_batch")
    if b:
        rows.append(("largest batch per GPU (doubling)",
                     f"{b['largest_batch']} (peak {_f(b['peak_mem_gib_at_largest'], '{:.1f}')} GiB; "
                     f"first OOM at {b['first_oom_batch'] or 'none up to ' + str(b['cap'])})"))
    ld = r.get("loader")
    if ld:
        rows.append((f"loader ({ld['workers']} workers, {ld['decode']} decode, {ld['config']})",
                     f"{ld['images_per_s']:.1f} images/s"))
    c = r.get("chain")
    if c:
        rows.append((f"chain: synth {r['world_times']['synth_s']:.0f}s, build {r['world_times']['build_s']:.0f}s, "
                     f"pretrain {c['pretrain_steps']} steps {c['pretrain_s']:.0f}s, finetune {c['finetune_steps']} "
                     f"steps {c['finetune_s']:.0f}s, eval {c['eval_s']:.0f}s",
                     f"mAP {c['mAP']:.2f} ({c['n_queries']} queries)"))
    for name, why in r.get("skipped", {}).items():
        rows.append((name, f"skipped: {why}"))
    rows.append(("total wall time", f"{r['wall_s']:.0f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(["| " + "check".ljust(width) + " | result |", "|" + "-" * (width + 2) + "|---|"] +
                     [f"| {k.ljust(width)} | {v} |" for k, v in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run-cpu", action="store_true", help="run every stage with tiny sizes on the CPU")
    p.add_argument("--out", help="work folder for the world, shards and CLI runs (default: a temporary one)")
    p.add_argument("--json", help="write the results here as well")
    p.add_argument("--batch", type=int, default=2, help="images per GPU of the timed hybrid step")
    p.add_argument("--steps", type=int, default=10, help="timed hybrid steps")
    p.add_argument("--max-batch", type=int, default=64, help="stop doubling the batch here")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers")
    p.add_argument("--loader-batches", type=int, default=50)
    p.add_argument("--pretrain-steps", type=int, default=100)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--budget-s", type=float, default=480, help="skip stages that would start after this")
    args = p.parse_args(argv)
    if min(args.batch, args.steps, args.max_batch, args.loader_batches, args.pretrain_steps,
           args.finetune_steps) < 1 or args.workers < 0:
        p.error("counts must be >= 1 (--workers >= 0)")
    if not args.dry_run_cpu and not torch.cuda.is_available():
        print("no GPU: CUDA is not available here; nothing measured (use --dry-run-cpu to exercise the stages)")
        return 0
    s = settings(args)
    device = torch.device(s["device"])
    t_start = time.perf_counter()
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
                    "torch": torch.__version__, "dry_run_cpu": args.dry_run_cpu, "skipped": {}}
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("HYBRIDPS_DEBUG", None)
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""

    def budget_left() -> bool:
        return time.perf_counter() - t_start < args.budget_s

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        result["matmul"] = matmul_peak(s, device)
        print(f"matmul peak: {result['matmul']['tflops']:.1f} TFLOP/s", flush=True)
        bench = HybridBench(s, device)
        result["hybrid_step"] = hybrid_step(bench, s, result["matmul"]["tflops"])
        print(f"hybrid step: {result['hybrid_step']['step_s'] * 1e3:.1f} ms", flush=True)
        if budget_left():
            result["largest_batch"] = largest_batch(bench, s)
            print(f"largest batch: {result['largest_batch']['largest_batch']}", flush=True)
        else:
            result["skipped"]["largest batch"] = "time budget"
        del bench
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        world, shards, result["world_times"] = make_world(s, out, env)
        result["loader"] = loader_speed(s, shards)
        print(f"loader: {result['loader']['images_per_s']:.1f} images/s", flush=True)
        if budget_left():
            result["chain"] = chain(s, world, shards, out, env)
        else:
            result["skipped"]["chain"] = "time budget"
        result["wall_s"] = time.perf_counter() - t_start
    print()
    print(table(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = path.with_name(path.name + ".tmp")
        tmp_path.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp_path, path)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:
        code = 130
    except Exception as e:          # noqa: BLE001 - one line unless debugging
        if os.environ.get("HYBRIDPS_DEBUG"):
            raise
        print(f"gpu_check: error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)
