"""The pre-training loader: small webdataset-style stages over plain dicts.

Pipeline (each stage is a generator function you can test on its own)::

    epoch_plan -> equalize -> rank_batches -> worker_batches      (addresses only)
      -> read_samples -> decode_samples -> unify_reid -> make_views -> collate

Why an explicit *plan* instead of streaming shards through
``split_by_node``/``split_by_worker``: the paper mixes datasets of very
different sizes with per-dataset weights, and a distributed run must give
every rank exactly the same number of batches (uneven counts deadlock the
gradient all-reduce) while no sample is seen twice across ranks.  Shard-level
splitting cannot guarantee either.  So the epoch is planned over *sample
addresses* ``(shard, index in shard, repeat)`` known from the manifest; the
plan is a pure function of ``(seed, epoch)`` and every rank computes the same
one, takes its interleaved slice, and each dataloader worker takes every
``num_workers``-th batch of that slice.  Samples are then read by byte offset
from the (uncompressed) tar shards; remote or ``pipe:`` shards are first
fetched once into a local cache (checked against the manifest sha256).

Epoch semantics:

* per-dataset quota = ``weight * n_samples``: the integer part repeats every
  sample, the fractional part adds a seeded random subset (new each epoch);
  repeats get keys ``<key>@<r>`` so each plan entry is unique;
* the plan is shuffled with a generator seeded by ``(seed, epoch)``;
* ``remainder="drop"`` truncates the plan to a multiple of
  ``world * batch_size`` (the dropped tail is a different random set every
  epoch); ``"pad"`` repeats the head of the shuffled plan to fill the last
  global batch (the only duplicates in an epoch);
* augmentation randomness is seeded per plan position, so batches do not
  depend on the number of workers, and a resumed run (which skips the batches
  already consumed, without reading them) sees the same data.

The loader is never passed through ``accelerator.prepare``: accelerate would
dispatch or re-shard it (see the README, "Data pipeline").
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hybridps.pretrain.augment import ViewParams, make_two_views
from hybridps.pretrain.integrity import (IntegrityError, check_header, check_manifest, check_meta, check_pixels, check_shard,
                                jpeg_header, open_image)


@dataclass
class DataConfig:
    """Where the shards are and how batches are made (see pretrain/data.py)."""

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


# --------------------------------------------------------------------------- source
@dataclass(frozen=True)
class ShardInfo:
    dataset: str
    split: str
    url: str            # local path, or a URL / `pipe:` command
    samples: int
    sha256: str | None
    domain: int | None = None           # manifest domain of the dataset (checked per sample)
    id_range: tuple[int, int] | None = None
    size: int | None = None             # bytes, when the manifest records it


@dataclass
class ShardSource:
    """The manifest plus where each shard's bytes are."""

    manifest: dict
    manifest_sha256: str
    shards: list[ShardInfo]

    @property
    def num_ids(self) -> int:
        return int(self.manifest["num_ids"])

    @property
    def domains(self) -> list[str]:
        return list(self.manifest["domains"])


def _manifest_shards(manifest: dict, splits: dict[str, list[str]] | None) -> list[tuple[str, str, dict]]:
    """(dataset, split, shard entry) in manifest order, restricted to ``splits``."""
    datasets = manifest.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise DataError("manifest has no 'datasets'")
    if splits:
        unknown = sorted(set(splits) - set(datasets))
        if unknown:
            raise DataError(f"data.splits names datasets not in the manifest: {unknown}")
    out = []
    for name, entry in datasets.items():
        wanted = (splits or {}).get(name)
        available = entry.get("splits", {})
        if wanted is not None:
            missing = sorted(set(wanted) - set(available))
            if missing:
                raise DataError(f"{name}: splits {missing} not in the manifest (has {sorted(available)})")
        for split, info in available.items():
            if wanted is not None and split not in wanted:
                continue
            for shard in info.get("shards", []):
                out.append((name, split, shard))
    return out


def _read_manifest(path: Path) -> tuple[dict, str]:
    if not path.is_file():
        raise DataError(f"manifest not found: {path} (build shards with `python -m hybridps.data_prep build`)")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: manifest must be a JSON object, got {type(manifest).__name__}")
    for key in ("num_ids", "domains", "datasets"):
        if key not in manifest:
            raise DataError(f"{path}: manifest lacks {key!r}")
    try:
        check_manifest(manifest, str(path))
    except IntegrityError as e:
        raise DataError(str(e)) from None
    return manifest, hashlib.sha256(raw).hexdigest()


