"""PSDiff (seed: "PSDiff: Diffusion Model for Person Search with Iterative and Collaborative
Refinement"): feature extractor (registry ResNet + FPN), dual noise generator, CDL stages.

train: ``model(images, targets)`` -> dict of losses (needs a teacher, :meth:`set_teacher`);
eval: ``model(images)`` -> list of {"boxes", "scores", "embeddings"} in original pixels, the
same interface as the NAE model, so ``finetune.engine.run_inference`` and the evaluator are
shared.  ``model.cfg.ddim_steps`` sets the number of DDIM steps of the next inference.

Key layout: ``backbone.*`` (the registry trunk, conv1..layer3), ``backbone_c5.layer4.*``
(the registry's RoI head, here run on the whole image), ``fpn.*``, ``time_mlp.*``,
``stages.<k>.*``.  Our checkpoints' ``roi_heads.box_head.layer4`` maps onto ``backbone_c5``.
"""
from __future__ import annotations

import hashlib
import zlib
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, batched_nms, box_convert, box_iou

from hybridps.finetune.psdiff.config import PSDiffModelConfig
from hybridps.finetune.psdiff.diffusion import DualNoiseGenerator, boxes_to_signal, signal_to_boxes, unit_to_signal
from hybridps.finetune.psdiff.head import CDLStage, time_mlp
from hybridps.finetune.psdiff.losses import set_losses
from hybridps.pretrain.model.backbones import build_backbone

LEVELS = ("p2", "p3", "p4", "p5")
TAPS = ("layer1", "layer2", "layer3")


def _named_steps(body: nn.Module) -> list[tuple[str, nn.Module]]:
    if hasattr(body, "order"):                       # PathSequential (timm)
        return [(p, body.get_submodule(p)) for p in body.order]
    return list(body.named_children())


