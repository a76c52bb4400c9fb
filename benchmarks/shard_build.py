"""Shard-build throughput: our builder (JPEG pass-through) vs a naive writer
that decodes and re-encodes every image.

Generates, with data_prep.synth.render, a CrowdHuman-layout copy of 640x480
scenes and a Market-1501-layout copy of 64x128 crops (real release layouts,
read by the real parsers), then times in one run:

  (a) ``data_prep build`` with --workers 1 and --workers 2;
  (b) a naive writer: same parsers, each image decoded with PIL and
      re-encoded to JPEG (quality 95), written to the same kind of tar shards.

Usage:  python benchmarks/shard_build.py [--scenes 150] [--crops 300] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from hybridps.data_prep.build import BuildOptions, run_build
from hybridps.data_prep.formats import get_format
from hybridps.data_prep.record import Record
from hybridps.data_prep.synth.render import STYLES, appearance_for, encode, place_people, render_crop, render_scene

SEED = 0


def write_crowdhuman(root: Path, n: int, size=(640, 480)) -> int:
    """CrowdHuman release layout: annotation_train.odgt + Images/<ID>.jpg."""
    (root / "Images").mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    lines = []
    for i in range(n):
        boxes = place_people(rng, size[0], size[1], int(rng.integers(3, 8)))
        people = [(appearance_for(SEED, "bench", f"{i}_{k}"), b) for k, b in enumerate(boxes)]
        img = render_scene(STYLES["crowdhuman"], size[0], size[1], people, rng, occluders=2)
        ident = f"{100000 + i},{i:012x}"
        (root / "Images" / f"{ident}.jpg").write_bytes(encode(img, "JPEG", 90))
        gt = [{"tag": "person", "fbox": [round(b[0]), round(b[1]), round(b[2] - b[0]), round(b[3] - b[1])],
               "vbox": [round(b[0]), round(b[1]), round(b[2] - b[0]), round(b[3] - b[1])], "extra": {}}
              for b in boxes]
        lines.append(json.dumps({"ID": ident, "gtboxes": gt}))
    (root / "annotation_train.odgt").write_text("\n".join(lines) + "\n")
    return n


def write_market(root: Path, n: int, size=(64, 128)) -> int:
    """Market-1501 release layout: bounding_box_train/<pid>_c<cam>s1_<frame>_01.jpg."""
    d = root / "Market-1501-v15.09.15" / "bounding_box_train"
    d.mkdir(parents=True)
    rng = np.random.default_rng(SEED + 1)
    for i in range(n):
        pid, cam = 1 + i // 6, 1 + i % 6
        img = render_crop(STYLES["market1501"], appearance_for(SEED, "bench", pid), size[0], size[1], rng)
        (d / f"{pid:04d}_c{cam}s1_{i:06d}_01.jpg").write_bytes(encode(img, "JPEG", 90))
    return n


def warm_cache(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            p.read_bytes()


def time_builder(sources, out: Path, workers: int) -> tuple[float, int]:
    opts = BuildOptions(out_dir=out, sources=sources, shard_size=100, workers=workers, progress=False)
    t0 = time.perf_counter()
    m = run_build(opts, log=lambda _m: None)
    dt = time.perf_counter() - t0
    return dt, sum(e["samples"] for d in m["datasets"].values() for e in d["splits"].values())


def time_naive(sources, out: Path, shard_size: int = 100) -> tuple[float, int]:
    """Decode + re-encode every image with PIL, write tar shards with TarWriter."""
    import webdataset as wds

    t0 = time.perf_counter()
    n = 0
    for name, root in sources:
        records = [r for r in get_format(name).parse(root, "train") if isinstance(r, Record)]
        (out / name).mkdir(parents=True)
        sink = None
        for i, rec in enumerate(records):
            if i % shard_size == 0:
                if sink is not None:
                    sink.close()
                sink = wds.TarWriter(str(out / name / f"train-{i // shard_size:06d}.tar"))
            with Image.open(rec.image.path) as im:
                rgb = im.convert("RGB")
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=95)
            meta = {"dataset": name, "boxes": rec.boxes, "ids": rec.ids, "width": rgb.width, "height": rgb.height}
            sink.write({"__key__": f"{name}-train-{rec.key}", "jpg": buf.getvalue(), "json": json.dumps(meta)})
            n += 1
        if sink is not None:
            sink.close()
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=150, help="640x480 CrowdHuman-layout scenes")
    ap.add_argument("--crops", type=int, default=300, help="64x128 Market-layout crops")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    import webdataset  # noqa: F401  (its torch import is not what we measure)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="shardbench_"))
    if work.exists():
        shutil.rmtree(work)
    t0 = time.perf_counter()
    write_crowdhuman(work / "src" / "crowdhuman", args.scenes)
    write_market(work / "src" / "market1501", args.crops)
    src_mb = sum(p.stat().st_size for p in (work / "src").rglob("*.jpg")) / 1e6
    print(f"inputs: {args.scenes} scenes 640x480 + {args.crops} crops 64x128 "
          f"({src_mb:.1f} MB of JPEG), generated in {time.perf_counter() - t0:.1f}s")
    sources = [("crowdhuman", work / "src" / "crowdhuman"), ("market1501", work / "src" / "market1501")]
    warm_cache(work / "src")

    results = {}
    for label, fn in (
        ("naive decode+re-encode", lambda: time_naive(sources, work / "naive")),
        ("builder workers=1", lambda: time_builder(sources, work / "built1", 1)),
        ("builder workers=2", lambda: time_builder(sources, work / "built2", 2)),
    ):
        dt, n = fn()
        results[label] = n / dt
        print(f"{label:>24}: {n} images in {dt:6.2f}s = {n / dt:8.1f} images/s")
    naive = results["naive decode+re-encode"]
    for label in ("builder workers=1", "builder workers=2"):
        print(f"{label:>24}: {results[label] / naive:.1f}x the naive writer")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
