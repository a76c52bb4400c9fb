"""What a build is asked to do, as plain data (the CLI fills this in)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANVAS_MODES = ("none", "expand_resize", "random_paste")
MAX_PIXELS = 64_000_000      # = data_prep.imageio.MAX_PIXELS (options stay free of imports)
MAX_CANVAS_SIDE = 4096       # a 40000x40000 canvas is 4.8 GB per image
MAX_SIDE_LIMIT = 65535       # --max-side: JPEG's own limit per side


class BuildError(Exception):
    """A problem with the build's inputs or arguments; the CLI prints the
    message and exits with status 2."""


@dataclass
class CanvasOptions:
    """How re-ID crops are baked onto canvases (see :mod:`data_prep.canvas`)."""

    mode: str = "none"
    size: tuple[int, int] = (256, 512)          # (W, H) of the output canvas
    ratio_range: tuple[float, float] = (1.0, 3.0)  # expand_resize, per axis
    scale_range: tuple[float, float] = (1.0, 1.0)  # random_paste
    fill: str = "mean"

    def to_dict(self) -> dict:
        if self.mode == "none":
            return {"mode": "none"}
        d = {"mode": self.mode, "size": list(self.size), "fill": self.fill}
        if self.mode == "expand_resize":
            d["ratio_range"] = list(self.ratio_range)
        else:
            d["scale_range"] = list(self.scale_range)
        return d


@dataclass
class BuildOptions:
    out_dir: Path
    sources: list[tuple[str, Path]]                 # (dataset, root) in domain order
    splits: dict[str, tuple[str, ...]] = field(default_factory=dict)  # default: DEFAULT_SPLITS
    shard_size: int = 1000
    limits: dict[str, int] = field(default_factory=dict)
    canvas: CanvasOptions = field(default_factory=CanvasOptions)
    jpeg_quality: int = 95
    seed: int = 0
    format_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_pixels: int = MAX_PIXELS
    verify_decode: bool = False
    max_side: int | None = None                     # downscale so the longer side is at most this
    # Below: how to run, not what to produce (not part of the fingerprint).
    workers: int = 1
    strict: bool = False
    overwrite: bool = False
    progress: bool = True

    def output_spec(self, resolved_splits: dict[str, tuple[str, ...]]) -> dict:
        """Everything that determines the bytes of the output."""
        return {
            "sources": [[name, str(Path(root).resolve())] for name, root in self.sources],
            "splits": {name: list(s) for name, s in resolved_splits.items()},
            "shard_size": self.shard_size,
            "limits": dict(sorted(self.limits.items())),
            "canvas": self.canvas.to_dict(),
            "jpeg_quality": self.jpeg_quality,
            "seed": self.seed,
            "format_options": {k: dict(sorted(v.items())) for k, v in sorted(self.format_options.items())},
            # only when not the default, so builds made before these options keep their fingerprint
            **({"max_pixels": self.max_pixels} if self.max_pixels != MAX_PIXELS else {}),
            **({"verify_decode": True} if self.verify_decode else {}),
            **({"max_side": self.max_side} if self.max_side is not None else {}),
        }


def fingerprint(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
