"""The pre-training loader against the JPEG decode limit, on realistic image sizes.

Generates (data_prep.synth.render, real release layouts, real parsers, real
``data_prep build``) three builds:

  scenes   CrowdHuman-like 1000x700 scenes;
  frames   1920x1080 video frames (PRW / PoseTrack size);
  canvases Market-like 64x128 crops baked onto 256x512 re-ID canvases;

plus scenes and frames again with ``--max-side M``.  Then, in one process:

  decode limit  megapixels per CPU second (= per core) decoding every JPEG of the build:
                PIL (open -> RGB -> numpy -> CHW tensor) and torchvision.io.decode_jpeg;
  stages        the loader's own stages up to the decode (read by offset, json and header
                checks, decode to a contiguous CHW tensor), one core, against that limit;
  whole loader  read -> check -> decode -> unify -> two views at the model size -> collate,
                one epoch through a DataLoader, with data.decode=pil and =tensor, for each
                --workers value: images per CPU second (workers' CPU included) and per wall
                second (workers only pay off on cores nobody else uses);
  identical     the first batches of the pil and tensor decoders compared exactly;
  --max-side    whole loader and decode alone, with and without it (the same records);
  ffcv          when ``import ffcv`` works: ffcv's own JPEG path (RGBImageField, quality 95,
                SimpleRGBImageDecoder, one worker) against torchvision's decode of the same
                canvases (ffcv's decoders need one image size, so only the canvases qualify).

Usage:  python benchmarks/loader.py [--n 24] [--workers 0,2] [--max-side 1500]
            [--min-size 900 --max-size 1500] [--threads 1] [--repeat 3] [--workdir DIR]
Rates are the best of --repeat epochs, the compared paths alternated (the machine is shared).
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shard_build import write_crowdhuman, write_market  # noqa: E402  (benchmarks/ is not a package)

from hybridps.data_prep.build import BuildOptions, CanvasOptions, run_build  # noqa: E402
from hybridps.data_prep.manifest import shard_paths  # noqa: E402
from hybridps.data_prep.preview import read_samples  # noqa: E402
from hybridps.pretrain import data as D  # noqa: E402
from hybridps.pretrain.augment import ViewParams  # noqa: E402


def build(src: list[tuple[str, Path]], out: Path, max_side: int | None = None, canvas: bool = False) -> Path:
    opts = BuildOptions(out_dir=out, sources=src, shard_size=64, workers=2, progress=False, max_side=max_side,
                        canvas=CanvasOptions("expand_resize", (256, 512)) if canvas else CanvasOptions())
    run_build(opts, log=lambda _m: None)
    return out


def jpegs(build_dir: Path) -> list[bytes]:
    man = json.loads((build_dir / "manifest.json").read_text())
    return [s["jpg"] for p in shard_paths(man, build_dir) for s in read_samples(p)]


def decode_pil(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def decode_tv(data: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def decode_limit(blobs: list[bytes], fn, windows: int = 3, seconds: float = 0.5) -> float:
    """Megapixels per second of one core decoding ``blobs`` (best of ``windows`` timed windows)."""
    best = 0.0
    for _ in range(windows):
        mp, t0 = 0.0, time.process_time()
        while time.process_time() - t0 < seconds:
            for b in blobs:
                img = fn(b)
                mp += img.shape[1] * img.shape[2] / 1e6
        best = max(best, mp / (time.process_time() - t0))
    return best


def decode_rate(blobs: list[bytes], windows: int = 3, seconds: float = 0.5) -> float:
    """Images per second of one core decoding ``blobs`` with torchvision (best window)."""
    best = 0.0
    for _ in range(windows):
        n, t0 = 0, time.process_time()
        while time.process_time() - t0 < seconds:
            for b in blobs:
                decode_tv(b)
            n += len(blobs)
        best = max(best, n / (time.process_time() - t0))
    return best


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (dataloader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def loader_rate(build_dir: Path, decoder: str, workers: int, params: ViewParams) -> tuple[float, float, dict]:
    """(images per wall second, images per CPU second, first batch) over one whole epoch of
    the real loader stages (EpochDataset in a DataLoader, as PretrainLoader runs it; the
    workers are joined before the CPU time is read, so theirs counts)."""
    src = D.open_source(str(build_dir))
    cfg = D.DataConfig(shards=str(build_dir), batch_size=2, num_workers=workers, decode=decoder,
                       group_by_aspect=False)
    loader = D.PretrainLoader(src, cfg, params, seed=0)
    if workers:
        loader.index_shards()
    ds = loader.epoch_dataset(0)
    images, first = 0, None
    c0, t0 = _cpu_seconds(), time.perf_counter()
    for batch in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=D._identity):
        first = first or batch
        images += len(batch["keys"])
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return images / wall, images / cpu, first


def stage_rate(build_dir: Path, decoder: str) -> float:
    """Images per second of the loader's own stages up to the decode (read by offset ->
    json and header checks -> decode), one core, every sample of the build once."""
    src = D.open_source(str(build_dir))
    reader = D.ShardReader(src.shards)
    items = [(k, (s, i, 0), 0) for k, (s, i) in
             enumerate((s, i) for s, info in enumerate(src.shards) for i in range(info.samples))]
    for s in range(len(src.shards)):
        reader.index(s)
    t0 = time.process_time()
    n = sum(1 for _ in D.decode_samples(D.read_samples(items, reader), decoder=decoder))
    return n / (time.process_time() - t0)


def same_batch(a: dict, b: dict) -> bool:
    return a["keys"] == b["keys"] and all(
        torch.equal(x, y) for v in ("view1", "view2") for x, y in zip(a[v]["images"], b[v]["images"]))


def ffcv_vs_torchvision(canvas_dir: Path, work: Path, reps: int) -> tuple[float, float] | None:
    try:
        from ffcv.fields import RGBImageField
        from ffcv.fields.decoders import SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import ToTensor
        from ffcv.writer import DatasetWriter
    except Exception as e:       # not installed, or its native parts do not load
        print(f"ffcv: not measured ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return None
    blobs = jpegs(canvas_dir) * reps
    arrays = [np.array(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]

    class Canvases(torch.utils.data.Dataset):
        def __len__(self):
            return len(arrays)

        def __getitem__(self, i):
            return (arrays[i],)

    beton = work / "canvases.beton"
    DatasetWriter(str(beton), {"image": RGBImageField(write_mode="jpg", jpeg_quality=95)},
                  num_workers=1).from_indexed_dataset(Canvases())
    loader = Loader(str(beton), batch_size=16, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()]})
    for _ in loader:             # first pass: numba compiles the pipeline
        pass
    ffcv_rate = tv_rate = 0.0
    for _ in range(3):           # best of 3; CPU time of the process (ffcv's workers are threads)
        n, t0 = 0, time.process_time()
        for (img,) in loader:
            n += len(img)
        ffcv_rate = max(ffcv_rate, n / (time.process_time() - t0))
        t0 = time.process_time()
        for b in blobs:
            decode_tv(b)
        tv_rate = max(tv_rate, len(blobs) / (time.process_time() - t0))
    return ffcv_rate, tv_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=24, help="images per build")
    ap.add_argument("--workers", default="0,2", help="comma list of data.num_workers values")
    ap.add_argument("--max-side", type=int, default=1500, help="default: the views' long-side cap (paper 1500)")
    ap.add_argument("--min-size", type=int, default=900, help="view short side (paper: 900)")
    ap.add_argument("--max-size", type=int, default=1500, help="view long side cap (paper: 1500)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--repeat", type=int, default=3, help="timed epochs per path, alternated; best is kept")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)   # torchvision 0.29 points at torchcodec
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loaderbench_"))
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    write_crowdhuman(work / "src" / "scenes" / "crowdhuman", args.n, size=(1000, 700))
    write_crowdhuman(work / "src" / "frames" / "crowdhuman", args.n, size=(1920, 1080))
    write_market(work / "src" / "crops" / "market1501", args.n)
    sets = {
        "scenes 1000x700": [("crowdhuman", work / "src" / "scenes" / "crowdhuman")],
        "frames 1920x1080": [("crowdhuman", work / "src" / "frames" / "crowdhuman")],
        "canvases 256x512": [("market1501", work / "src" / "crops" / "market1501")],
    }
    builds = {name: build(src, work / f"b{i}", canvas=name.startswith("canvases"))
              for i, (name, src) in enumerate(sets.items())}
    small = {name: build(src, work / f"m{i}", max_side=args.max_side)
             for i, (name, src) in enumerate(sets.items()) if not name.startswith("canvases")}
    print(f"inputs: {args.n} images per set, built in {time.perf_counter() - t0:.0f}s; views "
          f"{args.min_size}/{args.max_size}; torch threads {args.threads}; python {sys.version.split()[0]}, "
          f"torch {torch.__version__}", flush=True)
    params = ViewParams(min_size=(args.min_size,), max_size=args.max_size)
    workers = [int(w) for w in args.workers.split(",")]

    print(f"\nrates per CPU second (= per core; workers' CPU included), best of {args.repeat} alternated runs")
    print(f"{'set':<18} {'path':<26} {'img/s':>8} {'MP/s':>7} {'/ tv limit':>10} {'wall img/s':>11}")
    speedups = []
    for name, bdir in builds.items():
        blobs = jpegs(bdir)
        mp_per_img = float(np.mean([decode_tv(b).shape[1] * decode_tv(b).shape[2] for b in blobs])) / 1e6
        lim_pil, lim_tv = decode_limit(blobs, decode_pil), decode_limit(blobs, decode_tv)

        def row(path, ips, wall=None):
            print(f"{name:<18} {path:<26} {ips:8.1f} {ips * mp_per_img:7.1f} {ips * mp_per_img / lim_tv:9.2f}x "
                  + (f"{wall:11.2f}" if wall is not None else ""), flush=True)

        row("decode limit PIL", lim_pil / mp_per_img)
        row("decode limit torchvision", lim_tv / mp_per_img)
        for dec in ("pil", "tensor"):
            row(f"read+check+decode {dec}", max(stage_rate(bdir, dec) for _ in range(args.repeat)))
        firsts = {}
        for w in workers:
            cpu_rate, wall_rate = {}, {}
            for _ in range(args.repeat):         # alternated, best of: the machine is shared
                for dec in ("pil", "tensor"):
                    wall, cpu, first = loader_rate(bdir, dec, w, params)
                    firsts.setdefault(dec, first)
                    cpu_rate[dec] = max(cpu_rate.get(dec, 0.0), cpu)
                    wall_rate[dec] = max(wall_rate.get(dec, 0.0), wall)
            for dec in ("pil", "tensor"):
                row(f"whole loader {dec} w={w}", cpu_rate[dec], wall_rate[dec])
            speedups.append((name, w, cpu_rate["tensor"] / cpu_rate["pil"]))
        print(f"{name:<18} first batches identical (pil vs tensor decode): "
              f"{same_batch(firsts['pil'], firsts['tensor'])}", flush=True)
    print("\nwhole loader, tensor / pil decode (per CPU second): "
          + ", ".join(f"{n.split()[0]} w={w} {r:.2f}x" for n, w, r in speedups))

    print(f"\n--max-side {args.max_side} (data.decode=tensor, workers=0, per CPU second):")
    for name, bdir in small.items():
        full = max(loader_rate(builds[name], "tensor", 0, params)[1] for _ in range(args.repeat))
        reduced = max(loader_rate(bdir, "tensor", 0, params)[1] for _ in range(args.repeat))
        dec_full, dec_small = decode_rate(jpegs(builds[name])), decode_rate(jpegs(bdir))
        print(f"  {name:<18} whole loader {full:6.2f} -> {reduced:6.2f} img/s ({reduced / full:.2f}x); "
              f"decode alone {dec_full:6.1f} -> {dec_small:6.1f} img/s ({dec_small / dec_full:.2f}x)", flush=True)

    res = ffcv_vs_torchvision(builds["canvases 256x512"], work, reps=8)
    if res is not None:
        ffcv_rate, tv_rate = res
        print(f"\nffcv read+decode (1 worker, batch 16) {ffcv_rate:.0f} img/s vs torchvision decode_jpeg "
              f"{tv_rate:.0f} img/s, per CPU second: ffcv/tv = {ffcv_rate / tv_rate:.2f}x (256x512 canvases)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
