"""The hybrid pre-training objective (paper Eq. 1): L = L_ps + eta * L_con + lambda * L_adv.

``HybridModel`` wraps the search model with the SimSiam predictor and two intra-task alignment
modules and returns every named loss, the weighted total ("loss") and monitors.

- L_ps: the NAE losses of BOTH views, averaged over the two views (so each name keeps the
  scale of a single NAE step).  OIM runs here rather than inside the RoI head so that, as an
  option (``loss.oim_two_view``), a pseudo-identity's positive can come from the other view:
  each detection person and LUPerson image is its own identity, seen once per epoch, so its
  LUT row is empty on first sight and one epoch stale afterwards.
- L_con: SimSiam between the two views' un-normalised GT-box embeddings (``gt_emb_raw``) of
  the same person (matched by ``track``), only for samples with ``labeled`` False, at most
  ``max_con_boxes`` persons per image (the RoI head embeds only those GT boxes).
- L_adv: detection IAM (image level: backbone C4 map, valid positions only -- never batch
  padding; instance level: the res5 detection-head vectors of the sampled RoIs) and re-ID IAM
  (image level: the RoI-aligned maps; instance level: the re-ID embeddings; both on the
  foreground RoIs only, never on canvas fill), each = img CE + ins CE + consistency,
  computed per view and averaged.  Optional inter-task alignment (paper Tab. 5, off).

Graph safety for DDP: every built module takes part in every step.  Losses that have no
data in a batch (no unlabeled sample, no pair, no sample of an IAM's domains) are a zero
that is still connected to the module's parameters, and switched-off L_det / L_reid are
multiplied by zero; modules for switched-off L_con / L_adv / inter-task are not built at all.
So ``find_unused_parameters`` is not needed.  Note the OIM tables keep updating when
L_reid's switch is off (its backward still runs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from hybridps.pretrain.losses.iam import InterTaskAlignment, IntraTaskAlignment
from hybridps.pretrain.losses.simsiam import PredictionMLP, output_std, simsiam_loss
from hybridps.pretrain.model.config import ModelConfig
from hybridps.pretrain.model.search_model import SearchModel, build_search_model

PS_LOSSES = ("loss_rpn_cls", "loss_rpn_reg", "loss_box_reg", "loss_det_cls", "loss_reid")


@dataclass
class LossConfig:
    """Switches and weights.  eta / lambda_adv are not given in the paper text (its code holds
    them); eta 1.0 follows SimSiam.  lambda_adv 1.0 with a reversal coefficient of 0.1
    (``HybridConfig.grl_coef``) and consistency weight 0.1 follow Domain Adaptive Faster R-CNN's
    reference defaults (loss weights 1.0 / 1.0 / 0.1, GRL weight 0.1)."""

    det: bool = True              # L_det (RPN + box regression + NAE det BCE)
    reid: bool = True             # L_reid (OIM)
    con: bool = True              # L_con (SimSiam on unlabeled samples)
    adv_det: bool = True          # detection IAM
    adv_reid: bool = True         # re-ID IAM
    consistency: bool = True      # L_d.cst inside both IAMs
    inter_task: bool = False      # inter-task alignment (paper Tab. 5; hurts there)
    oim_two_view: bool = False    # pseudo-identities: the other view's embedding as the OIM positive
    eta: float = 1.0
    lambda_adv: float = 1.0
    w_rpn_cls: float = 1.0
    w_rpn_reg: float = 1.0
    w_box_reg: float = 10.0       # NAE4PS README: --w_RCNN_loss_bbox 10
    w_det_cls: float = 1.0
    w_reid: float = 1.0
    w_img: float = 1.0
    w_ins: float = 1.0
    w_cst: float = 0.1
    w_inter: float = 1.0


@dataclass
class HybridConfig:
    """Hybrid-learning modules; ``num_domains`` = number of datasets (manifest "domains")."""

    num_domains: int = 2
    grl_coef: float = 0.1               # reversal coefficient: the features get -grl_coef x the gradient
    max_con_boxes: int = 8              # persons per unlabeled image that L_con / the two-view OIM use
    predictor_hidden: int = 64          # SimSiam bottleneck: emb_dim / 4
    iam_hidden: int = 128                # width of the domain classifiers (cost grows with it on RoI maps)
    # Which datasets each IAM aligns.  "task" (default, the paper's *intra-task* alignment:
    # "two separate IAMs ... to reduce the discrepancy for pedestrian detection and re-ID
    # datasets, respectively"): the detection IAM sees the detection (and person-search)
    # datasets, the re-ID IAM the re-ID datasets; the trainer fills det_domains/reid_domains
    # from the manifest.  "all": both IAMs align every dataset.
    align_scope: str = "task"
    det_domains: list[int] | None = None    # explicit domain list for the detection IAM (None = all)
    reid_domains: list[int] | None = None   # explicit domain list for the re-ID IAM (None = all)
    loss: LossConfig = field(default_factory=LossConfig)


def zero_touch(module: nn.Module) -> torch.Tensor:
    """A zero connected to every trainable parameter of ``module`` (keeps DDP's graph complete)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return torch.zeros(())
    return sum(p.sum() for p in params) * 0.0


def matched_pairs(t1: dict, t2: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (i, j) with view1 box i and view2 box j of the same original box (same track)."""
    if "track" not in t1 or "track" not in t2:
        raise ValueError("targets need 'track' (index of each box in the sample's box list) for L_con")
    a, b = t1["track"], t2["track"].to(t1["track"].device)
    i, j = torch.nonzero(a[:, None] == b[None, :], as_tuple=True)
    return i, j


class HybridModel(nn.Module):
    """Search model + SimSiam predictor + detection/re-ID IAMs (+ optional inter-task module)."""

    def __init__(self, model_cfg: ModelConfig, cfg: HybridConfig | None = None,
                 search_model: SearchModel | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or HybridConfig()
        lc = cfg.loss
        self.search_model = search_model or build_search_model(model_cfg)
        c4, c5 = self.search_model.c4_channels, self.search_model.c5_channels
        emb = model_cfg.emb_dim
        if (lc.adv_det or lc.adv_reid) and cfg.num_domains < 2:
            raise ValueError(f"num_domains={cfg.num_domains}: domain alignment needs >= 2 datasets; "
                             "set hybrid.loss.adv_det and adv_reid to false")
        self.predictor = PredictionMLP(emb, cfg.predictor_hidden) if lc.con else None
        if cfg.max_con_boxes < 1:
            raise ValueError(f"hybrid.max_con_boxes must be >= 1, got {cfg.max_con_boxes}")
        self.det_iam = (IntraTaskAlignment(c4, c5, cfg.num_domains, cfg.grl_coef, cfg.iam_hidden, cfg.iam_hidden)
                        if lc.adv_det else None)
        self.reid_iam = (IntraTaskAlignment(c4, emb, cfg.num_domains, cfg.grl_coef, cfg.iam_hidden, cfg.iam_hidden)
                         if lc.adv_reid else None)
        self.inter_iam = InterTaskAlignment(c4, cfg.grl_coef, cfg.iam_hidden) if lc.inter_task else None

    # ------------------------------------------------------------------ pieces
    def _select_con_boxes(self, t1: list[dict], t2: list[dict], labeled: torch.Tensor
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``need_emb`` flags per view: the persons of unlabeled samples seen in both views, at
        most ``max_con_boxes`` per image (lowest track indices: deterministic)."""
        flags1, flags2 = [], []
        for b, (a, c) in enumerate(zip(t1, t2)):
            n1 = torch.zeros(a["boxes"].shape[0], dtype=torch.bool, device=a["boxes"].device)
            n2 = torch.zeros(c["boxes"].shape[0], dtype=torch.bool, device=c["boxes"].device)
            if not bool(labeled[b]) and (self.predictor is not None or self.cfg.loss.oim_two_view):
                if "track" not in a or "track" not in c:
                    raise ValueError("targets need 'track' (index of each box in the sample's box list) for L_con")
                common = torch.from_numpy(np.intersect1d(a["track"].cpu().numpy(), c["track"].cpu().numpy()))
                chosen = common[: self.cfg.max_con_boxes]
                n1 = torch.isin(a["track"].cpu(), chosen).to(n1.device)
                n2 = torch.isin(c["track"].cpu(), chosen).to(n2.device)
            flags1.append(n1)
            flags2.append(n2)
        return flags1, flags2

    @staticmethod
    def _pair_rows(f1: dict, f2: dict, t1: list[dict], t2: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows into the concatenated gt_emb_raw of each view that form the L_con pairs."""
        device = f1["gt_emb_raw"][0].device
        none = torch.zeros(0, dtype=torch.long, device=device)
        rows1, rows2 = [none], [none]
        off1 = off2 = 0
        for b, (a, c) in enumerate(zip(t1, t2)):
            i, j = matched_pairs({"track": a["track"][a["need_emb"]]}, {"track": c["track"][c["need_emb"]]})
            rows1.append(i.to(device) + off1)
            rows2.append(j.to(device) + off2)
            off1 += f1["gt_emb_raw"][b].shape[0]
            off2 += f2["gt_emb_raw"][b].shape[0]
        return torch.cat(rows1), torch.cat(rows2)

    def _con_loss(self, f1: dict, f2: dict, t1: list[dict], t2: list[dict]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(L_con, simsiam_std monitor, number of pairs).  The predictor runs once per view on
        every step, whatever the number of rows (see PredictionMLP: SyncBN-safe)."""
        h1, h2 = torch.cat(f1["gt_emb_raw"]), torch.cat(f2["gt_emb_raw"])
        r1, r2 = self._pair_rows(f1, f2, t1, t2)
        p1, p2 = self.predictor(h1), self.predictor(h2)
        if r1.numel():
            loss = simsiam_loss(p1[r1], p2[r2], h1[r1], h2[r2])
        else:
            loss = zero_touch(self.predictor).to(h1) + (p1.sum() + p2.sum() + h1.sum() + h2.sum()) * 0.0
        std = output_std(torch.cat([h1[r1], h2[r2]]))
        return loss, std, int(r1.numel())

    def _reid_loss(self, f: dict, other: dict, t_other: list[dict]) -> torch.Tensor:
        """OIM of one view; with ``oim_two_view`` a pseudo-identity's positive logit uses the
        other view's (detached) embedding of the same person instead of its LUT row."""
        oim = self.search_model.roi_heads.reid_loss
        fg = f["roi_fg"]
        x, pids = f["reid_emb"][fg], f["reid_pids"][fg]
        if not self.cfg.loss.oim_two_view:
            return oim(x, pids)
        vecs = torch.cat(other["gt_emb_raw"])
        vec_pids = torch.cat([t["pids"][t["need_emb"]] for t in t_other]).to(pids.device)
        match = (pids[:, None] == vec_pids[None, :]) & (pids[:, None] >= 0)
        has = match.any(dim=1)
        chosen = vecs[match.float().argmax(dim=1)] if vecs.shape[0] else x.detach()
        return oim(x, pids, positive=(chosen, has))

    @staticmethod
    def _valid_mask(f: dict) -> torch.Tensor:
        """[N,h,w] True where the C4 map covers image content (not batch padding)."""
        feat = f["img_feat"]
        n, _, h, w = feat.shape
        ph, pw = f["padded_size"]
        mask = torch.zeros((n, h, w), dtype=torch.bool, device=feat.device)
        for i, (ih, iw) in enumerate(f["image_sizes"]):
            mask[i, : max(1, math.ceil(ih * h / ph)), : max(1, math.ceil(iw * w / pw))] = True
        return mask

    @staticmethod
    def _domain_subset(img_feat, img_domains, ins_feat, ins_idx, allowed, mask=None):
        """Keep the image-level rows whose domain is allowed, and their instances (re-indexed)."""
        if allowed is None:
            return img_feat, img_domains, ins_feat, ins_idx, mask
        keep = torch.isin(img_domains, torch.as_tensor(allowed, device=img_domains.device))
        new_index = torch.cumsum(keep.long(), 0) - 1
        ins_keep = keep[ins_idx]
        return (img_feat[keep], img_domains[keep], ins_feat[ins_keep], new_index[ins_idx[ins_keep]],
                None if mask is None else mask[keep])

    def _iam_losses(self, f: dict, domain: torch.Tensor) -> dict[str, torch.Tensor]:
        """IAM outputs of one view, named loss_{det,reid}_{img,ins,cst}, acc_..., loss_inter."""
        out = {}
        idx = f["roi_batch_idx"]
        named = []
        if self.det_iam is not None:
            args = self._domain_subset(f["img_feat"], domain, f["box_vecs"], idx, self.cfg.det_domains,
                                       self._valid_mask(f))
            named.append(("det", self.det_iam(*args)))
        if self.reid_iam is not None:
            fg = torch.nonzero(f["roi_fg"], as_tuple=True)[0]
            rows = torch.arange(fg.shape[0], device=idx.device)
            args = self._domain_subset(f["roi_maps"][fg], domain[idx[fg]], f["reid_emb"][fg], rows,
                                       self.cfg.reid_domains)
            named.append(("reid", self.reid_iam(*args)))
        for task, res in named:
            for level in ("img", "ins", "cst"):
                out[f"loss_{task}_{level}"] = res[f"loss_{level}"]
            for level in ("img", "ins"):
                out[f"acc_{task}_{level}"] = res[f"acc_{level}"]
        if self.inter_iam is not None:
            res = self.inter_iam(f["img_feat"], f["roi_maps"])
            out["loss_inter"], out["acc_inter"] = res["loss_task"], res["acc_task"]
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """All named losses, "loss" (the weighted total) and monitors for one two-view batch."""
        lc = self.cfg.loss
        v1, v2 = batch["view1"], batch["view2"]
        labeled = torch.as_tensor(batch["labeled"]).bool()
        if labeled.shape[0] != len(v1["images"]) or len(v2["images"]) != len(v1["images"]):
            raise ValueError("batch['labeled'] needs one entry per sample and both views the same samples")
        need1, need2 = self._select_con_boxes(v1["targets"], v2["targets"], labeled)
        t1 = [dict(t, need_emb=n) for t, n in zip(v1["targets"], need1)]
        t2 = [dict(t, need_emb=n) for t, n in zip(v2["targets"], need2)]
        l1, f1 = self.search_model(v1["images"], t1, return_features=True, defer_reid=True)
        l2, f2 = self.search_model(v2["images"], t2, return_features=True, defer_reid=True)
        l1["loss_reid"] = self._reid_loss(f1, f2, t2)
        l2["loss_reid"] = self._reid_loss(f2, f1, t1)
        device = f1["img_feat"].device
        domain = torch.as_tensor(batch["domain"], device=device).long()
        if domain.shape[0] != len(v1["images"]):
            raise ValueError("batch['domain'] needs one entry per sample")
        out = {k: 0.5 * (l1[k] + l2[k]) for k in PS_LOSSES}
        l_det = (lc.w_rpn_cls * out["loss_rpn_cls"] + lc.w_rpn_reg * out["loss_rpn_reg"]
                 + lc.w_box_reg * out["loss_box_reg"] + lc.w_det_cls * out["loss_det_cls"])
        l_reid = lc.w_reid * out["loss_reid"]
        total = l_det * float(lc.det) + l_reid * float(lc.reid)

        if self.predictor is not None:
            out["loss_con"], out["simsiam_std"], pairs = self._con_loss(f1, f2, t1, t2)
            out["con_pairs"] = torch.tensor(float(pairs), device=device)
            total = total + lc.eta * out["loss_con"]

        adv = self._adv_terms(f1, f2, domain, out)
        if adv is not None:
            total = total + lc.lambda_adv * adv
        out["pad_frac"] = torch.tensor(0.5 * (_pad_fraction(f1) + _pad_fraction(f2)), device=device)
        out["loss"] = total
        return out

    def _adv_terms(self, f1: dict, f2: dict, domain: torch.Tensor, out: dict) -> torch.Tensor | None:
        """Average each alignment term over the two views, record it in ``out``, return L_adv."""
        lc = self.cfg.loss
        weights = {"img": lc.w_img, "ins": lc.w_ins, "cst": lc.w_cst * float(lc.consistency), "inter": lc.w_inter}
        a1, a2 = self._iam_losses(f1, domain), self._iam_losses(f2, domain)
        adv = None
        for key in a1:
            if key.startswith("acc_"):
                out[key] = torch.nanmean(torch.stack([a1[key], a2[key]]))
                continue
            value = 0.5 * (a1[key] + a2[key])
            out[key] = value
            term = weights[key.rsplit("_", 1)[-1]] * value
            adv = term if adv is None else adv + term
        return adv


def _pad_fraction(f: dict) -> float:
    """Share of the padded batch tensor's pixels that are padding (monitor)."""
    ph, pw = f["padded_size"]
    content = sum(h * w for h, w in f["image_sizes"])
    return 1.0 - content / (len(f["image_sizes"]) * ph * pw)


def build_hybrid_model(model_cfg: ModelConfig, cfg: HybridConfig | None = None) -> HybridModel:
    """Build the search model and the hybrid-learning modules."""
    return HybridModel(model_cfg, cfg)
