"""The search-results file: detections and features of any model, scored later.

Format (``.npz``, written with ``numpy.savez_compressed``, read with
``allow_pickle=False`` -- plain arrays only, no pickle):

=========================  ===========  ==============================================
array                      shape/dtype  meaning
=========================  ===========  ==============================================
``meta``                   0-d str      JSON: ``{"format": "hybridps-search-results",
                                        "version": 1, "dataset": ..., ...}``
``gallery_keys``           (G,) str     gallery image keys (``Record.key`` of the test
                                        split; protocol order is not required)
``gallery_counts``         (G,) int64   detections per gallery image (0 allowed)
``gallery_boxes``          (N, 4) f32   x1, y1, x2, y2 in original-image pixels,
                                        image after image in ``gallery_keys`` order
``gallery_scores``         (N,) f32     detection confidence
``gallery_feats``          (N, D) f32   features compared with the query by dot
                                        product (NAE/SeqNet: unit embedding x score)
``query_feats``            (Q, D) f32   one row per protocol query, protocol order:
                                        the feature of the ground-truth query box
``query_context_counts``   (Q,) int64   optional, for CBGM: persons detected in each
``query_context_boxes``    (M, 4) f32   query image; row 0 of each query's block is the
``query_context_scores``   (M,) f32     ground-truth query box, the others follow by
``query_context_feats``    (M, D) f32   descending score; features without CWS
=========================  ===========  ==============================================

N = sum(gallery_counts), M = sum(query_context_counts).  The layout is
concatenated rather than one array per image because a real gallery has
thousands of images and one zip member per array would dominate the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .evaluate import Detections, SearchInputs

FORMAT = "hybridps-search-results"
VERSION = 1
_REQUIRED = ("meta", "gallery_keys", "gallery_counts", "gallery_boxes", "gallery_scores", "gallery_feats", "query_feats")
_CONTEXT = ("query_context_counts", "query_context_boxes", "query_context_scores", "query_context_feats")


class ResultsFileError(ValueError):
    """A results file that cannot be used, with the reason."""


def _concat(dets: list[Detections], dim: int):
    counts = np.asarray([len(d) for d in dets], np.int64)
    if not dets or counts.sum() == 0:
        return counts, np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, dim), np.float32)
    boxes = np.concatenate([np.asarray(d.boxes, np.float32).reshape(-1, 4) for d in dets])
    scores = np.concatenate([np.asarray(d.scores, np.float32).ravel() for d in dets])
    feats = np.concatenate([np.asarray(d.feats, np.float32).reshape(len(d), dim) for d in dets])
    return counts, boxes, scores, feats


def write_results(path: str | Path, inputs: SearchInputs, dataset: str, extra_meta: dict | None = None) -> Path:
    """Write ``inputs`` to ``path`` (a ``.npz``); returns the path written."""
    path = Path(path)
    q = np.asarray(inputs.query_feats, np.float32)
    if q.ndim != 2:
        raise ResultsFileError(f"query_feats must be (Q, D), got {q.shape}")
    dim = q.shape[1]
    keys = list(inputs.gallery)
    counts, boxes, scores, feats = _concat([inputs.gallery[k] for k in keys], dim)
    arrays = {
        "meta": np.asarray(json.dumps({"format": FORMAT, "version": VERSION, "dataset": dataset, **(extra_meta or {})})),
        "gallery_keys": np.asarray(keys, dtype=np.str_),
        "gallery_counts": counts,
        "gallery_boxes": boxes,
        "gallery_scores": scores,
        "gallery_feats": feats,
        "query_feats": q,
    }
    if inputs.query_context is not None:
        c = _concat(list(inputs.query_context), dim)
        arrays.update(zip(_CONTEXT, c))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object keeps numpy from appending ".npz"
        np.savez_compressed(f, **arrays)
    return path


def _split(counts, boxes, scores, feats) -> list[Detections]:
    edges = np.cumsum(counts)[:-1]
    return [Detections(b, s, f) for b, s, f in zip(np.split(boxes, edges), np.split(scores, edges), np.split(feats, edges))]


def _expect(name: str, arr: np.ndarray, shape: tuple) -> None:
    """``shape`` entries: an int, or None for "any"."""
    ok = arr.ndim == len(shape) and all(want is None or have == want for have, want in zip(arr.shape, shape))
    if not ok:
        pretty = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ResultsFileError(f"'{name}' has shape {arr.shape}, expected {pretty}")


def read_results(path: str | Path) -> tuple[SearchInputs, dict]:
    """Read and validate a results file; returns ``(inputs, meta)``."""
    path = Path(path)
    if not path.is_file():
        raise ResultsFileError(f"results file {path} does not exist")
    data = _load_members(path)
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ResultsFileError(f"{path}: missing array(s) {missing}; see finetune/results_io.py for the format")
    if data["meta"].ndim != 0 or data["meta"].dtype.kind != "U":
        raise ResultsFileError(f"{path}: 'meta' must be a 0-d string array, got {data['meta'].dtype} "
                               f"{data['meta'].shape}")
    try:
        meta = json.loads(str(data["meta"]))
    except (json.JSONDecodeError, RecursionError) as e:
        raise ResultsFileError(f"{path}: 'meta' is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ResultsFileError(f"{path}: 'meta' must be a JSON object, got a {type(meta).__name__}")
    if data["gallery_keys"].dtype.kind != "U":
        raise ResultsFileError(f"{path}: 'gallery_keys' must be strings, got {data['gallery_keys'].dtype}")
    for name, arr in data.items():
        if name != "meta" and name != "gallery_keys":
            _check_numbers(path, name, arr)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ResultsFileError(f"{path}: format {meta.get('format')!r} v{meta.get('version')}, expected {FORMAT!r} v{VERSION}")
    q = data["query_feats"]
    _expect("query_feats", q, (None, None))
    dim = q.shape[1]
    gallery = _read_block(data, "gallery", dim)
    keys = [str(k) for k in data["gallery_keys"]]
    _expect("gallery_keys", data["gallery_keys"], (len(gallery),))
    if len(set(keys)) != len(keys):
        raise ResultsFileError(f"{path}: duplicated gallery image keys")
    context = None
    present = [k for k in _CONTEXT if k in data]
    if present:
        if len(present) != len(_CONTEXT):
            raise ResultsFileError(f"{path}: query context needs all of {list(_CONTEXT)}, found {present}")
        context = _read_block(data, "query_context", dim)
        if len(context) != q.shape[0]:
            raise ResultsFileError(f"{path}: query context for {len(context)} queries, but {q.shape[0]} query features")
    return SearchInputs(dict(zip(keys, gallery)), q.astype(np.float32), context), meta


# A results file is float features and boxes, which compress by a few percent
# at most; a member that inflates far past the archive is a zip bomb.
MAX_EXPANSION = 20
EXPANSION_SLACK = 64 << 20


def _load_members(path: Path) -> dict[str, np.ndarray]:
    """The arrays the format names, and only those: every other member is never
    read.  Each member's npy header (shape, dtype) is checked against what the
    zip declares and against the archive's size before its data is inflated."""
    import zipfile

    wanted = set(_REQUIRED) | set(_CONTEXT)
    size = path.stat().st_size
    budget = EXPANSION_SLACK + MAX_EXPANSION * size
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
            total = 0
            for name in sorted(wanted & set(infos)):
                info = infos[name]
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version not in ((1, 0), (2, 0)):
                        raise ResultsFileError(f"{path}: '{name}' has npy format version {version}; expected 1.0/2.0")
                    reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = reader(f)
                    header_len = f.tell() if f.seekable() else None
                    if dtype.hasobject:
                        raise ResultsFileError(f"{path}: '{name}' is an object array (pickled data); refusing it")
                    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                    if header_len is not None and nbytes + header_len != info.file_size:
                        raise ResultsFileError(f"{path}: '{name}' declares {shape} {dtype} ({nbytes} bytes) but its zip "
                                               f"member holds {info.file_size - header_len}")
                    total += nbytes
                    if total > budget:
                        raise ResultsFileError(f"{path}: its arrays would take more than {budget} bytes in memory from "
                                               f"a {size}-byte file; refusing to inflate it")
                with zf.open(info) as f:
                    out[name] = np.lib.format.read_array(f, allow_pickle=False)
    except ResultsFileError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, MemoryError) as e:
        raise ResultsFileError(f"{path} is not a readable .npz results file: {type(e).__name__}: {e}") from None
    return out


