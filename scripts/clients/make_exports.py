"""Make the files check_clients.sh hands to each real client (project Python).

Source: a pre-training run directory (CONTRACTS 5) holding a ResNet-50 search model
with random weights everywhere (so a loaded value is recognisable) and the RPN anchors
NAE4PS/SeqNet generate (32-512).  Each target is then written by ``python -m hybridps.checkpoints
convert`` with its default options, exactly as a user would.
"""
import json
import subprocess
import sys
from pathlib import Path

import torch
import torchvision
from safetensors.torch import save_file

from hybridps.checkpoints.convert import canonicalize, export
from hybridps.checkpoints.targets import get_target

TARGETS = {  # file name -> (target, extra flags)
    "detectron2.pkl": ("detectron2", []),
    "psdiff.pkl": ("psdiff", []),
    "seqnet.pth": ("seqnet", []),
    "nae.pth": ("nae", []),
    "psvis_resnet50.pth": ("psvis", []),
    "torchvision_resnet50.pth": ("torchvision", ["--with-fc"]),
    "timm_resnet50.safetensors": ("timm", []),
    "alignps.pth": ("alignps", ["--force"]),   # AlignPS configs ship style='caffe': the usage line fixes it
    # what the pre-issue-10 default wrote (zip container, torchvision >= 0.13 RPN names): current torch only
    "seqnet_zip_newrpn.pth": ("seqnet", ["--no-legacy-rpn", "--no-legacy-format"]),
}


def randomised(sd, seed):
    """Fresh values unlike any client's own init, but sane (a forward pass stays finite)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if not v.is_floating_point():
            out[k] = torch.randint(1, 1000, v.shape, generator=g, dtype=v.dtype)
        elif v.dim() > 1 and k.startswith(("rpn.", "roi_heads.box_predictor.", "roi_heads.embedding_head.")):
            out[k] = 0.01 * torch.randn(v.shape, generator=g)     # heads: N(0, 0.01) as NAE inits them
        elif v.dim() > 1:   # torchvision's kaiming_normal_(fan_out), another draw
            out[k] = torch.randn(v.shape, generator=g) * (2.0 / (v.shape[0] * v[0, 0].numel())) ** 0.5
        elif k.endswith("running_var"):
            out[k] = 1 + 0.01 * torch.rand(v.shape, generator=g)
        elif k.endswith("weight"):
            out[k] = 1 + 0.01 * torch.randn(v.shape, generator=g)
        else:
            out[k] = 0.01 * torch.randn(v.shape, generator=g)
    return out


def make_run(out: Path) -> Path:
    r50 = randomised(torchvision.models.resnet50(weights=None).state_dict(), 0)
    full = export(canonicalize(r50), get_target("nae"), "resnet50", seed=1).state_dict
    model = {k: v for k, v in full.items() if "cls_score" not in k and "reid_loss" not in k}
    model = randomised(model, 2)     # heads with fresh values too, as after pre-training
    run = out / "run_r50"
    run.mkdir(parents=True, exist_ok=True)
    save_file(model, str(run / "model.safetensors"), metadata={"style": "pytorch"})
    save_file({k: v for k, v in r50.items() if not k.startswith("fc.")}, str(run / "backbone.safetensors"))
    (run / "meta.json").write_text(json.dumps({"backbone": "resnet50", "style": "pytorch",
                                               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}))
    (run / "config.yaml").write_text("model:\n  backbone: resnet50\n  anchor_sizes: [32, 64, 128, 256, 512]\n"
                                     "  aspect_ratios: [0.5, 1.0, 2.0]\n")
    return run


def main() -> int:
    out = Path(sys.argv[1])
    run = make_run(out)
    for name, (target, flags) in TARGETS.items():
        cmd = [sys.executable, "-m", "hybridps.checkpoints", "convert", str(run), "--to", target, "--out", str(out / name),
               "--overwrite", *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        use = [ln.strip() for ln in proc.stdout.splitlines()[-1:]]
        print(f"export {target:<12} -> {name:<26} rc={proc.returncode}  use: {use[0] if use else proc.stderr[-300:]}")
        if proc.returncode:
            return proc.returncode
    # the combination the CLI now refuses (legacy container + new RPN names), re-saved by hand to show why
    ck = torch.load(out / "seqnet_zip_newrpn.pth", weights_only=True)
    torch.save(ck, out / "seqnet_legacyformat_newrpn.pth", _use_new_zipfile_serialization=False)
    print("made   seqnet_legacyformat_newrpn.pth by hand (refused by the CLI since issue 10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