def _id_range(entry: dict) -> tuple[int, int] | None:
    r = entry.get("id_range")
    return (r[0], r[1]) if isinstance(r, list) and len(r) == 2 else None


def _match_urls(urls: Sequence[str], rel_paths: list[str]) -> list[str]:
    """Map each manifest shard path to the one URL that contains it."""
    import braceexpand

    expanded = [u for pattern in urls for u in braceexpand.braceexpand(pattern)]
    out = []
    for rel in rel_paths:
        hits = [u for u in expanded if rel in u]
        if len(hits) != 1:
            what = "no URL" if not hits else f"{len(hits)} URLs"
            raise DataError(f"manifest shard {rel!r} matches {what} in data.urls")
        out.append(hits[0])
    return out


def open_source(shards: str | None = None, urls: Sequence[str] | None = None,
                manifest: str | None = None, splits: dict | None = None) -> ShardSource:
    """Resolve a build directory (or URLs + manifest) into a :class:`ShardSource`."""
    if urls:
        if not manifest:
            raise DataError("shard URLs need a manifest path")
        man, sha = _read_manifest(Path(manifest))
        entries = _manifest_shards(man, splits)
        locations = _match_urls(urls, [e[2]["path"] for e in entries])
    elif shards or manifest:
        man_path = Path(manifest) if manifest else Path(shards) / "manifest.json"
        man, sha = _read_manifest(man_path)
        root = Path(shards) if shards else man_path.parent
        entries = _manifest_shards(man, splits)
        locations = [str(root / e[2]["path"]) for e in entries]
    else:
        raise DataError("no data: give --shards DIR (a data_prep build) or data.urls + data.manifest")
    infos = [ShardInfo(d, s, loc, int(e["samples"]), e.get("sha256"), man["datasets"][d].get("domain"),
                       _id_range(man["datasets"][d]), e.get("size", e.get("bytes")))
             for (d, s, e), loc in zip(entries, locations)]
    return ShardSource(man, sha, infos)


