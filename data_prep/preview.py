"""A contact sheet of shard samples, to eyeball a build (PIL only).

Each tile shows one sampled image letterboxed into a square, its boxes in a
colour per global id labelled with that id (``?`` for ``-1``), ignore regions
as dashed grey rectangles and the dataset name in the corner.
"""
from __future__ import annotations

import io
import json
import math
import random
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

GREY = (160, 160, 160)
BACKGROUND = (32, 32, 32)


def pid_colour(pid: int) -> tuple[int, int, int]:
    """A stable, saturated colour per id; white for unlabeled (-1)."""
    if pid < 0:
        return (255, 255, 255)
    import colorsys

    h = (pid * 0.61803398875) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def read_samples(shard: Path) -> list[dict]:
    """``[{"__key__", "jpg", "json"}]`` of one shard, in file order (webdataset
    grouping: consecutive members sharing the key before the first dot)."""
    samples: list[dict] = []
    with tarfile.open(shard, "r") as tf:
        for member in tf:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][ext] = tf.extractfile(member).read()
    return [s for s in samples if "jpg" in s and "json" in s]


def pick_samples(shards: Sequence[Path], n: int, seed: int = 0) -> list[dict]:
    """Up to ``n`` samples spread over datasets: shards are grouped by their
    folder (one dataset per folder in a build), groups take turns, and each
    group reads its shards in a seeded random order until it has enough."""
    rng = random.Random(seed)
    groups: dict[str, list[Path]] = defaultdict(list)
    for s in shards:
        groups[Path(s).parent.name].append(Path(s))
    names = sorted(groups)
    if not names:
        return []
    quota = {g: n // len(names) + (1 if i < n % len(names) else 0) for i, g in enumerate(names)}
    picked: list[dict] = []
    leftovers: list[dict] = []
    for g in names:
        order = groups[g][:]
        rng.shuffle(order)
        pool: list[dict] = []
        for shard in order:
            pool += read_samples(shard)
            if len(pool) >= 4 * quota[g]:
                break
        rng.shuffle(pool)
        picked += pool[: quota[g]]
        leftovers += pool[quota[g]:]
    # Groups smaller than their quota leave room: fill it from what was read.
    picked += leftovers[: max(0, n - len(picked))]
    return picked


def _dashed_rect(draw: ImageDraw.ImageDraw, box, colour, dash: int = 4) -> None:
    x1, y1, x2, y2 = box
    for (ax, ay, bx, by) in ((x1, y1, x2, y1), (x2, y1, x2, y2), (x2, y2, x1, y2), (x1, y2, x1, y1)):
        length = math.hypot(bx - ax, by - ay)
        steps = max(1, int(length // dash))
        for k in range(0, steps, 2):
            t0, t1 = k / steps, min(1.0, (k + 1) / steps)
            draw.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                      fill=colour, width=1)


def render_tile(sample: dict, tile: int) -> Image.Image:
    meta = json.loads(sample["json"])
    img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
    scale = min(tile / img.width, tile / img.height)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    canvas = Image.new("RGB", (tile, tile), BACKGROUND)
    ox, oy = (tile - w) // 2, (tile - h) // 2
    canvas.paste(img.resize((w, h), Image.BILINEAR), (ox, oy))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()

    def place(b):
        return [ox + b[0] * scale, oy + b[1] * scale, ox + b[2] * scale, oy + b[3] * scale]

    for box in meta.get("ignore", []):
        _dashed_rect(draw, place(box), GREY)
    for box, pid in zip(meta.get("boxes", []), meta.get("pids", [])):
        b = place(box)
        colour = pid_colour(pid)
        draw.rectangle(b, outline=colour, width=2)
        draw.text((b[0] + 2, b[1] + 1), "?" if pid < 0 else str(pid), fill=colour, font=font)
    label = f"{meta.get('dataset', '?')}/{meta.get('split', '?')}"
    draw.rectangle([0, tile - 12, min(tile, 6 * len(label) + 4), tile], fill=(0, 0, 0))
    draw.text((2, tile - 12), label, fill=(255, 255, 255), font=font)
    return canvas


def grid_shape(n: int) -> tuple[int, int]:
    cols = max(1, math.ceil(math.sqrt(n)))
    return cols, max(1, math.ceil(n / cols))


def make_grid(samples: Sequence[dict], tile: int = 256, n: int | None = None) -> Image.Image:
    """Tiles in a ``cols x rows`` grid sized for ``n`` (default: len(samples))."""
    cols, rows = grid_shape(n or len(samples) or 1)
    sheet = Image.new("RGB", (cols * tile, rows * tile), BACKGROUND)
    for i, s in enumerate(samples[: cols * rows]):
        sheet.paste(render_tile(s, tile), ((i % cols) * tile, (i // cols) * tile))
    return sheet


def preview(shards: Sequence[Path], out: Path, n: int = 16, seed: int = 0, tile: int = 256) -> tuple[Path, int]:
    """Write the contact sheet; returns (path, number of samples drawn)."""
    samples = pick_samples(shards, n, seed)
    make_grid(samples, tile, n).save(out)
    return Path(out), len(samples)