class PSDiff(nn.Module):
    def __init__(self, cfg: PSDiffModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        parts = build_backbone(cfg.backbone, cfg.pretrained)
        names = [n for n, _ in _named_steps(parts.body)]
        if not all(t in names for t in TAPS) or getattr(parts.body, "nhwc_out", False):
            raise ValueError(f"PSDiff needs a backbone with layer1..layer3 stages in its trunk (torchvision "
                             f"ResNets: resnet18, resnet50); {cfg.backbone!r} has {names}")
        self.transform = GeneralizedRCNNTransform(cfg.min_size, cfg.max_size, list(cfg.image_mean),
                                                  list(cfg.image_std), size_divisible=32)
        self.backbone, self.backbone_c5 = parts.body, parts.head
        with torch.no_grad():
            was = self.backbone.training
            self.backbone.eval()
            self.backbone_c5.eval()
            channels = [f.shape[1] for f in self._pyramid_inputs(torch.zeros(1, 3, 64, 64))]
            self.backbone.train(was)
            self.backbone_c5.train(was)
        self.fpn = FeaturePyramidNetwork(channels, cfg.dim)
        self.pooler = MultiScaleRoIAlign(list(LEVELS), cfg.pooler_size, cfg.sampling_ratio)
        self.time_mlp = time_mlp(cfg.dim)
        self.stages = nn.ModuleList(CDLStage(cfg.dim, cfg.emb_dim, cfg.dim_dynamic, cfg.heads, cfg.pooler_size,
                                             cfg.dropout, cfg.prior_prob, cfg.det_reads_collab)
                                    for _ in range(cfg.num_stages))
        self.diffusion = DualNoiseGenerator(cfg.timesteps, cfg.n_train, cfg.box_scale, cfg.emb_scale)
        self.loss_weights: dict[str, float] = {}       # the matching cost's weights (= train.loss_weights)
        self.__dict__["_teacher"] = None              # not a submodule: no state_dict, no optimizer
        self._cache: dict = {}                         # eval only: image digest -> sampled detections
        if cfg.freeze_stem:
            for module in parts.stem:
                module.requires_grad_(False)
        if cfg.norm_layer == "frozen_bn":
            for module in list(self.backbone.modules()) + list(self.backbone_c5.modules()):
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.requires_grad_(False)
                    module._hybridps_frozen = True

    # ------------------------------------------------------------------ plumbing
    def train(self, mode: bool = True) -> "PSDiff":
        super().train(mode)
        self._cache.clear()
        for module in self.modules():
            if getattr(module, "_hybridps_frozen", False):
                module.train(False)
        return self

    def set_teacher(self, teacher) -> None:
        """Frozen model with ``extract_query(images, boxes) -> unit embeddings`` (gt boxes)."""
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.__dict__["_teacher"] = teacher

    @property
    def teacher(self):
        return self.__dict__["_teacher"]

    def _pyramid_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for name, module in _named_steps(self.backbone):
            x = module(x)
            if name in TAPS:
                taps.append(x)
        taps.append(self.backbone_c5(x))
        return taps

    def features(self, tensors: torch.Tensor) -> OrderedDict:
        c = self._pyramid_inputs(tensors)
        return self.fpn(OrderedDict(zip(LEVELS, c)))

    @staticmethod
    def _wh(size: tuple[int, int], ref: torch.Tensor) -> torch.Tensor:
        return ref.new_tensor([size[1], size[0]])

    def denoise(self, feats: OrderedDict, boxes: torch.Tensor, emb_signal: torch.Tensor, t: torch.Tensor,
                image_sizes: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """boxes [B,N,4] xyxy pixels, emb_signal [B,N,D], t [B] -> per stage (logits [B,N], boxes, raw emb)."""
        b, n = boxes.shape[:2]
        time_feat = self.time_mlp(t)
        whwh = boxes.new_tensor([[s[1], s[0], s[1], s[0]] for s in image_sizes])
        flat_boxes, flat_emb = boxes.reshape(b * n, 4), emb_signal.reshape(b * n, -1)
        outs = []
        for stage in self.stages:
            roi = self.pooler(feats, list(flat_boxes.view(b, n, 4).unbind(0)), image_sizes)
            roi = roi.flatten(2).transpose(1, 2)
            geom = box_convert(flat_boxes.view(b, n, 4) / whwh[:, None], "xyxy", "cxcywh").reshape(b * n, 4)
            logits, new_boxes, emb = stage(roi, flat_emb, flat_boxes, geom, time_feat, b)
            outs.append((logits.view(b, n), new_boxes.view(b, n, 4), emb.view(b, n, -1)))
            flat_boxes = new_boxes.detach()
            flat_emb = unit_to_signal(emb.detach(), self.cfg.emb_scale)
        return outs

    # ------------------------------------------------------------------ forward
    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            return self._train_forward(images, targets)
        original = [tuple(i.shape[-2:]) for i in images]
        image_list, _ = self.transform(list(images))
        dets = [{k: d[k] for k in ("boxes", "scores", "embeddings")} for d in self.sample_cached(images, image_list)]
        return self.transform.postprocess(dets, image_list.image_sizes, original)

    def sample_cached(self, images, image_list) -> list[dict]:
        """:meth:`sample`, remembered per image in eval mode: the query pass reuses the gallery
        pass's sampling of the same frame (sampling noise is seeded by the image content, so the
        result is the same)."""
        if self.training:
            return self.sample(images, image_list, keep_all=True)
        keys = [(hashlib.blake2b(img.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest(),
                 tuple(img.shape), repr(self.cfg)) for img in images]
        if not all(k in self._cache for k in keys):
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache.update(zip(keys, self.sample(images, image_list, keep_all=True)))
        return [self._cache[k] for k in keys]

    @torch.no_grad()
    def teacher_embeddings(self, images, targets) -> list[torch.Tensor]:
        if self.teacher is None:
            raise RuntimeError("PSDiff training needs a teacher (set_teacher); see --teacher")
        self.teacher.eval()
        return [e.float() for e in self.teacher.extract_query(list(images), [t["boxes"] for t in targets])]

    def _train_forward(self, images, targets) -> dict[str, torch.Tensor]:
        teacher = self.teacher_embeddings(images, targets)
        image_list, tgts = self.transform(list(images), [dict(t) for t in targets])
        feats = self.features(image_list.tensors)
        boxes, embs, ts, loss_targets = [], [], [], []
        for tgt, e0, size in zip(tgts, teacher, image_list.image_sizes):
            wh = self._wh(size, image_list.tensors)
            noisy = self.diffusion.corrupt(tgt["boxes"], F.normalize(e0, dim=-1).to(wh), wh)
            boxes.append(noisy.boxes)
            embs.append(noisy.embeddings)
            ts.append(noisy.t)
            loss_targets.append({"boxes": tgt["boxes"], "emb": F.normalize(e0, dim=-1).to(wh), "wh": wh})
        outs = self.denoise(feats, torch.stack(boxes), torch.stack(embs), torch.stack(ts), image_list.image_sizes)
        total: dict[str, torch.Tensor] = {}
        for logits, pred_boxes, pred_emb in outs:           # deep supervision: every stage
            for k, v in set_losses(logits, pred_boxes, pred_emb, loss_targets, self.loss_weights,
                                         self.cfg.match_dynamic_k).items():
                total[k] = total[k] + v if k in total else v
        return total

    # ------------------------------------------------------------------ inference
    def _generator(self, image: torch.Tensor) -> torch.Generator:
        """Seeded by the image content: the same image gets the same noise in any batch."""
        thumb = (image[:, ::8, ::8].detach().float().clamp(0, 1) * 255).to(torch.uint8).cpu().numpy().tobytes()
        return torch.Generator().manual_seed((zlib.crc32(thumb) + 1_000_003 * self.cfg.sample_seed) % (2 ** 63))

    @torch.no_grad()
    def sample(self, images: list[torch.Tensor], image_list, keep_all: bool = False) -> list[dict]:
        """DDIM from Gaussian boxes/embeddings (seed Alg. 2) with DiffusionDet's box renewal and
        step ensemble.  ``keep_all`` also returns every final-step proposal (for queries)."""
        cfg, diff = self.cfg, self.diffusion
        feats = self.features(image_list.tensors)
        gens = [self._generator(img) for img in images]
        whs = [self._wh(s, image_list.tensors) for s in image_list.image_sizes]
        ref = image_list.tensors
        n = cfg.n_test
        xb = torch.stack([torch.randn(n, 4, generator=g) for g in gens]).to(ref)
        xe = torch.stack([torch.randn(n, cfg.emb_dim, generator=g) for g in gens]).to(ref)
        collected: list[list[tuple]] = [[] for _ in images]
        for t, t_next in diff.ddim_times(cfg.ddim_steps):
            boxes = torch.stack([signal_to_boxes(xb[i], whs[i], cfg.box_scale) for i in range(len(images))])
            tt = torch.full((len(images),), t, dtype=torch.long, device=ref.device)
            logits, pboxes, pemb = self.denoise(feats, boxes, xe, tt, image_list.image_sizes)[-1]
            if cfg.ensemble or t_next < 0:
                for i in range(len(images)):
                    collected[i].append((pboxes[i], logits[i].sigmoid(), pemb[i]))
            if t_next < 0:
                break
            new_b, new_e = [], []
            for i, g in enumerate(gens):
                x0b = boxes_to_signal(pboxes[i], whs[i], cfg.box_scale).clamp(-cfg.box_scale, cfg.box_scale)
                x0e = unit_to_signal(pemb[i], cfg.emb_scale)
                eb, ee = diff.predicted_noise(xb[i], x0b, t), diff.predicted_noise(xe[i], x0e, t)
                if cfg.box_renewal:
                    keep = logits[i].sigmoid() > cfg.renewal_thresh
                    x0b, x0e, eb, ee = x0b[keep], x0e[keep], eb[keep], ee[keep]
                b_next = diff.ddim_step(x0b, eb, t, t_next, cfg.ddim_eta, g)
                e_next = diff.ddim_step(x0e, ee, t, t_next, cfg.ddim_eta, g)
                fill = n - b_next.shape[0]
                new_b.append(torch.cat([b_next, torch.randn(fill, 4, generator=g).to(ref)]))
                new_e.append(torch.cat([e_next, torch.randn(fill, cfg.emb_dim, generator=g).to(ref)]))
            xb, xe = torch.stack(new_b), torch.stack(new_e)
        out = []
        for i, size in enumerate(image_list.image_sizes):
            boxes = torch.cat([c[0] for c in collected[i]])
            scores = torch.cat([c[1] for c in collected[i]])
            emb = F.normalize(torch.cat([c[2] for c in collected[i]]), dim=-1)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, size[1])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, size[0])
            valid = (boxes[:, 2] > boxes[:, 0] + 1e-3) & (boxes[:, 3] > boxes[:, 1] + 1e-3)
            det = {}
            if keep_all:
                det["all_boxes"], det["all_embeddings"] = boxes[valid], emb[valid]
            keep = valid & (scores > cfg.score_thresh)
            idx = keep.nonzero().squeeze(1)
            idx = idx[batched_nms(boxes[idx], scores[idx], torch.zeros_like(idx), cfg.nms_thresh)]
            idx = idx[: cfg.detections_per_img]
            det.update(boxes=boxes[idx], scores=scores[idx], embeddings=emb[idx])
            out.append(det)
        return out

    @torch.no_grad()
    def extract_query(self, images: list[torch.Tensor], boxes_list: list[torch.Tensor]) -> list[torch.Tensor]:
        """Unit embeddings [n, D] of given boxes (original pixels): per box, the embedding of the
        final-step proposal that overlaps it most (our choice; a diffusion model has no
        box-conditioned feature path, and PSTR-style DETR searchers do the same)."""
        original = [tuple(i.shape[-2:]) for i in images]
        image_list, _ = self.transform(list(images))
        dets = self.sample_cached(images, image_list)
        out = []
        for det, qboxes, old, new in zip(dets, boxes_list, original, image_list.image_sizes):
            ry, rx = new[0] / old[0], new[1] / old[1]
            q = qboxes.to(image_list.tensors).reshape(-1, 4) * image_list.tensors.new_tensor([rx, ry, rx, ry])
            if det["all_boxes"].shape[0] == 0:
                out.append(torch.zeros(q.shape[0], self.cfg.emb_dim, device=q.device))
                continue
            best = box_iou(q, det["all_boxes"]).argmax(dim=1)
            out.append(det["all_embeddings"][best])
        return out

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        state = dict(self.backbone.state_dict())
        state.update(self.backbone_c5.state_dict())
        return state


def build_psdiff(cfg: PSDiffModelConfig) -> PSDiff:
    return PSDiff(cfg)