# --------------------------------------------------------------------------- random access to tar shards
_KEY_RE = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")   # webdataset's key/extension split


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def fetch_to_cache(url: str, cache_dir: str | Path, sha256: str | None) -> Path:
    """Copy a remote/`pipe:` shard into ``cache_dir`` once (atomic rename, so
    concurrent workers are harmless) and verify it against the manifest."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = sha256 or hashlib.sha256(url.encode()).hexdigest()
    target = cache_dir / f"{name}.tar"
    if target.is_file():
        return target
    tmp = cache_dir / f".{name}.{uuid.uuid4().hex}.part"
    digest = hashlib.sha256()
    try:
        with wds.gopen(url, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not fetch shard {url!r}: {e}") from None
    if sha256 and digest.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise DataError(f"shard {url!r}: sha256 {digest.hexdigest()} != manifest {sha256}")
    os.replace(tmp, target)
    return target


class ShardReader:
    """Reads sample ``i`` of shard ``s`` by byte offset.  Indexes and file
    handles are built lazily, so each dataloader worker keeps its own."""

    def __init__(self, shards: Sequence[ShardInfo], cache_dir: str | None = None, verify: bool = False):
        self.shards = list(shards)
        self.cache_dir = cache_dir
        self.verify = verify            # re-hash even shards the verification cache knows
        self._checked: set[int] = set()
        self._index: dict[int, list[tuple[str, dict[str, tuple[int, int]]]]] = {}
        self._files: dict[int, Any] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def _local_path(self, s: int) -> str:
        info = self.shards[s]
        if not _is_remote(info.url):
            if not os.path.isfile(info.url):
                raise DataError(f"shard not found: {info.url}")
            path = info.url
        elif self.cache_dir is None:
            raise DataError(f"shard {info.url!r} is remote: set data.cache_dir for the local copy")
        else:
            path = str(fetch_to_cache(info.url, self.cache_dir, info.sha256))
        if s not in self._checked:
            # the bytes must be the build's: a tampered shard would otherwise train silently
            try:
                check_shard(path, info.sha256, info.size, force=self.verify, cache_dir=self.cache_dir)
            except IntegrityError as e:
                raise DataError(str(e)) from None
            self._checked.add(s)
        return path

    def index(self, s: int) -> list[tuple[str, dict[str, tuple[int, int]]]]:
        """[(key, {ext: (offset, size)})] of shard ``s`` in tar order."""
        if s not in self._index:
            path = self._local_path(s)
            samples: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with tarfile.open(path, "r:") as tf:
                    for m in tf:
                        if not m.isfile():
                            continue
                        hit = _KEY_RE.match(m.name)
                        if hit is None:
                            continue
                        samples.setdefault(hit.group(1), {})[hit.group(2)] = (m.offset_data, m.size)
            except tarfile.TarError as e:
                raise DataError(f"{path}: not a readable tar shard ({e})") from None
            expected = self.shards[s].samples
            if len(samples) != expected:
                raise DataError(f"{path}: {len(samples)} samples but the manifest says {expected}")
            self._index[s] = list(samples.items())
        return self._index[s]

    def expect(self, s: int) -> dict:
        """What the manifest says every sample of shard ``s`` must satisfy."""
        info = self.shards[s]
        return {"domain": info.domain, "id_range": info.id_range}

    def key(self, s: int, i: int) -> str:
        return self.index(s)[i][0]

    def read(self, s: int, i: int) -> dict:
        """The raw webdataset sample ``{"__key__", "<ext>": bytes, ...}``."""
        key, members = self.index(s)[i]
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = open(self._local_path(s), "rb")
        sample: dict[str, Any] = {"__key__": key}
        for ext, (offset, size) in members.items():
            f.seek(offset)
            sample[ext] = f.read(size)
        return sample


# --------------------------------------------------------------------------- the epoch plan
PlanItem = tuple[int, int, int]   # (shard index, sample index in shard, repeat)


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]))


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def dataset_weights(source: ShardSource, weights: dict[str, float] | None) -> dict[str, float]:
    """Per-dataset weights for the datasets present in the source; every
    dataset must be named (weight 0 excludes one) so nothing is mixed in by accident."""
    present = sorted({s.dataset for s in source.shards}, key=lambda d: source.manifest["datasets"][d]["domain"])
    if weights is None:
        return {d: 1.0 for d in present}
    unknown = sorted(set(weights) - set(source.manifest["datasets"]))
    if unknown:
        raise DataError(f"data.weights names datasets not in the manifest: {unknown}")
    missing = [d for d in present if d not in weights]
    if missing:
        raise DataError(f"data.weights has no weight for {missing}; add e.g. data.weights.{missing[0]}=0 to exclude it")
    return {d: float(weights[d]) for d in present}


def epoch_plan(source: ShardSource, weights: dict[str, float], seed: int, epoch: int) -> list[PlanItem]:
    """The shuffled list of sample addresses of one epoch (pure in seed/epoch)."""
    by_dataset: dict[str, list[tuple[int, int]]] = {}
    for s, info in enumerate(source.shards):
        by_dataset.setdefault(info.dataset, []).extend((s, i) for i in range(info.samples))
    plan: list[PlanItem] = []
    for name in sorted(by_dataset):
        addresses = by_dataset[name]
        w = weights.get(name, 0.0)
        whole, frac = int(w), w - int(w)
        for r in range(whole):
            plan.extend((s, i, r) for s, i in addresses)
        extra = int(round(frac * len(addresses)))
        if extra:
            pick = _rng(seed, epoch, _stable_int(name)).choice(len(addresses), size=extra, replace=False)
            plan.extend((*addresses[j], whole) for j in sorted(pick))
    if not plan:
        raise DataError("the epoch plan is empty: every dataset has weight 0 or no samples")
    order = _rng(seed, epoch, 0x5EED).permutation(len(plan))
    return [plan[j] for j in order]


def equalize(plan: list, world: int, batch_size: int, remainder: str = "drop") -> list:
    """Make the plan a multiple of ``world * batch_size`` so every rank gets
    the same number of full batches."""
    step = world * batch_size
    if remainder == "drop":
        n = len(plan) - len(plan) % step
        if n == 0:
            raise DataError(f"epoch of {len(plan)} samples is smaller than one global batch ({step})")
        return plan[:n]
    if remainder == "pad":
        short = -len(plan) % step
        return plan + [plan[j % len(plan)] for j in range(short)]
    raise DataError(f"remainder must be 'drop' or 'pad', got {remainder!r}")


def aspect_groups(source: ShardSource, canvas_size: Sequence[int]) -> list[int]:
    """Orientation group of each shard: 1 for re-ID crops (they end on ``canvas_size``
    canvases, portrait by default), 0 for detection / person-search scenes (landscape)."""
    portrait = int(canvas_size[1] > canvas_size[0])
    tasks = {name: d.get("task") for name, d in source.manifest["datasets"].items()}
    return [portrait if tasks.get(info.dataset) == "reid" else 0 for info in source.shards]


def group_by_aspect(plan: list, shard_group: Sequence[int], step: int) -> list:
    """Reorder an equalized plan so that every global batch (``step`` consecutive entries)
    holds images of one orientation where possible (torchvision's GroupedBatchSampler idea).

    Walks the shuffled plan, fills one buffer per group and emits a buffer as a global batch
    when it is full; what is left at the end (less than one batch per group) forms the last,
    mixed batches.  The result is a permutation of ``plan`` (same entries, so rank coverage
    and the no-duplicate property hold) and a pure function of it.  A portrait canvas next to
    a landscape scene pads the batch to nearly square: the padding costs compute and lets the
    detection IAM's discriminator win on padding."""
    if len(plan) % step:
        raise DataError("plan length must be a multiple of world*batch_size (call equalize first)")
    buffers: dict[int, list] = {}
    out: list = []
    for item in plan:
        buf = buffers.setdefault(shard_group[item[0]], [])
        buf.append(item)
        if len(buf) == step:
            out.extend(buf)
            buf.clear()
    for group in sorted(buffers):
        out.extend(buffers[group])
    return out


def rank_batches(n_plan: int, rank: int, world: int, batch_size: int) -> list[list[int]]:
    """Plan positions of each batch of ``rank``: ranks interleave over the
    plan, so global step ``b`` uses positions ``[b*world*B, (b+1)*world*B)``."""
    if n_plan % (world * batch_size):
        raise DataError("plan length must be a multiple of world*batch_size (call equalize first)")
    mine = list(range(rank, n_plan, world))
    return [mine[j:j + batch_size] for j in range(0, len(mine), batch_size)]


def worker_batches(n_batches: int, start: int, worker: int, num_workers: int) -> list[int]:
    """Batch indices ``>= start`` handled by ``worker``; torch's DataLoader
    visits workers round-robin, so this reproduces the rank's batch order."""
    return [b for b in range(start, n_batches) if (b - start) % num_workers == worker]


def plan_keys(reader: ShardReader, plan: Sequence[PlanItem]) -> list[str]:
    """Unique sample keys of plan entries (``key@r`` for repeats)."""
    return [_plan_key(reader.key(s, i), r) for s, i, r in plan]


def _plan_key(key: str, repeat: int) -> str:
    return key if repeat == 0 else f"{key}@{repeat}"


# --------------------------------------------------------------------------- sample stages
def read_samples(items: Iterable[tuple[int, PlanItem, int]], reader: ShardReader) -> Iterator[dict]:
    """(plan position, address, aug seed) -> raw sample dicts."""
    for pos, (s, i, r), seed in items:
        sample = reader.read(s, i)
        sample["__key__"] = _plan_key(sample["__key__"], r)
        sample["__pos__"] = pos
        sample["__seed__"] = seed
        sample["__shard__"] = reader.shards[s].url
        sample["__expect__"] = reader.expect(s)
        yield sample


_REQUIRED = ("domain", "task", "labeled", "width", "height", "boxes", "pids")


DECODERS = ("tensor", "pil", "cuda")


def _pil_to_chw(im) -> torch.Tensor:
    return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def _jpeg_tensor(data: bytes) -> torch.Tensor:
    # a writable copy: torch.frombuffer on immutable bytes warns, and the copy costs ~1% of the decode
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_jpeg_chw(data: bytes, where: str, size: tuple[int, int]) -> torch.Tensor:
    """libjpeg-turbo (torchvision.io) into a uint8 [3, H, W] tensor: no PIL image and no HWC
    numpy array.  The pixels equal PIL's (tests/test_loader_decode.py).  decode_jpeg returns
    a CHW view of HWC memory; one contiguous copy (~0.6 ms for a 1000x700 scene) makes the two
    views' resize and colour jitter ~25% faster (benchmarks/loader.py)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        image = decode_jpeg(_jpeg_tensor(data), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise DataError(f"{where}: image does not decode ({str(e).splitlines()[-1]})") from None
    if tuple(image.shape[1:]) != (size[1], size[0]):
        raise DataError(f"{where}: decoded {tuple(image.shape[1:])} but the header says {size[0]}x{size[1]}")
    return image.contiguous()


def _decode_one(sample: dict, max_pixels: int = DataConfig.max_pixels, decoder: str = "tensor") -> dict:
    where = f"sample {sample['__key__']} ({sample.get('__shard__', '?')})"
    if "jpg" not in sample or "json" not in sample:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise DataError(f"{where}: needs 'jpg' and 'json' members, has {members}")
    try:
        meta = json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: bad json ({e})") from None
    missing = [k for k in _REQUIRED if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DataError(f"{where}: json lacks {missing}")
    # header and json first: nothing is decoded or turned into tensors before it is known to fit
    image = None
    try:
        jw, jh = check_header(meta, where)
        # greyscale / YCbCr JPEGs go to libjpeg-turbo (or nvjpeg) on a header read here;
        # CMYK, PNG bytes and anything unusual keep PIL's open and conversion
        header = jpeg_header(sample["jpg"]) if decoder != "pil" else None
        if header is not None and header[2] in (1, 3):
            w, h = header[:2]
            check_pixels(w, h, where, max_pixels)
            if (w, h) != (jw, jh):
                raise DataError(f"{where}: image is {w}x{h} but json says {jw}x{jh}")
            check_meta(meta, where, sample.get("__expect__"))
            if decoder == "tensor":
                image = decode_jpeg_chw(sample["jpg"], where, (w, h))
        else:
            with open_image(sample["jpg"], where, max_pixels) as im:
                w, h = im.size
                if (w, h) != (jw, jh):
                    raise DataError(f"{where}: image is {w}x{h} but json says {jw}x{jh}")
                check_meta(meta, where, sample.get("__expect__"))
                image = _pil_to_chw(im)
    except IntegrityError as e:
        raise DataError(str(e)) from None
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: image does not decode ({e})") from None
    boxes = torch.tensor(meta["boxes"], dtype=torch.float32).reshape(-1, 4)
    pids = torch.tensor(meta["pids"], dtype=torch.int64).reshape(-1)
    if len(boxes) != len(pids):
        raise DataError(f"{where}: {len(boxes)} boxes but {len(pids)} pids")
    return {
        "__key__": sample["__key__"], "__pos__": sample.get("__pos__", 0), "__seed__": sample.get("__seed__", 0),
        "image": image,             # None: a JPEG left for decode_on_device (decoder "cuda")
        "jpg": sample["jpg"] if image is None else None, "size": (w, h), "where": where,
        "boxes": boxes,
        "pids": pids,
        "ignore": torch.tensor(meta.get("ignore") or [], dtype=torch.float32).reshape(-1, 4),
        "domain": int(meta["domain"]),
        "labeled": bool(meta["labeled"]),
        "task": meta["task"],
        "dataset": meta.get("dataset", ""),
        "canvas": meta.get("canvas"),
    }


def decode_samples(samples: Iterable[dict], max_pixels: int = DataConfig.max_pixels,
                   decoder: str = "tensor") -> Iterator[dict]:
    """JPEG bytes + json -> uint8 CHW image and box/pid tensors (with decoder "cuda" the
    JPEG stays encoded, checked, for :func:`decode_on_device`)."""
    for sample in samples:
        yield _decode_one(sample, max_pixels, decoder)


def decode_on_device(samples: list[dict], device: str | torch.device = "cuda") -> list[dict]:
    """Decode the JPEGs of a batch together with nvjpeg (``torchvision.io.decode_jpeg``
    on a list, ``device="cuda"``); samples already decoded on the CPU move to ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    todo = [s for s in samples if s["image"] is None]
    if todo:
        try:
            images = decode_jpeg([_jpeg_tensor(s["jpg"]) for s in todo], mode=ImageReadMode.RGB, device=device)
        except RuntimeError as e:
            keys = ", ".join(s["__key__"] for s in todo)
            raise DataError(f"GPU JPEG decode failed for one of {keys}: {str(e).splitlines()[-1]}") from None
        for s, img in zip(todo, images):
            w, h = s["size"]
            if tuple(img.shape[1:]) != (h, w):
                raise DataError(f"{s['where']}: decoded {tuple(img.shape[1:])} but the header says {w}x{h}")
            s["image"], s["jpg"] = img.contiguous(), None
    for s in samples:
        s["image"] = s["image"].to(device)
    return samples


def unify_reid(samples: Iterable[dict], mode: str = "expand_resize", out_size: Sequence[int] = (256, 512),
               ratio_range: Sequence[float] = (1.0, 3.0), scale_range: Sequence[float] = (1.0, 1.0)) -> Iterator[dict]:
    """Put re-ID crops that were not baked onto a canvas by the builder
    (task "reid", canvas null) on a canvas online (paper: data unification)."""
    from hybridps.data_prep import canvas

    for sample in samples:
        if sample["task"] == "reid" and sample["canvas"] is None:
            rng = _rng(sample["__seed__"], 0xCA)
            device = sample["image"].device          # the canvas is drawn with numpy on the CPU
            img = sample["image"].permute(1, 2, 0).cpu().numpy()
            if mode == "expand_resize":
                out, boxes = canvas.expand_resize(img, sample["boxes"].numpy(), rng, out_size, ratio_range)
            elif mode == "random_paste":
                out, boxes = canvas.random_paste(img, sample["boxes"].numpy(), rng, out_size, scale_range)
            else:
                raise DataError(f"unknown re-ID canvas mode {mode!r}")
            sample = dict(sample, image=torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).to(device),
                          boxes=torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                          canvas={"mode": mode, "online": True})
        yield sample


