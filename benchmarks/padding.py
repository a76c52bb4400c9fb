"""Padded pixels and step time with and without aspect-grouped batches, on the same data.

Usage: python benchmarks/padding.py --shards BUILD [--config pretrain/configs/tiny.yaml]
           [--batches 30] [--steps 6] [--threads 1]

For each setting of ``data.group_by_aspect`` (off, then on) the real pre-training loader
yields ``--batches`` batches of epoch 0; the share of padded pixels is what the model's
transform pads them to (size-divisible 32, as torchvision's GeneralizedRCNNTransform).  Then
``--steps`` full hybrid steps (forward, backward, SGD) are timed on the first batches of each
setting, side by side in one process, and their ratio printed.  The two settings see the same
samples in a different grouping, so the ratio is the cost of padding.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from hybridps.pretrain.augment import ViewParams
from hybridps.pretrain.config import load_config
from hybridps.pretrain.data import PretrainLoader, open_source
from hybridps.pretrain.hybrid import HybridModel
from hybridps.pretrain.optim import param_groups
from hybridps.pretrain.train import resolve_for_data


def padded_fraction(model, batch) -> float:
    fractions = []
    for view in ("view1", "view2"):
        images = [img for img in batch[view]["images"]]
        image_list, _ = model.search_model.transform(images)
        ph, pw = image_list.tensors.shape[-2:]
        content = sum(h * w for h, w in image_list.image_sizes)
        fractions.append(1.0 - content / (len(images) * ph * pw))
    return sum(fractions) / len(fractions)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--config", default="pretrain/configs/tiny.yaml")
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    for grouped in (False, True):
        cfg = load_config(args.config, [f"data.group_by_aspect={str(grouped).lower()}", f"data.shards={args.shards}"])
        source = open_source(cfg.data.shards)
        cfg = resolve_for_data(cfg, source)
        torch.manual_seed(0)
        model = HybridModel(cfg.model, cfg.hybrid).train()
        opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.001, momentum=0.9)
        loader = iter(PretrainLoader(source, cfg.data, ViewParams.from_config(cfg.data, cfg.model), 0))
        batches = [next(loader) for _ in range(args.batches)]
        pad = statistics.mean(padded_fraction(model, b) for b in batches)
        times = []
        for b in batches[: args.steps + 1]:
            t0 = time.process_time()
            loss = model(b)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.process_time() - t0)
        rows[grouped] = (pad, statistics.median(times[1:]))
        print(f"group_by_aspect={grouped!s:5}  padded pixels {100 * pad:5.1f}%  "
              f"step {rows[grouped][1]:.3f} s CPU (median of {args.steps})", flush=True)
    print(f"padded-pixel share: {100 * rows[False][0]:.1f}% -> {100 * rows[True][0]:.1f}%; "
          f"step time grouped/ungrouped = {rows[True][1] / rows[False][1]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
