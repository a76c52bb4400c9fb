"""The Python API: build a person-search model by name, load weights, search.

    from hybridps.finetune.api import create_model
    model = create_model("nae_resnet50", weights="runs/finetune_prw")
    hits = model.search("query.jpg", (x1, y1, x2, y2), ["g1.jpg", "g2.jpg"], topk=5)
    for h in hits:
        print(h.gallery, h.box, h.score)

``weights`` is anything fine-tuning's ``--init`` or evaluation's
``--checkpoint`` reads: a registry name (``python -m hybridps.checkpoints list``), a
fine-tuning or pre-training run folder, a weight file (safetensors, or a
pickle-free external layout through the checkpoints loaders), or a published
run ``hf://OWNER/NAME[@REV]``.  The search follows the evaluator's feature
path exactly (``finetune.engine``): the query embedding of the given box,
gallery detections above ``det_thresh`` weighted by their detection score
(NAE's CWS), ranked by dot product, ties to the earlier gallery image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from hybridps.pretrain.model.backbones import build_backbone
from hybridps.pretrain.model.config import ModelConfig
from hybridps.pretrain.model.search_model import SearchModel

# model name -> ModelConfig.backbone (timm's create_model names, one per buildable backbone)
MODELS = {"nae_resnet50": "resnet50", "nae_resnet18": "resnet18", "nae_shufflenet": "shufflenet"}
DEFAULT_DET_THRESH = 0.5          # the evaluator's default (FinetuneEvalConfig.det_thresh)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class APIError(ValueError):
    """Bad arguments or weights that do not fit the requested model."""


class SearchHit(NamedTuple):
    """One ranked detection: which gallery image, where, how similar (CWS dot product)."""

    gallery: int
    box: tuple[float, float, float, float]
    score: float


class PersonSearchModel(SearchModel):
    """The NAE search model plus :meth:`search`; ``state_dict`` keys are SearchModel's."""

    det_thresh: float = DEFAULT_DET_THRESH
    source: str = ""

    def embed_query(self, image, box: Sequence[float]) -> np.ndarray:
        """Unit embedding (D,) of the person in ``box`` (x1, y1, x2, y2 pixels) of ``image``."""
        return embed_query(self, image, box)

    def detect(self, image) -> dict[str, np.ndarray]:
        """boxes (n, 4), scores (n,), feats (n, D) = unit embedding x score (the evaluator's gallery features)."""
        return detect(self, image)

    def search(self, query_image, query_box: Sequence[float], gallery_images: Sequence[Any], topk: int = 10,
               det_thresh: float | None = None) -> list[SearchHit]:
        """The ``topk`` gallery detections most similar to the query person, best first.

        Images: a path, a PIL image, an HxWx3 uint8 array or a 3xHxW float tensor in [0, 1].
        ``det_thresh``: detections scoring below it are not ranked (default: the run's
        ``eval.det_thresh``, else 0.5).
        """
        return search(self, query_image, query_box, gallery_images, topk, det_thresh)


@torch.no_grad()
def embed_query(model: SearchModel, image, box: Sequence[float]) -> np.ndarray:
    """Unit embedding (D,) of the person in ``box`` of ``image`` (as finetune.engine.infer_queries)."""
    img = load_image(image)
    b = _check_box(box, img.shape[-2:])
    model.eval()
    device = _device_of(model)
    emb = model.extract_query([img.to(device)], [torch.as_tensor([b], dtype=torch.float32, device=device)])
    return emb[0][0].float().cpu().numpy()


@torch.no_grad()
def detect(model: SearchModel, image) -> dict[str, np.ndarray]:
    """Detections of one image with CWS features (as finetune.engine.infer_gallery)."""
    model.eval()
    det = model([load_image(image).to(_device_of(model))])[0]
    scores = det["scores"].float()
    feats = det["embeddings"].float() * scores[:, None]
    return {"boxes": det["boxes"].float().cpu().numpy(), "scores": scores.cpu().numpy(), "feats": feats.cpu().numpy()}