def make_views(samples: Iterable[dict], params: ViewParams) -> Iterator[dict]:
    """Two independently augmented views per image (pretrain/augment.py)."""
    for sample in samples:
        rng = _rng(sample["__seed__"], 0xA6)
        v1, v2 = make_two_views(sample["image"], sample["boxes"], sample["pids"], sample["ignore"], rng, params)
        out = {k: v for k, v in sample.items() if k not in ("image", "boxes", "pids", "ignore")}
        out["view1"], out["view2"] = v1, v2
        yield out


def collate(samples: Sequence[dict]) -> dict:
    """List of viewed samples -> the batch the trainer consumes (keys last:
    accelerate's batch-size probing trips over a leading list of strings)."""
    def view(name):
        return {
            "images": [s[name]["image"] for s in samples],
            "targets": [{k: s[name][k] for k in ("boxes", "pids", "track", "ignore")} for s in samples],
        }

    return {
        "view1": view("view1"),
        "view2": view("view2"),
        "domain": torch.tensor([s["domain"] for s in samples], dtype=torch.int64),
        "labeled": torch.tensor([s["labeled"] for s in samples], dtype=torch.bool),
        "keys": [s["__key__"] for s in samples],
    }


def view_stages(samples: Iterable[dict], cfg: DataConfig, params: ViewParams) -> Iterator[dict]:
    """Decoded samples -> two views each (on whatever device their images are)."""
    return make_views(unify_reid(samples, cfg.reid_canvas, cfg.canvas_size, cfg.canvas_ratio, cfg.paste_scale),
                      params)


