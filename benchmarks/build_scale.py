"""LUPerson-size builds: peak memory and time of ``data_prep build`` at growing record counts.

For each size N a LUPerson LMDB copy (``keys.pkl`` + ``lmdb/``, the layout the
real 4M-crop release circulates in, read by the real parser) of N tiny crops
is generated (16 distinct 32x64 JPEGs, reused: generating is not what we
measure), then, each in a fresh process:

  parse   the parser alone (luperson.parse, every record consumed);
  build   ``data_prep build --workers W --shard-size 1000``: wall time, CPU time (main +
          workers; robust to other jobs on a shared machine) and memory of the main
          process (plan, journal, manifest live there) and of the largest worker.

Memory is reported two ways: ``anon`` = peak anonymous RSS (RssAnon of
/proc/PID/status sampled every 50 ms: the process's own heap, what grows when
records are held), and ``hwm`` = the kernel's peak RSS (VmHWM), which also
counts the pages of the memory-mapped LMDB the process has read (file cache,
shared and reclaimable; it grows with the data read, whatever the builder holds).

Prints one row per size, time per record and the ratios to the smallest size
(flat memory: anon ratio ~1; linear time: us/record ratio ~1).

Usage:  python benchmarks/build_scale.py [--sizes 10000,100000,1000000] [--workers 2]
            [--workdir DIR] [--code DIR]
``--code DIR`` runs the build from another checkout (e.g. the previous builder) for a
before/after comparison on the same inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lup_key(i: int) -> str:
    """convert_lmdb's key form: country, city, video, image indices."""
    return f"{i % 3:02d}_{(i // 3) % 2:02d}_{i % 7:04d}_{i:08d}"


def tiny_jpegs(n: int = 16) -> list[bytes]:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = np.repeat(rng.integers(0, 256, (8, 4, 3), dtype=np.uint8), 8, axis=0).repeat(8, axis=1)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_luperson_lmdb(root: Path, n: int) -> None:
    import lmdb

    (root / "lmdb").mkdir(parents=True)
    jpgs = tiny_jpegs()
    env = lmdb.open(str(root / "lmdb"), map_size=n * 2048 + (64 << 20), subdir=True, writemap=True)
    keys = [lup_key(i) for i in range(n)]
    txn = env.begin(write=True)
    for i, k in enumerate(keys):
        txn.put(k.encode("ascii"), jpgs[i % len(jpgs)])
        if i % 100_000 == 99_999:
            txn.commit()
            txn = env.begin(write=True)
    txn.commit()
    env.close()
    (root / "keys.pkl").write_bytes(pickle.dumps(keys))


def _rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024        # Linux: KiB


def _anon_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PeakSampler(threading.Thread):
    """Peak anonymous RSS of this process and of its largest descendant."""

    def __init__(self, period: float = 0.05):
        super().__init__(daemon=True)
        self.period, self.main, self.worker = period, 0.0, 0.0
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.done.wait(self.period):
            self.main = max(self.main, _anon_mb(me.pid))
            try:
                for c in me.children(recursive=True):
                    self.worker = max(self.worker, _anon_mb(c.pid))
            except psutil.Error:
                pass


def child(mode: str, src: str, out: str, workers: int) -> None:
    """Runs in a fresh process; prints one JSON line."""
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    if mode == "parse":
        from hybridps.data_prep.formats import luperson

        n = sum(1 for _ in luperson.parse(src, "train"))
    else:
        from hybridps.data_prep.build import BuildOptions, run_build

        m = run_build(BuildOptions(out_dir=Path(out), sources=[("luperson", Path(src))], shard_size=1000,
                                   workers=workers, progress=False), log=lambda _m: None)
        n = m["datasets"]["luperson"]["splits"]["train"]["samples"]
    dt = time.perf_counter() - t0
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    sampler.done.set()
    sampler.join()
    print(json.dumps({"n": n, "s": dt, "cpu": cpu, "hwm": _rss_mb(resource.RUSAGE_SELF), "anon": sampler.main,
                      "worker_anon": sampler.worker, "worker_hwm": _rss_mb(resource.RUSAGE_CHILDREN)}))


def run_child(mode: str, src: Path, out: Path, workers: int, code: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    cmd = [sys.executable, __file__, "--child", mode, str(src), str(out), str(workers)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(code))
    if res.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000", help="comma list of record counts (1000000 is opt-in)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--code", type=Path, default=REPO, help="checkout whose data_prep builds (default: this one)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="buildscale_"))
    print(f"code: {args.code}  workers: {args.workers}  python {sys.version.split()[0]}", flush=True)
    print("memory in MB: anon = peak anonymous RSS, hwm = peak RSS incl. mapped LMDB pages")
    print(f"{'records':>9} {'gen s':>6} | {'parse anon':>10} {'hwm':>6} | {'build s':>8} {'us/rec':>7} "
          f"{'cpu us/rec':>10} {'anon':>6} {'hwm':>6} | {'worker anon':>11} {'hwm':>6}", flush=True)
    rows = []
    for n in sizes:
        case = work / f"n{n}"
        shutil.rmtree(case, ignore_errors=True)
        t0 = time.perf_counter()
        write_luperson_lmdb(case / "src", n)
        gen = time.perf_counter() - t0
        parsed = run_child("parse", case / "src", case / "out", args.workers, args.code)
        built = run_child("build", case / "src", case / "out", args.workers, args.code)
        assert parsed["n"] == n and built["n"] == n, (parsed, built)
        rows.append((n, built["s"] / n * 1e6, built["anon"], built["worker_anon"], built["cpu"] / n * 1e6))
        print(f"{n:>9} {gen:>6.1f} | {parsed['anon']:>10.0f} {parsed['hwm']:>6.0f} | {built['s']:>8.1f} "
              f"{built['s'] / n * 1e6:>7.1f} {built['cpu'] / n * 1e6:>10.1f} {built['anon']:>6.0f} "
              f"{built['hwm']:>6.0f} | "
              f"{built['worker_anon']:>11.0f} {built['worker_hwm']:>6.0f}", flush=True)
        shutil.rmtree(case)
    n0, us0, anon0, w0, cpu0 = rows[0]
    for n, us, anon, w, cpu in rows[1:]:
        print(f"{n} vs {n0} records: time per record {us / us0:.2f}x (CPU {cpu / cpu0:.2f}x), "
              f"peak anon RSS main {anon / anon0:.2f}x, "
              f"largest worker {w / max(w0, 1e-9):.2f}x")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