def search(model: SearchModel, query_image, query_box: Sequence[float], gallery_images: Sequence[Any],
           topk: int = 10, det_thresh: float | None = None) -> list[SearchHit]:
    """:meth:`PersonSearchModel.search` for any search model (e.g. one from
    ``pretrain.model.build_search_model``)."""
    thresh = getattr(model, "det_thresh", DEFAULT_DET_THRESH) if det_thresh is None else det_thresh
    if not (isinstance(thresh, (int, float)) and 0.0 <= thresh <= 1.0):
        raise APIError(f"det_thresh must be in [0, 1], got {thresh!r}")
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise APIError(f"topk must be a positive int, got {topk!r}")
    if isinstance(gallery_images, (str, Path)) or not len(gallery_images):
        raise APIError("gallery_images must be a non-empty list of images")
    query = embed_query(model, query_image, query_box)
    return rank(query, [detect(model, g) for g in gallery_images], thresh, topk)


def rank(query: np.ndarray, gallery: Sequence[dict[str, np.ndarray]], det_thresh: float, topk: int) -> list[SearchHit]:
    """Detections of every gallery image with score >= ``det_thresh``, by descending
    similarity; ties go to the earlier image, then the earlier detection (the evaluator's order)."""
    img, det, sims, boxes = [], [], [], []
    for i, g in enumerate(gallery):
        keep = np.flatnonzero(g["scores"] >= det_thresh)
        img.append(np.full(keep.size, i))
        det.append(keep)
        sims.append((g["feats"][keep] @ query).astype(np.float64))
        boxes.append(g["boxes"][keep])
    img, det, sims, boxes = (np.concatenate(a) if a else np.zeros(0) for a in (img, det, sims, boxes))
    order = np.lexsort((det, img, -sims))[:topk]
    return [SearchHit(int(img[o]), tuple(float(v) for v in boxes[o]), float(sims[o])) for o in order]


# --------------------------------------------------------------------------- images
def load_image(image) -> torch.Tensor:
    """3xHxW float in [0, 1], decoded exactly as the evaluator decodes dataset images."""
    from hybridps.data_prep.record import ImageRef
    from hybridps.finetune.datasets import read_image

    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise APIError(f"an image tensor must be float 3xHxW in [0, 1], got {tuple(image.shape)} {image.dtype}")
        return image
    if isinstance(image, ImageRef):
        return read_image(image)
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise APIError(f"{image}: no such image file")
        return read_image(ImageRef("file", str(image)))
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
    except ImportError:
        pass
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255.0)
    raise APIError(f"cannot read an image from a {type(image).__name__}: pass a path, a PIL image, an HxWx3 uint8 "
                   "array or a 3xHxW float tensor")


def _check_box(box, hw) -> list[float]:
    try:
        b = [float(v) for v in box]
    except (TypeError, ValueError):
        raise APIError(f"query_box must be 4 numbers (x1, y1, x2, y2), got {box!r}") from None
    if len(b) != 4 or not all(math.isfinite(v) for v in b) or b[2] <= b[0] or b[3] <= b[1]:
        raise APIError(f"query_box must be 4 finite numbers x1 < x2, y1 < y2, got {box!r}")
    h, w = int(hw[0]), int(hw[1])
    if b[2] <= 0 or b[3] <= 0 or b[0] >= w or b[1] >= h:
        raise APIError(f"query_box {b} lies outside the {w}x{h} query image")
    return b


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------- models
@dataclass
class _Resolved:
    model_cfg: ModelConfig
    state: dict[str, torch.Tensor] | None     # a whole fine-tuned model: loaded strictly
    det_thresh: float
    weights: Any = None        # finetune.init.InitWeights for a scoped load