def batch_stages(items: Iterable, reader: ShardReader, cfg: DataConfig, params: ViewParams) -> Iterator[dict]:
    """Compose the sample stages with webdataset's pipeline (one sample list -> samples).
    With ``decode: cuda`` it stops after the checks: the views are made on the GPU."""
    stages = [lambda: iter(items), lambda src: read_samples(src, reader),
              lambda src: decode_samples(src, cfg.max_pixels, cfg.decode)]
    if cfg.decode != "cuda":
        stages.append(lambda src: view_stages(src, cfg, params))
    return iter(wds.DataPipeline(*stages))


def device_batch(samples: list[dict], cfg: DataConfig, params: ViewParams, device="cuda") -> dict:
    """A worker's checked, still encoded batch -> the collated batch, decoded and augmented
    on ``device`` (transforms.v2 run on GPU tensors; the random draws are the same numpy
    generators as on the CPU, so the crops, flips and box lists are the CPU path's)."""
    return collate(list(view_stages(decode_on_device(samples, device), cfg, params)))


# --------------------------------------------------------------------------- the loader
class EpochDataset(IterableDataset):
    """One rank's batches of one epoch, from batch ``start`` on; split across
    dataloader workers batch by batch."""

    def __init__(self, source: ShardSource, cfg: DataConfig, params: ViewParams, weights: dict[str, float],
                 seed: int, epoch: int, rank: int, world: int, start: int = 0, reader: ShardReader | None = None):
        self.source, self.cfg, self.params, self.weights = source, cfg, params, weights
        self.seed, self.epoch, self.rank, self.world, self.start = seed, epoch, rank, world, start
        self.reader = reader or ShardReader(source.shards, cfg.cache_dir, cfg.verify_shards)
        plan = equalize(epoch_plan(source, weights, seed, epoch), world, cfg.batch_size, cfg.remainder)
        if cfg.group_by_aspect:
            plan = group_by_aspect(plan, aspect_groups(source, cfg.canvas_size), world * cfg.batch_size)
        self.plan = plan
        self.batches = rank_batches(len(plan), rank, world, cfg.batch_size)

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)

    def _items(self, b: int):
        for pos in self.batches[b]:
            yield pos, self.plan[pos], int(_rng(self.seed, self.epoch, pos).integers(1 << 62))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for b in worker_batches(len(self.batches), self.start, worker, workers):
            samples = list(batch_stages(self._items(b), self.reader, self.cfg, self.params))
            yield {"encoded": samples} if self.cfg.decode == "cuda" else collate(samples)


