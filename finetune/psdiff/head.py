"""The Collaborative Denoising Layer (seed section IV-B3, Fig. 2-3), one module per stage.

Per proposal a stage gets its box (RoI features F_d [N, S*S, C] by RoIAlign on the FPN) and
its re-ID feature F_r [N, C] (a projection of the current embedding signal), then

* detection branch: self-attention over the proposals (on the RoI-mean features), then a
  dynamic convolution of F_d whose kernels are produced from F_r (re-ID -> detection);
* re-ID branch: cross-attention with F_r as the query and the proposal's S*S RoI positions
  as keys/values (detection -> re-ID);
* F_c = [F_d', F_r'] (N, 2C), modulated by the time embedding (scale/shift, DiffusionDet);
* cascaded prediction: F_c -> embedding e0_hat first, then F_o = e0_hat -> person logit and
  box deltas (seed IV-B3b: the detection head reads the predicted embedding).  With
  ``det_reads_collab`` (our default) the detection head reads [e0_hat, F_c]: read literally,
  F_o = e0_hat gives every proposal on the same person the same input once the embeddings
  match the teacher, so neither the score nor the box deltas can depend on where the proposal
  lies (a one-box overfit does not learn its box; see tests/test_psdiff.py).

Our choices (the seed gives no numbers): the RoI-mean token plus a linear embedding of the
proposal's normalised cxcywh for the self-attention (RoI content alone does not say where a
proposal lies, which slows learning from scratch on small data), one
query token per proposal in the cross-attention, Sparse R-CNN's two-layer dynamic conv
(C -> dim_dynamic -> C), its box-delta parametrisation (weights 2,2,1,1) and Xavier init.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BOX_WEIGHTS = (2.0, 2.0, 1.0, 1.0)
SCALE_CLAMP = math.log(100000.0 / 16)


class SinusoidalTime(nn.Module):
    """t -> [sin, cos] features of width ``dim`` (Transformer / DDPM style)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freq = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
        arg = t.float()[:, None] * freq[None]
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


def time_mlp(dim: int) -> nn.Module:
    return nn.Sequential(SinusoidalTime(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, 4 * dim))


def apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Sparse R-CNN's (dx, dy, dw, dh) with weights (2, 2, 1, 1) on xyxy boxes."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = BOX_WEIGHTS
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw, dh = (deltas[:, 2] / ww).clamp(max=SCALE_CLAMP), (deltas[:, 3] / wh).clamp(max=SCALE_CLAMP)
    pcx, pcy = dx * widths + cx, dy * heights + cy
    pw, ph = dw.exp() * widths, dh.exp() * heights
    return torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], dim=-1)


class DynamicConv(nn.Module):
    """Two per-proposal 1x1 convolutions over the S*S RoI positions, kernels from ``params_from``."""

    def __init__(self, dim: int, dim_dynamic: int, pooler_size: int) -> None:
        super().__init__()
        self.dim, self.dd = dim, dim_dynamic
        self.kernels = nn.Linear(dim, 2 * dim * dim_dynamic)
        self.norm1, self.norm2 = nn.LayerNorm(dim_dynamic), nn.LayerNorm(dim)
        self.out = nn.Linear(dim * pooler_size ** 2, dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, roi: torch.Tensor, params_from: torch.Tensor) -> torch.Tensor:
        """roi [N, S*S, C], params_from [N, C] -> [N, C]."""
        params = self.kernels(params_from)
        w1 = params[:, : self.dim * self.dd].view(-1, self.dim, self.dd)
        w2 = params[:, self.dim * self.dd:].view(-1, self.dd, self.dim)
        x = F.relu(self.norm1(torch.bmm(roi, w1)))
        x = F.relu(self.norm2(torch.bmm(x, w2)))
        return F.relu(self.norm3(self.out(x.flatten(1))))


class CDLStage(nn.Module):
    """One Collaborative Denoising Layer stage; see the module docstring."""

    def __init__(self, dim: int, emb_dim: int, dim_dynamic: int, heads: int, pooler_size: int,
                 dropout: float = 0.0, prior_prob: float = 0.01, det_reads_collab: bool = True) -> None:
        super().__init__()
        self.det_reads_collab = det_reads_collab
        self.emb_in = nn.Linear(emb_dim, dim)                      # F_r from the embedding signal
        self.box_in = nn.Linear(4, dim)                            # where the proposal is (ours)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_sa = nn.LayerNorm(dim)
        self.dynamic = DynamicConv(dim, dim_dynamic, pooler_size)
        self.norm_dc = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_ca = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(2 * dim, 4 * dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(4 * dim, 2 * dim))
        self.norm_ffn = nn.LayerNorm(2 * dim)
        self.time_scale_shift = nn.Sequential(nn.SiLU(), nn.Linear(4 * dim, 4 * dim))
        # cascaded prediction: embedding first, then the detection head reads it
        self.emb_head = nn.Sequential(nn.Linear(2 * dim, dim), nn.LayerNorm(dim), nn.ReLU(inplace=True),
                                      nn.Linear(dim, emb_dim))
        det_width = emb_dim + 2 * dim if det_reads_collab else emb_dim
        self.det_in = nn.Sequential(nn.Linear(det_width, dim), nn.LayerNorm(dim), nn.ReLU(inplace=True))
        self.cls_tower = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(inplace=True))
        self.reg_tower = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(inplace=True),
                                       nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(inplace=True))
        self.cls_logit = nn.Linear(dim, 1)
        self.box_delta = nn.Linear(dim, 4)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.cls_logit.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.box_delta.weight)
        nn.init.zeros_(self.box_delta.bias)

    def forward(self, roi: torch.Tensor, emb_signal: torch.Tensor, boxes: torch.Tensor, box_geom: torch.Tensor,
                time_feat: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """roi [B*N, S*S, C], emb_signal [B*N, D], boxes [B*N, 4] (pixels), box_geom [B*N, 4] (cxcywh
        / image size), time_feat [B, 4C] -> (logits [B*N], boxes [B*N, 4], raw embeddings [B*N, D])."""
        n_all, _, dim = roi.shape
        f_r = self.emb_in(emb_signal)
        # detection branch: self-attention over the proposals of each image ...
        tok = (roi.mean(dim=1) + self.box_in(box_geom)).view(batch, n_all // batch, dim)
        tok = self.norm_sa(tok + self.self_attn(tok, tok, tok, need_weights=False)[0]).reshape(n_all, dim)
        # ... then dynamic convolution with kernels from the re-ID feature
        f_d = self.norm_dc(tok + self.dynamic(roi, f_r))
        # re-ID branch: cross-attention, F_r queries the proposal's RoI positions
        f_r2 = self.norm_ca(f_r + self.cross_attn(f_r[:, None], roi, roi, need_weights=False)[0][:, 0])
        f_c = torch.cat([f_d, f_r2], dim=-1)
        f_c = self.norm_ffn(f_c + self.ffn(f_c))
        scale, shift = self.time_scale_shift(time_feat).repeat_interleave(n_all // batch, dim=0).chunk(2, dim=-1)
        f_c = f_c * (scale + 1) + shift
        emb = self.emb_head(f_c)
        f_o = self.det_in(torch.cat([emb, f_c], dim=-1) if self.det_reads_collab else emb)
        logits = self.cls_logit(self.cls_tower(f_o)).squeeze(-1)
        new_boxes = apply_deltas(self.box_delta(self.reg_tower(f_o)), boxes.detach())
        return logits, new_boxes, emb
