"""The loader's decoders: torchvision's libjpeg-turbo straight to CHW uint8 ("tensor", the
default), the older PIL -> numpy -> tensor path ("pil"), and batched nvjpeg on the GPU
("cuda", tested only where CUDA is visible)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from hybridps.pretrain import data as D
from hybridps.pretrain.augment import ViewParams

from test_pretrain_data import write_test_build

PARAMS = ViewParams(min_size=(64,), max_size=128)
CUDA = torch.cuda.is_available()


def _jpeg(arr: np.ndarray, mode: str | None = None, **kw) -> bytes:
    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _sample(jpg: bytes, w: int, h: int) -> dict:
    meta = {"dataset": "d", "split": "train", "domain": 0, "task": "det", "labeled": False, "width": w,
            "height": h, "boxes": [[1.0, 1.0, 5.0, 9.0]], "pids": [0], "ignore": [], "canvas": None}
    return {"__key__": "d-train-0", "jpg": jpg, "json": json.dumps(meta).encode()}


def _smooth(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


@pytest.mark.parametrize("mode,kw", [(None, {"quality": 95}), (None, {"quality": 75, "subsampling": 0}),
                                     ("L", {}), ("CMYK", {}), (None, {"progressive": True})])
def test_tensor_decoder_gives_the_pil_pixels(mode, kw):
    arr = _smooth(123, 77)
    s = _sample(_jpeg(arr, mode, **kw), 123, 77)
    a = D._decode_one(dict(s), decoder="tensor")["image"]
    b = D._decode_one(dict(s), decoder="pil")["image"]
    assert a.dtype == torch.uint8 and a.shape == (3, 77, 123) and a.is_contiguous()
    assert torch.equal(a, b)


def test_png_bytes_in_the_jpg_member_still_decode_with_pil():
    arr = _smooth(40, 30)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = D._decode_one(_sample(buf.getvalue(), 40, 30), decoder="tensor")["image"]
    assert torch.equal(out, torch.from_numpy(arr).permute(2, 0, 1))


@pytest.mark.parametrize("decoder", ["tensor", "pil"])
def test_truncated_jpeg_is_a_data_error(decoder):
    data = _jpeg(_smooth(200, 150))
    with pytest.raises(D.DataError, match="does not decode"):
        D._decode_one(_sample(data[: len(data) // 2], 200, 150), decoder=decoder)


def _batches(root, decoder: str, n: int = 4, **cfg):
    src = D.open_source(str(root))
    dcfg = D.DataConfig(shards=str(root), batch_size=3, decode=decoder, **cfg)
    it = iter(D.PretrainLoader(src, dcfg, PARAMS, seed=5))
    return [next(it) for _ in range(n)]


def _same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a["keys"] == b["keys"]
    for view in ("view1", "view2"):
        for x, y in zip(a[view]["images"], b[view]["images"]):
            assert x.shape == y.shape and torch.allclose(x.cpu(), y.cpu(), atol=atol, rtol=0)
        for tx, ty in zip(a[view]["targets"], b[view]["targets"]):
            for k in ("boxes", "pids", "track", "ignore"):
                assert torch.equal(tx[k].cpu(), ty[k].cpu()), k


def test_loader_batches_identical_with_tensor_and_pil_decoders(tmp_path):
    write_test_build(tmp_path)
    for a, b in zip(_batches(tmp_path, "tensor"), _batches(tmp_path, "pil")):
        _same(a, b)


def test_cuda_decoder_refused_without_cuda(tmp_path):
    if CUDA:
        pytest.skip("CUDA is visible here")
    write_test_build(tmp_path)
    with pytest.raises(D.DataError, match="needs a CUDA device"):
        _batches(tmp_path, "cuda")


@pytest.mark.skipif(not CUDA, reason="needs CUDA (nvjpeg)")
def test_gpu_decode_matches_the_cpu_decode():
    arrs = [_smooth(123, 77, 1), _smooth(64, 128, 2), _smooth(300, 200, 3)]
    samples = [D._decode_one(_sample(_jpeg(a, quality=95), a.shape[1], a.shape[0]), decoder="cuda")
               for a in arrs]
    assert all(s["image"] is None for s in samples)
    out = D.decode_on_device(samples, "cuda")
    for s, a in zip(out, arrs):
        ref = D._decode_one(_sample(_jpeg(a, quality=95), a.shape[1], a.shape[0]), decoder="tensor")["image"]
        assert s["image"].is_cuda and s["image"].shape == ref.shape
        # nvjpeg's IDCT and chroma upsampling may differ from libjpeg-turbo's by a few levels
        assert (s["image"].cpu().int() - ref.int()).abs().max() <= 4


@pytest.mark.skipif(not CUDA, reason="needs CUDA (nvjpeg)")
def test_gpu_batches_follow_the_cpu_batches(tmp_path):
    """Same samples, crops, flips and boxes; pixels within the decode tolerance."""
    write_test_build(tmp_path)
    for a, b in zip(_batches(tmp_path, "cuda", num_workers=1), _batches(tmp_path, "tensor")):
        assert all(img.is_cuda for img in a["view1"]["images"])
        _same(a, b, atol=0.05)