def _run_model_cfg(path: Path) -> tuple[dict, dict]:
    """(model, eval) sections of a run's config.yaml ({} when absent)."""
    import yaml

    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        return {}, {}
    try:
        data = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise APIError(f"{cfg_file}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise APIError(f"{cfg_file}: must be a mapping")
    return dict(data.get("model") or {}), dict(data.get("eval") or {})


def _model_cfg(data: dict, **changes) -> ModelConfig:
    from hybridps.pretrain.config import ConfigError, from_dict

    try:
        cfg = from_dict(ModelConfig, {**data, **changes})
    except (ConfigError, TypeError, ValueError) as e:
        raise APIError(f"model configuration: {e}") from None
    return cfg


def _resolve(weights: str, offline: bool | None) -> _Resolved:
    """The model config, det_thresh and weights that ``weights`` stands for.  A run folder
    brings its config.yaml (sizes, anchors, eval.det_thresh); a bare file or registry entry
    only its backbone and normalisation, the rest is ModelConfig's defaults (NAE's)."""
    from safetensors.torch import load_file

    from hybridps.finetune.init import InitError, normalization_for_model, resolve_init

    local = Path(weights).expanduser()
    if weights.startswith("hf://"):
        from hybridps.checkpoints.download import DownloadError
        from hybridps.checkpoints.hub import HubError, fetch_hf

        try:
            local = fetch_hf(weights, offline=offline)
        except (DownloadError, HubError) as e:
            raise APIError(str(e)) from None
    model_data, eval_data = _run_model_cfg(local) if local.is_dir() else ({}, {})
    det_thresh = eval_data.get("det_thresh", DEFAULT_DET_THRESH)
    if not (isinstance(det_thresh, (int, float)) and not isinstance(det_thresh, bool) and 0.0 <= det_thresh <= 1.0):
        raise APIError(f"{local / 'config.yaml'}: eval.det_thresh must be in [0, 1], got {det_thresh!r}")
    from hybridps.finetune.cli import run_meta

    if run_meta(local, APIError) is not None:
        # the fine-tuned model as saved, OIM table included: a strict load
        return _Resolved(_model_cfg(model_data), load_file(str(local / "model.safetensors")), det_thresh)
    try:
        init = resolve_init(str(local) if local.exists() else weights, offline=offline)
    except InitError as e:
        raise APIError(str(e)) from None
    # the OIM table is training state of another identity space and never loaded: keep it minimal
    changes: dict[str, Any] = {"backbone": init.backbone, "num_pids": 1, "cq_size": 0}
    norm = normalization_for_model(init.normalization)
    if norm is not None:
        changes["image_mean"], changes["image_std"] = norm
    return _Resolved(_model_cfg(model_data, **changes), None, det_thresh, init)


def create_model(name: str | None = "nae_resnet50", weights: str | Path | None = None, *, scope: str = "full",
                 min_fraction: float = 0.95, device: str | torch.device | None = None, offline: bool | None = None,
                 log=lambda _m: None) -> PersonSearchModel:
    """An eval-mode :class:`PersonSearchModel` called ``name`` (see :data:`MODELS`; None: whatever
    ``weights`` hold) with ``weights`` loaded.

    ``scope="full"`` (default) wants the whole detector and embedding head and refuses weights that
    cover less than ``min_fraction`` of it -- a backbone-only file (ImageNet, released PretrainPS
    backbones) would give a model that finds nobody.  ``scope="backbone"`` loads such a file into the
    trunk and leaves the heads at their initialisation: a model to fine-tune, not to search with.
    ``weights=None`` gives a randomly initialised model (to train).
    """
    from hybridps.finetune.init import SCOPES, InitError, load_scoped

    if name is not None and name not in MODELS:
        raise APIError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    if scope not in SCOPES:
        raise APIError(f"scope must be one of {tuple(SCOPES)}, got {scope!r}")
    if weights is None:
        if name is None:
            raise APIError("create_model(None) needs weights to say which model they are")
        resolved = _Resolved(ModelConfig(backbone=MODELS[name]), None, DEFAULT_DET_THRESH)
    else:
        resolved = _resolve(str(weights), offline)
    have = resolved.model_cfg.backbone
    if name is not None and MODELS[name] != have:
        wanted = {v: k for k, v in MODELS.items()}.get(have, f"a {have} model")
        raise APIError(f"{weights} holds a {have} model, not {name}'s {MODELS[name]}; use {wanted!r}")
    # the backbone's own pretrained download is never needed: the weights overwrite it
    cfg = resolved.model_cfg
    if cfg.pretrained:
        import dataclasses

        cfg = dataclasses.replace(cfg, pretrained=False)
    model = PersonSearchModel(cfg, build_backbone(cfg.backbone, False))
    if resolved.state is not None:
        try:
            model.load_state_dict(resolved.state, strict=True)
        except RuntimeError as e:
            why = " ".join(str(e).split())[:300]
            raise APIError(f"{weights}: model.safetensors does not fit its config.yaml: {why}") from None
    elif resolved.weights is not None:
        try:
            load_scoped(model, resolved.weights, scope, min_fraction=min_fraction, log=log)
        except InitError as e:
            raise APIError(f"{e} (scope={scope!r}; pass scope='backbone' to load a backbone-only file for "
                           "fine-tuning)") from None
    model.det_thresh = resolved.det_thresh
    model.source = "" if weights is None else str(weights)
    if device is not None:
        model.to(torch.device(device))
    return model.eval()


def gallery_files(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (sorted, not recursive) in the folders named."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise APIError(f"{p}: no such gallery image or folder")
    if not out:
        raise APIError(f"no gallery images (looked for {', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return out
