"""The loader's configuration and error type, shared by every stage of the pipeline.

``DataConfig`` is the ``data:`` section of a run config (pretrain/config.py maps it
one-to-one); ``DataError`` is what every stage raises for shards, a manifest or a sample
it cannot use (the CLIs turn it into exit 2 with one line).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    """Where the shards are and how batches are made (see pretrain/data/)."""

    shards: str | None = None           # build dir holding manifest.json and the shards
    # alternative to `shards`: shard URLs or `pipe:` commands (brace patterns ok); each
    # manifest shard is matched to the one URL that contains its relative path
    urls: list[str] | None = None
    manifest: str | None = None         # manifest path; required with `urls`
    cache_dir: str | None = None        # where remote/pipe shards are fetched for random access
    splits: dict[str, list[str]] | None = None   # per dataset; None = every split in the manifest
    weights: dict[str, float] | None = None      # per dataset repeat factor per epoch; None = 1.0 each
    batch_size: int = 2                 # images per process per forward
    num_workers: int = 0
    remainder: str = "drop"             # "drop" | "pad": make the epoch a multiple of world*batch
    group_by_aspect: bool = True        # global batches of one orientation (re-ID canvases vs scenes)
    reid_canvas: str = "expand_resize"  # "expand_resize" | "random_paste" (paper Tab. 4)
    canvas_size: list[int] = field(default_factory=lambda: [600, 1200])   # (width, height); portrait like the crops
    canvas_ratio: list[float] = field(default_factory=lambda: [1.0, 3.0])  # expand_resize canvas/crop ratio
    paste_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])   # random_paste crop scale range
    flip_prob: float = 0.5
    crop_prob: float = 0.5
    crop_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])  # crop side / image side
    min_visible: float = 0.5            # a cropped box keeps >= this share of its area, else dropped
    min_box_size: float = 2.0           # px after resize; smaller boxes are dropped from that view
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.05])  # b, c, s, h
    max_pixels: int = 64_000_000        # larger JPEG headers are refused before decoding (memory bombs)
    # "tensor": torchvision.io.decode_jpeg straight to CHW uint8 (same pixels as PIL, faster);
    # "pil": PIL -> numpy -> tensor; "cuda": workers only read and check, the main process
    # decodes each batch with nvjpeg and augments it on the GPU (needs CUDA)
    decode: str = "tensor"
    verify_shards: bool = False         # re-hash every shard at start (default: hash once, cached by mtime)


class DataError(RuntimeError):
    """Shards, manifest or a sample that the loader cannot use."""