class PretrainLoader:
    """Endless iterator over epochs of batches for one rank, with a
    ``state_dict`` (epoch, batches consumed) that accelerate checkpoints."""

    def __init__(self, source: ShardSource, cfg: DataConfig, params: ViewParams, seed: int,
                 rank: int = 0, world: int = 1, device: str | torch.device | None = None):
        self.source, self.cfg, self.params = source, cfg, params
        self.seed, self.rank, self.world = seed, rank, world
        if cfg.decode not in DECODERS:
            raise DataError(f"data.decode must be one of {DECODERS}, got {cfg.decode!r}")
        if cfg.decode == "cuda" and not torch.cuda.is_available():
            raise DataError("data.decode=cuda needs a CUDA device (none is visible); use data.decode=tensor")
        self.device = device or ("cuda" if cfg.decode == "cuda" else "cpu")   # where decode=cuda batches land
        self.weights = dataset_weights(source, cfg.weights)
        self.reader = ShardReader(source.shards, cfg.cache_dir, cfg.verify_shards)
        self.epoch = 0
        self.consumed = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world", self.world) != self.world or state.get("seed", self.seed) != self.seed:
            raise DataError(
                f"checkpoint loader state was made with world={state.get('world')} seed={state.get('seed')}; "
                f"this run has world={self.world} seed={self.seed}: the data order would not continue"
            )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    def epoch_dataset(self, epoch: int, start: int = 0) -> EpochDataset:
        return EpochDataset(self.source, self.cfg, self.params, self.weights, self.seed, epoch, self.rank,
                            self.world, start, self.reader)

    def batches_per_epoch(self) -> int:
        return len(self.epoch_dataset(self.epoch))

    def index_shards(self) -> None:
        """Index (and fetch, if remote) every shard in use once, here: worker
        processes get the index with the pickled dataset instead of each
        re-reading every tar header every epoch."""
        for s, info in enumerate(self.source.shards):
            if self.weights.get(info.dataset, 0) > 0:
                self.reader.index(s)

    def __iter__(self) -> Iterator[dict]:
        if self.cfg.num_workers > 0 or self.cfg.verify_shards:
            self.index_shards()
        while True:
            ds = self.epoch_dataset(self.epoch, self.consumed)
            if len(ds) > 0:
                # An explicit generator: DataLoader otherwise draws its worker seed from
                # torch's global RNG, which would shift the model's RNG stream on resume.
                gen = torch.Generator().manual_seed(int(_rng(self.seed, self.epoch, 0xD1).integers(1 << 62)))
                dl = DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                                collate_fn=_identity, persistent_workers=False, generator=gen)
                for batch in dl:
                    if "encoded" in batch:
                        batch = device_batch(batch["encoded"], self.cfg, self.params, self.device)
                    self.consumed += 1
                    yield batch
            self.epoch += 1
            self.consumed = 0


def _identity(batch):
    return batch
