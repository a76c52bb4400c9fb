"""The hybrid pre-training objective (paper Eq. 1): L = L_ps + eta * L_con + lambda * L_adv.

``HybridModel`` wraps the search model with the SimSiam predictor and two intra-task alignment
modules and returns every named loss, the weighted total ("loss") and monitors.

- L_ps: the NAE losses of BOTH views, averaged over the two views (so each name keeps the
  scale of a single NAE step).
- L_con: SimSiam between the two views' un-normalised GT-box embeddings (``gt_emb_raw``) of
  the same person (matched by ``track``), only for samples with ``labeled`` False.
- L_adv: detection IAM (image level: backbone C4 map; instance level: the res5 detection-head
  vectors of the sampled RoIs) and re-ID IAM (image level: the RoI-aligned maps; instance
  level: the re-ID embeddings of the same RoIs), each = img CE + ins CE + consistency,
  computed per view and averaged.  Optional inter-task alignment (paper Tab. 5, off).

Graph safety for DDP: every built module takes part in every step.  Losses that have no
data in a batch (no unlabeled sample, no pair, no sample of an IAM's domains) are a zero
that is still connected to the module's parameters, and switched-off L_det / L_reid are
multiplied by zero; modules for switched-off L_con / L_adv / inter-task are not built at all.
So ``find_unused_parameters`` is not needed.  Note the OIM tables keep updating when
L_reid's switch is off (its backward still runs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pretrain.losses.iam import InterTaskAlignment, IntraTaskAlignment
from pretrain.losses.simsiam import PredictionMLP, output_std, simsiam_loss
from pretrain.model.config import ModelConfig
from pretrain.model.search_model import SearchModel, build_search_model

PS_LOSSES = ("loss_rpn_cls", "loss_rpn_reg", "loss_box_reg", "loss_det_cls", "loss_reid")


@dataclass
class LossConfig:
    """Switches and weights.  eta / lambda_adv are not given in the paper text (its code holds
    them); eta 1.0 follows SimSiam, lambda 0.1 follows Domain Adaptive Faster R-CNN."""

    det: bool = True              # L_det (RPN + box regression + NAE det BCE)
    reid: bool = True             # L_reid (OIM)
    con: bool = True              # L_con (SimSiam on unlabeled samples)
    adv_det: bool = True          # detection IAM
    adv_reid: bool = True         # re-ID IAM
    consistency: bool = True      # L_d.cst inside both IAMs
    inter_task: bool = False      # inter-task alignment (paper Tab. 5; hurts there)
    eta: float = 1.0
    lambda_adv: float = 0.1
    w_rpn_cls: float = 1.0
    w_rpn_reg: float = 1.0
    w_box_reg: float = 10.0       # NAE4PS README: --w_RCNN_loss_bbox 10
    w_det_cls: float = 1.0
    w_reid: float = 1.0
    w_img: float = 1.0
    w_ins: float = 1.0
    w_cst: float = 1.0
    w_inter: float = 1.0


@dataclass
class HybridConfig:
    """Hybrid-learning modules; ``num_domains`` = number of datasets (manifest "domains")."""

    num_domains: int = 2
    grl_coef: float = 1.0
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
        self.det_iam = (IntraTaskAlignment(c4, c5, cfg.num_domains, cfg.grl_coef, cfg.iam_hidden, cfg.iam_hidden)
                        if lc.adv_det else None)
        self.reid_iam = (IntraTaskAlignment(c4, emb, cfg.num_domains, cfg.grl_coef, cfg.iam_hidden, cfg.iam_hidden)
                         if lc.adv_reid else None)
        self.inter_iam = InterTaskAlignment(c4, cfg.grl_coef, cfg.iam_hidden) if lc.inter_task else None

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _pair_rows(f1: dict, f2: dict, t1: list[dict], t2: list[dict], labeled: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows into the concatenated gt_emb_raw of each view that form the L_con pairs."""
        device = f1["gt_emb_raw"][0].device
        none = torch.zeros(0, dtype=torch.long, device=device)
        rows1, rows2 = [none], [none]
        off1 = off2 = 0
        for b, (a, c) in enumerate(zip(t1, t2)):
            if not bool(labeled[b]):
                i, j = matched_pairs(a, c)
                rows1.append(i.to(device) + off1)
                rows2.append(j.to(device) + off2)
            off1 += f1["gt_emb_raw"][b].shape[0]
            off2 += f2["gt_emb_raw"][b].shape[0]
        return torch.cat(rows1), torch.cat(rows2)

    def _con_loss(self, f1: dict, f2: dict, t1: list[dict], t2: list[dict], labeled: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(L_con, simsiam_std monitor, number of pairs)."""
        h1, h2 = torch.cat(f1["gt_emb_raw"]), torch.cat(f2["gt_emb_raw"])
        r1, r2 = self._pair_rows(f1, f2, t1, t2, labeled)
        # The predictor's BatchNorm needs >= 2 rows, so it runs on every GT box of a view and
        # the pairs are picked afterwards; with fewer rows only a graph-connected zero remains.
        if h1.shape[0] < 2 or h2.shape[0] < 2:
            loss = zero_touch(self.predictor).to(h1) + (h1.sum() + h2.sum()) * 0.0
        else:
            p1, p2 = self.predictor(h1), self.predictor(h2)
            if r1.numel():
                loss = simsiam_loss(p1[r1], p2[r2], h1[r1], h2[r2])
            else:
                loss = (p1.sum() + p2.sum()) * 0.0
        std = output_std(torch.cat([h1[r1], h2[r2]]) if r1.numel() else torch.cat([h1, h2]))
        return loss, std, int(r1.numel())

    @staticmethod
    def _domain_subset(img_feat, img_domains, ins_feat, ins_idx, allowed):
        """Keep the image-level rows whose domain is allowed, and their instances (re-indexed)."""
        if allowed is None:
            return img_feat, img_domains, ins_feat, ins_idx
        keep = torch.isin(img_domains, torch.as_tensor(allowed, device=img_domains.device))
        new_index = torch.cumsum(keep.long(), 0) - 1
        ins_keep = keep[ins_idx]
        return img_feat[keep], img_domains[keep], ins_feat[ins_keep], new_index[ins_idx[ins_keep]]

    def _iam_losses(self, f: dict, domain: torch.Tensor) -> dict[str, torch.Tensor]:
        """IAM outputs of one view, named loss_{det,reid}_{img,ins,cst}, acc_..., loss_inter."""
        out = {}
        idx = f["roi_batch_idx"]
        named = []
        if self.det_iam is not None:
            args = self._domain_subset(f["img_feat"], domain, f["box_vecs"], idx, self.cfg.det_domains)
            named.append(("det", self.det_iam(*args)))
        if self.reid_iam is not None:
            rows = torch.arange(idx.shape[0], device=idx.device)
            args = self._domain_subset(f["roi_maps"], domain[idx], f["reid_emb"], rows, self.cfg.reid_domains)
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
        l1, f1 = self.search_model(v1["images"], v1["targets"], return_features=True)
        l2, f2 = self.search_model(v2["images"], v2["targets"], return_features=True)
        device = f1["img_feat"].device
        domain = torch.as_tensor(batch["domain"], device=device).long()
        labeled = torch.as_tensor(batch["labeled"]).bool()
        if domain.shape[0] != len(v1["images"]) or labeled.shape[0] != len(v1["images"]):
            raise ValueError("batch['domain'] and batch['labeled'] need one entry per sample")
        out = {k: 0.5 * (l1[k] + l2[k]) for k in PS_LOSSES}
        l_det = (lc.w_rpn_cls * out["loss_rpn_cls"] + lc.w_rpn_reg * out["loss_rpn_reg"]
                 + lc.w_box_reg * out["loss_box_reg"] + lc.w_det_cls * out["loss_det_cls"])
        l_reid = lc.w_reid * out["loss_reid"]
        total = l_det * float(lc.det) + l_reid * float(lc.reid)

        if self.predictor is not None:
            out["loss_con"], out["simsiam_std"], pairs = self._con_loss(
                f1, f2, v1["targets"], v2["targets"], labeled)
            out["con_pairs"] = torch.tensor(float(pairs), device=device)
            total = total + lc.eta * out["loss_con"]

        adv = self._adv_terms(f1, f2, domain, out)
        if adv is not None:
            total = total + lc.lambda_adv * adv
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


def build_hybrid_model(model_cfg: ModelConfig, cfg: HybridConfig | None = None) -> HybridModel:
    """Build the search model and the hybrid-learning modules."""
    return HybridModel(model_cfg, cfg)
