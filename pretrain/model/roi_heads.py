"""NAE RoI heads: proposal labelling/sampling, res5 head, NAE embedding, BN box regressor, OIM.

Proposal labels (internal; NAE4PS uses bg 0 / ignored -1 / pid+1 / 5555 instead):
  ``det`` per proposal: 1 = person (IoU >= roi_fg_iou with a GT box, labelled or not),
  0 = background (IoU < roi_bg_iou), -1 = ignored (IoU in between, or background lying inside
  an ignore region by IoA > ignore_ioa); ignored proposals are never sampled.
  ``pid`` per person proposal: the matched GT pid (>= 0 identity, -1 unlabelled -> OIM queue).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import MultiScaleRoIAlign, box_iou, boxes as box_ops

from hybridps.pretrain.losses.fc import FCLoss
from hybridps.pretrain.losses.oim import OIMLoss
from hybridps.pretrain.losses.ugas import self_distillation, table_logits, uncertainty_weighted
from hybridps.pretrain.model.box_ops import inside_ignore
from hybridps.pretrain.model.config import ModelConfig
from hybridps.pretrain.model.embedding import BNBoxRegressor, NormAwareEmbedding, max_pool_flat
from hybridps.pretrain.model.iidfc import PedestrianAttention
from hybridps.pretrain.model.ugas import ShallowFusion, UncertaintyHead, fuse_embeddings

FEATURE = "feat_res4"


@contextmanager
def batchnorm_eval(*modules: nn.Module):
    """Temporarily run every BatchNorm of ``modules`` on its running statistics.

    Used for the extra ground-truth rows that L_con needs: they go through the RoI head but
    must not enter the batch statistics (fine-tuning never sees such rows)."""
    bns = [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in bns]
    try:
        for m in bns:
            m.train(False)
        yield
    finally:
        for m, mode in zip(bns, modes):
            m.train(mode)


class NAERoIHeads(nn.Module):
    """Second stage of the NAE model; see the module docstring for the labelling."""

    def __init__(self, cfg: ModelConfig, box_head: nn.Module, c4: int, c5: int, c3: int | None = None) -> None:
        super().__init__()
        self.box_roi_pool = MultiScaleRoIAlign([FEATURE], cfg.roi_output_size, cfg.roi_sampling_ratio)
        self.box_head = box_head
        self.box_predictor = BNBoxRegressor(c5)
        self.embedding_head = NormAwareEmbedding({"feat_res4": c4, "feat_res5": c5}, cfg.emb_dim)
        self.reid_loss = _reid_loss(cfg, cfg.emb_dim)
        # UGAS / IIDFC options (None when off, so the plain model's keys are unchanged)
        self.pam = PedestrianAttention(cfg.iidfc_pam_channels) if cfg.iidfc_pam else None
        self.sfm = self.reid_loss_shallow = None
        if cfg.ugas_sfm:
            if c3 is None:
                raise ValueError("model.ugas_sfm needs the shallow trunk stage's channels")
            self.sfm = ShallowFusion(c3, c4, cfg.ugas_sfm_channels, cfg.ugas_sfm_dim, cfg.roi_output_size,
                                     cfg.roi_sampling_ratio)
            self.reid_loss_shallow = _reid_loss(cfg, cfg.ugas_sfm_dim)
        self.uncertainty = UncertaintyHead(c5) if cfg.ugas_uncertainty else None   # training only
        self.distill_temp = cfg.ugas_distill_temp if cfg.ugas_distill else None
        self.out_dim = cfg.emb_dim + (cfg.ugas_sfm_dim if cfg.ugas_sfm else 0)
        self.matcher = det_utils.Matcher(cfg.roi_fg_iou, cfg.roi_bg_iou, allow_low_quality_matches=False)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(cfg.roi_batch_size, cfg.roi_pos_fraction)
        self.box_coder = det_utils.BoxCoder(tuple(cfg.box_coder_weights))
        self.ignore_ioa = cfg.ignore_ioa
        self.box_loss_beta = cfg.box_loss_beta
        self.score_thresh, self.nms_thresh = cfg.score_thresh, cfg.nms_thresh
        self.detections_per_img = cfg.detections_per_img

    # ------------------------------------------------------------------ labelling
    def label_proposals(self, proposals: torch.Tensor, target: dict[str, torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (det label [P], pid [P], matched GT box [P,4]) for one image."""
        gt_boxes, gt_pids = target["boxes"], target["pids"]
        n = proposals.shape[0]
        if gt_boxes.numel() == 0:
            det = torch.zeros(n, dtype=torch.long, device=proposals.device)
            pids = torch.full((n,), -1, dtype=torch.long, device=proposals.device)
            matched = torch.zeros_like(proposals)
        else:
            idx = self.matcher(box_iou(gt_boxes, proposals))
            det = torch.ones(n, dtype=torch.long, device=proposals.device)
            det[idx == self.matcher.BELOW_LOW_THRESHOLD] = 0
            det[idx == self.matcher.BETWEEN_THRESHOLDS] = -1
            safe = idx.clamp(min=0)
            pids, matched = gt_pids[safe], gt_boxes[safe]
        det[inside_ignore(proposals, target.get("ignore"), self.ignore_ioa) & (det == 0)] = -1
        return det, pids, matched

    def sample(self, proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict:
        """Append GT boxes to the proposals, label them and sample a balanced RoI batch.

        ``gt_rows[i][j]``: the row of GT box j among image i's sampled RoIs, -1 if not sampled.
        """
        out = {"boxes": [], "det": [], "pids": [], "reg_targets": [], "gt_rows": []}
        labelled = []
        for props, target in zip(proposals, targets):
            props = torch.cat([props, target["boxes"].to(props)])
            labelled.append((props, *self.label_proposals(props, target)))
        pos, neg = self.sampler([det for _, det, _, _ in labelled])
        for (props, det, pids, matched), p, q, target in zip(labelled, pos, neg, targets):
            keep = torch.where(p | q)[0]
            n_gt = target["boxes"].shape[0]
            where = torch.full((props.shape[0],), -1, dtype=torch.long, device=props.device)
            where[keep] = torch.arange(keep.numel(), device=props.device)
            out["gt_rows"].append(where[props.shape[0] - n_gt:])
            out["boxes"].append(props[keep])
            out["det"].append(det[keep])
            out["pids"].append(pids[keep])
            out["reg_targets"].append(self.box_coder.encode_single(matched[keep], props[keep]))
        return out

    # ------------------------------------------------------------------ features
    def roi_features(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                     image_shapes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """RoIAlign on C4, the res5 head and max pooling -> maps and pooled vectors."""
        maps = self.box_roi_pool(features, boxes, image_shapes)
        res5 = self.box_head(maps)
        if self.pam is not None:
            res5 = self.pam(res5)
        return {"roi_maps": maps, "feat_res4": max_pool_flat(maps), "feat_res5": max_pool_flat(res5)}

    def embed_boxes(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                    image_shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Unit-norm embeddings of the given boxes (NAE query path), one tensor per image."""
        if sum(b.shape[0] for b in boxes) == 0:
            return [b.new_zeros((0, self.out_dim)) for b in boxes]
        emb, _ = self.embed(features, self.roi_features(features, boxes, image_shapes), boxes, image_shapes)
        return list(emb.split([b.shape[0] for b in boxes]))

    def shallow_embedding(self, features, f, boxes, image_shapes) -> torch.Tensor:
        """Unit shallow (SFM) embeddings [R, ugas_sfm_dim]."""
        return F.normalize(self.sfm(features, f["roi_maps"], boxes, image_shapes), dim=1)

    def embed(self, features, f, boxes, image_shapes) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference re-ID vectors [R, out_dim] and detection logits [R]: NAE, with the SFM's
        shallow vector concatenated when ``ugas_sfm`` is on."""
        emb, logits = self.embedding_head(f)
        if self.sfm is not None:
            emb = fuse_embeddings(emb, self.shallow_embedding(features, f, boxes, image_shapes))
        return emb, logits

    # ------------------------------------------------------------------ forward
    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]], targets: list[dict[str, torch.Tensor]] | None = None,
                return_features: bool = False, defer_reid: bool = False):
        """Training: (losses, feats or None); ``defer_reid`` leaves OIM to the caller (the hybrid
        objective adds the two-view positive).  Eval: list of {boxes, scores, embeddings}."""
        if self.training:
            if targets is None:
                raise ValueError("NAERoIHeads needs targets in training mode")
            return self._train_forward(features, proposals, image_shapes, targets, return_features, defer_reid)
        return self._detect(features, proposals, image_shapes)

    def _train_forward(self, features, proposals, image_shapes, targets, return_features, defer_reid=False):
        s = self.sample([p.detach() for p in proposals], targets)
        f = self.roi_features(features, s["boxes"], image_shapes)
        raw = self.embedding_head.project(f)
        deltas = self.box_predictor(f["feat_res5"])
        emb, logits = self.embedding_head.split(raw)
        det = torch.cat(s["det"])
        pids = torch.cat(s["pids"])
        fg = det > 0
        losses = {
            "loss_box_reg": self._box_loss(deltas, torch.cat(s["reg_targets"]), fg, self.box_loss_beta),
            "loss_det_cls": F.binary_cross_entropy_with_logits(logits, fg.float()) if det.numel()
            else logits.sum() * 0.0,
        }
        if not defer_reid:
            losses.update(self._reid_losses(features, f, s["boxes"], image_shapes, emb, fg, pids))
        if not return_features:
            return losses, None
        counts = [b.shape[0] for b in s["boxes"]]
        starts = [0] + torch.tensor(counts).cumsum(0).tolist()[:-1]
        feats = {
            "roi_maps": f["roi_maps"],
            "box_vecs": f["feat_res5"].flatten(1),
            "reid_emb": emb,
            "reid_pids": pids,
            "roi_fg": fg,
            "roi_batch_idx": torch.cat([torch.full((c,), i, dtype=torch.long, device=emb.device)
                                        for i, c in enumerate(counts)]),
            "gt_emb_raw": self._gt_embeddings(features, image_shapes, targets, s["gt_rows"], raw, starts),
        }
        return losses, feats

    def _reid_losses(self, features, f, boxes, image_shapes, emb, fg, pids) -> dict[str, torch.Tensor]:
        """loss_reid (OIM, or FC), plus with UGAS loss_reid_shallow / loss_distill; with
        Uncertainty Guidance the per-sample re-ID losses are variance-weighted."""
        x, y = emb[fg], pids[fg]
        log_var = None
        if self.uncertainty is not None:
            log_var = self.uncertainty(f["feat_res5"][fg])[y >= 0]
        out = {"loss_reid": self._weighted(self.reid_loss, x, y, log_var)}
        if self.sfm is None:
            return out
        xs = self.shallow_embedding(features, f, boxes, image_shapes)[fg]
        out["loss_reid_shallow"] = self._weighted(self.reid_loss_shallow, xs, y, log_var)
        if self.distill_temp is not None:
            known = y >= 0
            with torch.no_grad():
                teacher = table_logits(x[known], self.reid_loss._banks(), self.reid_loss.scalar)
            student = table_logits(xs[known], self.reid_loss_shallow._banks(), self.reid_loss_shallow.scalar)
            out["loss_distill"] = self_distillation(student, teacher, self.distill_temp)
        return out

    @staticmethod
    def _weighted(oim: OIMLoss, x, y, log_var):
        if log_var is None:
            return oim(x, y)
        return uncertainty_weighted(oim(x, y, reduction="none"), log_var)

    def _gt_embeddings(self, features, image_shapes, targets, gt_rows, raw, starts) -> list[torch.Tensor]:
        """Un-normalised embeddings of the GT boxes flagged ``need_emb`` (in box order).

        A flagged box that was sampled reuses its row; the others ride in a second, small pass
        whose BatchNorms use their running statistics, so these rows never shape the batch
        statistics that fine-tuning would not see."""
        need = [t.get("need_emb", torch.zeros(t["boxes"].shape[0], dtype=torch.bool)).to(r.device).bool()
                for t, r in zip(targets, gt_rows)]
        extra = [t["boxes"][n & (r < 0)].to(raw) for t, n, r in zip(targets, need, gt_rows)]
        raw_extra = raw[:0]
        if sum(e.shape[0] for e in extra):
            with batchnorm_eval(self.box_head, self.embedding_head):
                raw_extra = self.embedding_head.project(self.roi_features(features, extra, image_shapes))
        out, offset = [], 0
        for n, r, start, e in zip(need, gt_rows, starts, extra):
            rows = r[n]
            rows_raw = raw.new_zeros((rows.shape[0], raw.shape[1]))
            sampled = rows >= 0
            rows_raw[sampled] = raw[rows[sampled] + start]
            rows_raw[~sampled] = raw_extra[offset: offset + e.shape[0]]
            offset += e.shape[0]
            out.append(rows_raw)
        return out

    @staticmethod
    def _box_loss(deltas: torch.Tensor, reg_targets: torch.Tensor, fg: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        """Fast R-CNN box loss as NAE/SeqNet: smooth L1 (beta 1.0) summed over fg, / all sampled."""
        if deltas.shape[0] == 0:
            return deltas.sum() * 0.0
        loss = F.smooth_l1_loss(deltas[fg], reg_targets[fg], beta=beta, reduction="sum")
        return loss / deltas.shape[0]

    def _detect(self, features, proposals, image_shapes) -> list[dict[str, torch.Tensor]]:
        counts = [p.shape[0] for p in proposals]
        if sum(counts) == 0:
            return [self._empty_detection(features) for _ in proposals]
        f = self.roi_features(features, proposals, image_shapes)
        emb, logits = self.embed(features, f, proposals, image_shapes)
        boxes = self.box_coder.decode_single(self.box_predictor(f["feat_res5"]), torch.cat(proposals))
        scores = torch.sigmoid(logits)
        results = []
        for b, s, e, shape in zip(boxes.split(counts), scores.split(counts), emb.split(counts), image_shapes):
            b = box_ops.clip_boxes_to_image(b, shape)
            keep = box_ops.remove_small_boxes(b, 1e-2)
            keep = keep[s[keep] > self.score_thresh]
            keep = keep[box_ops.nms(b[keep], s[keep], self.nms_thresh)][: self.detections_per_img]
            results.append({"boxes": b[keep], "scores": s[keep], "embeddings": e[keep]})
        return results

    def _empty_detection(self, features) -> dict[str, torch.Tensor]:
        ref = next(iter(features.values()))
        return {"boxes": ref.new_zeros((0, 4)), "scores": ref.new_zeros((0,)),
                "embeddings": ref.new_zeros((0, self.out_dim))}


def _reid_loss(cfg: ModelConfig, dim: int) -> OIMLoss:
    """OIM, or IIDFC's FC loss on the same tables when ``iidfc_fc`` is on."""
    if cfg.iidfc_fc:
        loss = FCLoss(dim, cfg.num_pids, cfg.cq_size, cfg.oim_momentum, cfg.oim_scalar, cfg.lut_dtype,
                      cfg.iidfc_m1, cfg.iidfc_m2)
        loss.sample = cfg.oim_sample          # the sampled columns work for FC too (targets = column positions)
        return loss
    return OIMLoss(dim, cfg.num_pids, cfg.cq_size, cfg.oim_momentum, cfg.oim_scalar, cfg.lut_dtype,
                   sample=cfg.oim_sample)
