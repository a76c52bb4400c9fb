"""Time one pre-training step: single-view NAE vs the full hybrid step, and the OIM loss cost.

Usage: python benchmarks/train_step.py [--backbone resnet18] [--min-size 320] [--max-size 480]
           [--roi-batch 32] [--steps 3] [--warmup 1] [--threads 1] [--oim-rows 32] [--device cpu|cuda]

Prints (a) the median seconds of a single-view NAE step (SearchModel losses, backward, SGD step),
(b) the median of the full hybrid step (two views, SimSiam, both IAMs) and their ratio (the
goal is <= 2.3x: two views cost 2x by construction), then the OIM forward+backward+update time
at 10^4 and 10^6 identities (fp32 and bf16 tables) and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hybridps.pretrain.hybrid import HybridConfig, HybridModel
from hybridps.pretrain.losses.oim import OIMLoss
from hybridps.pretrain.model import ModelConfig


def synthetic_view(batch: int, height: int, width: int, seed: int, device: torch.device) -> dict:
    """Random images with 5 persons each (3 labelled ids, 2 unlabelled) and one ignore region."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for b in range(batch):
        images.append(torch.rand(3, height, width, generator=g).to(device))
        w = torch.randint(width // 12, width // 6, (5,), generator=g).float()
        h = w * 2.5
        x1 = torch.rand(5, generator=g) * (width - w)
        y1 = torch.rand(5, generator=g) * (height - h).clamp(min=1)
        boxes = torch.stack([x1, y1, x1 + w, (y1 + h).clamp(max=height)], 1)
        pids = torch.tensor([3 * b, 3 * b + 1, 3 * b + 2, -1, -1])
        targets.append({"boxes": boxes.to(device), "pids": pids.to(device), "track": torch.arange(5, device=device),
                        "ignore": torch.tensor([[0.0, 0.0, width * 0.1, height * 0.2]], device=device)})
    return {"images": images, "targets": targets}


def timed(fn, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """Median (wall seconds, process CPU seconds) of fn() over ``steps`` runs after ``warmup``.

    CPU seconds are the steadier figure on a shared CPU machine (other tenants stretch wall
    time); on a GPU the wall time is the one that matters.
    """
    wall, cpu = [], []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def bench_steps(args, device: torch.device) -> tuple[tuple[float, float], tuple[float, float]]:
    cfg = ModelConfig(backbone=args.backbone, min_size=args.min_size, max_size=args.max_size,
                      roi_batch_size=args.roi_batch, rpn_post_nms_train=args.rpn_post_nms,
                      num_pids=1000, cq_size=500)
    torch.manual_seed(0)
    hybrid = HybridModel(cfg, HybridConfig(num_domains=2)).to(device).train()
    search = hybrid.search_model
    h, w = args.min_size, args.max_size
    batch = {"view1": synthetic_view(2, h, w, 0, device), "view2": synthetic_view(2, h, w, 0, device),
             "domain": torch.tensor([0, 1], device=device), "labeled": torch.tensor([True, False])}
    weights = {"loss_box_reg": 10.0}
    opt = torch.optim.SGD([p for p in hybrid.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def nae_step():
        losses = search(batch["view1"]["images"], batch["view1"]["targets"])
        loss = sum(weights.get(k, 1.0) * v for k, v in losses.items())
        opt.zero_grad()
        loss.backward()
        opt.step()

    def hybrid_step():
        loss = hybrid(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    # Interleave the two so slow phases of a shared machine hit both alike.
    for _ in range(args.warmup):
        nae_step()
        hybrid_step()
    nae, hyb = [], []
    for _ in range(args.steps):
        nae.append(timed(nae_step, 1, 0, device))
        hyb.append(timed(hybrid_step, 1, 0, device))
    return tuple(statistics.median(v) for v in zip(*nae)), tuple(statistics.median(v) for v in zip(*hyb))


def bench_oim(num_pids: int, rows: int, dtype: str, args, device: torch.device) -> tuple[float, float]:
    oim = OIMLoss(256, num_pids, 5000, lut_dtype=dtype).to(device)
    g = torch.Generator().manual_seed(0)
    oim.lut.copy_(F.normalize(torch.randn(num_pids, 256, generator=g), dim=1).to(oim.lut.dtype))
    x = F.normalize(torch.randn(rows, 256, generator=g), dim=1).to(device)
    labels = torch.randint(0, num_pids, (rows,), generator=g)
    labels[rows // 2:] = -1
    labels = labels.to(device)

    def step():
        xi = x.clone().requires_grad_(True)
        oim(xi, labels).backward()

    return timed(step, args.steps, args.warmup, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--min-size", type=int, default=320)
    ap.add_argument("--max-size", type=int, default=480)
    ap.add_argument("--roi-batch", type=int, default=32)
    ap.add_argument("--rpn-post-nms", type=int, default=500)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--oim-rows", type=int, default=32, help="RoI embeddings per OIM call")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-steps", action="store_true", help="only run the OIM benchmark")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} backbone={args.backbone} "
          f"image={args.min_size}x{args.max_size} batch=2 roi_batch={args.roi_batch} "
          f"steps={args.steps} warmup={args.warmup}")
    if not args.skip_steps:
        nae, hyb = bench_steps(args, device)
        print(f"(a) single-view NAE step : wall {nae[0]:.3f} s, cpu {nae[1]:.3f} s")
        print(f"(b) full hybrid step     : wall {hyb[0]:.3f} s, cpu {hyb[1]:.3f} s")
        print(f"    ratio hybrid / NAE   : wall {hyb[0] / nae[0]:.2f}x, cpu {hyb[1] / nae[1]:.2f}x (goal <= 2.3x)")
    for dtype in ("float32", "bfloat16"):
        small = bench_oim(10_000, args.oim_rows, dtype, args, device)[0]
        large = bench_oim(1_000_000, args.oim_rows, dtype, args, device)[0]
        print(f"OIM fwd+bwd+update, {args.oim_rows} rows, {dtype} LUT (wall): 1e4 ids {small * 1e3:.1f} ms, "
              f"1e6 ids {large * 1e3:.1f} ms, ratio {large / small:.1f}x")


if __name__ == "__main__":
    main()