def _check_numbers(path: Path, name: str, arr: np.ndarray) -> None:
    """Features, boxes and scores must be finite numbers: NaN features rank
    every gallery box alike and still give a plausible-looking top-1."""
    if arr.dtype.kind not in "iuf":
        raise ResultsFileError(f"{path}: '{name}' must be numeric, got {arr.dtype}")
    if arr.dtype.kind == "f":
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise ResultsFileError(f"{path}: '{name}' has {bad} NaN/inf value(s) of {arr.size}; the model "
                                   "produced non-finite outputs")


def _read_block(data: dict, prefix: str, dim: int) -> list[Detections]:
    counts = data[f"{prefix}_counts"]
    _expect(f"{prefix}_counts", counts, (None,))
    if counts.size and counts.min() < 0:
        raise ResultsFileError(f"'{prefix}_counts' has negative entries")
    n = int(counts.sum())
    _expect(f"{prefix}_boxes", data[f"{prefix}_boxes"], (n, 4))
    _expect(f"{prefix}_scores", data[f"{prefix}_scores"], (n,))
    feats = data[f"{prefix}_feats"]
    if feats.ndim == 2 and feats.shape[0] == n and feats.shape[1] != dim:
        raise ResultsFileError(f"'{prefix}_feats' has dimension {feats.shape[1]} but query_feats has {dim}")
    _expect(f"{prefix}_feats", feats, (n, dim))
    return _split(counts, data[f"{prefix}_boxes"], data[f"{prefix}_scores"], feats)


def check_against_protocol(inputs: SearchInputs, protocol) -> list[str]:
    """Validate a results file against the protocol it will be scored on.
    Raises on a missing gallery image or a wrong query count; returns
    warnings (e.g. extra images the protocol does not use)."""
    keys = {g.key for g in protocol.gallery}
    missing = sorted(keys - set(inputs.gallery))
    if missing:
        raise ResultsFileError(
            f"{len(missing)} of {len(keys)} {protocol.dataset} gallery images are missing from the results, "
            f"e.g. {missing[:5]} (images with no detection still need an entry with count 0)"
        )
    if inputs.query_feats.shape[0] != len(protocol.queries):
        raise ResultsFileError(
            f"the results hold {inputs.query_feats.shape[0]} query features; the {protocol.dataset} protocol "
            f"has {len(protocol.queries)} queries"
        )
    extra = set(inputs.gallery) - keys
    return [f"{len(extra)} result image(s) are not in the protocol gallery and are ignored"] if extra else []
