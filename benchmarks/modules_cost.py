"""Inference cost of the UGAS / IIDFC options: parameters, embedding size and FLOPs side by side.

    python benchmarks/modules_cost.py                      # tiny ResNet-18 model, 96x128 images
    python benchmarks/modules_cost.py --backbone resnet50 --size 448

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix
products) for one eval forward on one image plus the query embedding of its boxes, with the
RoI count fixed (``rpn_post_nms_test`` proposals, score threshold 0).  Parameters are split into
inference parameters and the training-only uncertainty head; OIM tables are buffers, not counted.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from hybridps.pretrain.model import build_search_model, tiny_config

ROWS = {
    "NAE": {},
    "+UG": dict(ugas_uncertainty=True),
    "+FC": dict(iidfc_fc=True),
    "+SFM": dict(ugas_sfm=True),
    "+UGAS (SFM+SD+UG)": dict(ugas_sfm=True, ugas_distill=True, ugas_uncertainty=True),
    "+PAM": dict(iidfc_pam=True),
    "+IIDFC (FC+PAM)": dict(iidfc_fc=True, iidfc_pam=True),
    "+all": dict(ugas_sfm=True, ugas_distill=True, ugas_uncertainty=True, iidfc_fc=True, iidfc_pam=True),
}


def measure(backbone: str, size: int) -> list[tuple[str, int, int, int, int]]:
    out = []
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, size, int(size * 4 / 3), generator=g)
    boxes = torch.tensor([[10.0, 10.0, size / 3, size * 0.8]])
    for name, opts in ROWS.items():
        torch.manual_seed(0)
        cfg = tiny_config(backbone=backbone, min_size=size, max_size=int(size * 4 / 3), score_thresh=0.0,
                          rpn_post_nms_test=32, **opts)
        model = build_search_model(cfg).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            det = model([image])[0]
            model.extract_query([image], [boxes])
        head = model.roi_heads.uncertainty
        train_only = sum(p.numel() for p in head.parameters()) if head is not None else 0
        params = sum(p.numel() for p in model.parameters()) - train_only
        out.append((name, params, train_only, det["embeddings"].shape[1], counter.get_total_flops()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=96, help="image short side (min_size)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.backbone, args.size)
    base_p, base_f = rows[0][1], rows[0][4]
    print(f"backbone {args.backbone}, image {args.size}x{int(args.size * 4 / 3)}, 32 RoIs + 1 query box")
    print("| option | inference params | x NAE | training-only params | embedding dim | GFLOPs | x NAE |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, params, train_only, dim, flops in rows:
        print(f"| {name} | {params:,} | {params / base_p:.4f} | {train_only:,} | {dim} | {flops / 1e9:.3f} | "
              f"{flops / base_f:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
