"""The decode stage: JPEG bytes + json -> checked uint8 CHW images and box/pid tensors.

Decoders: "tensor" (torchvision.io on the CPU), "pil" (PIL -> numpy -> tensor) and
"cuda" (workers only check; :func:`decode_on_device` decodes a batch with nvjpeg).
Headers and json are checked before anything is decoded.
"""
from __future__ import annotations

import json
from typing import Iterable, Iterator

import numpy as np
import torch

from hybridps.pretrain.data.config import DataConfig, DataError
from hybridps.pretrain.integrity import IntegrityError, check_header, check_meta, check_pixels, jpeg_header, open_image


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
