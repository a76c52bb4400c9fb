"""PSDiff's dual noise generator and the DDIM step (seed Eq. 10, Alg. 1-2).

Boxes live in the diffusion space as ``s1 * (cxcywh / image_size * 2 - 1)``, embeddings as
``s2 * Norm(e)``.  ``Norm`` is our choice: the unit teacher embedding times sqrt(D), so each
of its D values has RMS 1 like the box coordinates in [-1, 1] (the seed only says Norm
rescales into [-1, 1]; unit vectors would leave 256-d values near 0.06, far below the noise).
The noise schedule is DiffusionDet's: cosine alphas (Nichol & Dhariwal, s = 0.008) over T steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.ops import box_convert


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """alpha-bar_t for t = 0..T-1 (float64), the cosine schedule with betas clipped at 0.999."""
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    f = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    f = f / f[0]
    betas = (1 - f[1:] / f[:-1]).clamp(0, 0.999)
    return torch.cumprod(1.0 - betas, dim=0)


def unit_to_signal(emb: torch.Tensor, scale: float) -> torch.Tensor:
    """Embedding (any norm) -> diffusion space: scale * unit(emb) * sqrt(D)."""
    unit = emb / emb.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return unit * math.sqrt(emb.shape[-1]) * scale


def boxes_to_signal(boxes_xyxy: torch.Tensor, wh: torch.Tensor, scale: float) -> torch.Tensor:
    """Absolute xyxy boxes [N,4] of an image of size wh=(w,h) -> scale * (cxcywh/size * 2 - 1)."""
    norm = box_convert(boxes_xyxy, "xyxy", "cxcywh") / torch.cat([wh, wh])
    return (norm * 2 - 1) * scale


def signal_to_boxes(signal: torch.Tensor, wh: torch.Tensor, scale: float) -> torch.Tensor:
    """Inverse of :func:`boxes_to_signal` after clamping to [-scale, scale] (DiffusionDet)."""
    norm = (signal.clamp(-scale, scale) / scale + 1) / 2
    return box_convert(norm, "cxcywh", "xyxy") * torch.cat([wh, wh])


@dataclass
class NoisyTargets:
    """One image's training inputs: N noisy boxes (xyxy pixels) and embeddings (signal space)."""

    boxes: torch.Tensor        # [N,4] absolute xyxy, what the RoI pooling reads
    embeddings: torch.Tensor   # [N,D] noisy embedding signal e_t
    t: torch.Tensor            # [] int64 timestep


class DualNoiseGenerator:
    """q(b_t | b_0), q(e_t | e_0) with one alpha-bar_t for both (seed Eq. 10).

    The ground truths are duplicated uniformly up to ``n_train`` per image (PSDiff; DiffusionDet
    pads with random boxes instead); with more persons than ``n_train`` a random subset is kept.
    An image without persons gets random boxes and embeddings (pure noise targets).
    """

    def __init__(self, timesteps: int, n_train: int, box_scale: float, emb_scale: float) -> None:
        self.timesteps, self.n_train = timesteps, n_train
        self.box_scale, self.emb_scale = box_scale, emb_scale
        self.alphas_cumprod = cosine_alphas_cumprod(timesteps)

    def repeat_index(self, n_gt: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Indices into the n_gt ground truths, each used floor/ceil(N/n_gt) times."""
        if n_gt >= self.n_train:
            return torch.randperm(n_gt, generator=generator)[: self.n_train]
        reps = torch.arange(n_gt).repeat(self.n_train // n_gt)
        extra = torch.randperm(n_gt, generator=generator)[: self.n_train - reps.numel()]
        return torch.cat([reps, extra])

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def corrupt(self, gt_boxes: torch.Tensor, gt_emb: torch.Tensor, wh: torch.Tensor,
                generator: torch.Generator | None = None) -> NoisyTargets:
        device, dim = gt_boxes.device, gt_emb.shape[-1]
        t = torch.randint(0, self.timesteps, (), generator=generator).to(device)
        n = gt_boxes.shape[0]
        if n == 0:
            box0 = torch.randn(self.n_train, 4, generator=generator).to(device) / 6 * self.box_scale
            emb0 = torch.randn(self.n_train, dim, generator=generator).to(device)
            box0, emb0 = box0.clamp(-self.box_scale, self.box_scale), unit_to_signal(emb0, self.emb_scale)
        else:
            idx = self.repeat_index(n, generator).to(device)
            box0 = boxes_to_signal(gt_boxes[idx], wh, self.box_scale)
            emb0 = unit_to_signal(gt_emb[idx], self.emb_scale)
        nb = torch.randn(box0.shape, generator=generator).to(device)
        ne = torch.randn(emb0.shape, generator=generator).to(device)
        bt = self.q_sample(box0, t, nb).clamp(-self.box_scale, self.box_scale)
        et = self.q_sample(emb0, t, ne)
        boxes = signal_to_boxes(bt, wh, self.box_scale)
        return NoisyTargets(boxes, et, t)

    # ------------------------------------------------------------------ sampling
    def ddim_times(self, steps: int) -> list[tuple[int, int]]:
        """(t, t_next) pairs from T-1 down to -1 in ``steps`` jumps (DiffusionDet's spacing)."""
        times = torch.linspace(-1, self.timesteps - 1, steps + 1).round().long().tolist()[::-1]
        return list(zip(times[:-1], times[1:]))

    def predicted_noise(self, x_t: torch.Tensor, x0: torch.Tensor, t: int) -> torch.Tensor:
        ab = float(self.alphas_cumprod[t])
        return (x_t / math.sqrt(ab) - x0) / math.sqrt(1 / ab - 1)

    def ddim_step(self, x0: torch.Tensor, eps: torch.Tensor, t: int, t_next: int, eta: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """x_{t_next} from the predicted x0 and noise (DDIM, Song et al.; eta=1 as DiffusionDet)."""
        a, a_next = float(self.alphas_cumprod[t]), float(self.alphas_cumprod[t_next])
        sigma = eta * math.sqrt((1 - a / a_next) * (1 - a_next) / (1 - a))
        c = math.sqrt(max(0.0, 1 - a_next - sigma ** 2))
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        return x0 * math.sqrt(a_next) + c * eps + sigma * noise
