"""SeqNet (serend1p1ty/SeqNet): resume_from_ckpt(FILE, model) into SeqNet(cfg), then one forward pass.

usage: probe_seqnet.py SEQNET_SRC EXPORT_DIR FILE [FILE ...]
The only change to SeqNet: its ImageNet download is turned off (pretrained=False), as there is no
internet here; the weights then come from FILE.
"""
import os
import sys

import torch
import torchvision
import torchvision.models.resnet as tv_resnet

sys.path.insert(0, os.path.dirname(__file__))
from _count import count, result  # noqa: E402

src, exports, files = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, src)
_resnet50 = tv_resnet.resnet50
tv_resnet.__dict__["resnet50"] = lambda pretrained=False, **kw: _resnet50(**kw)  # no download: random init

from defaults import get_default_cfg  # noqa: E402
from models.seqnet import SeqNet  # noqa: E402
from utils.utils import resume_from_ckpt  # noqa: E402

VERSION = "torch %s / torchvision %s" % (torch.__version__.split("+")[0], torchvision.__version__.split("+")[0])


def rpn_names(model_keys):
    new = any(k.startswith("rpn.head.conv.0.0.") for k in model_keys)
    return (lambda k: k.replace("rpn.head.conv.", "rpn.head.conv.0.0.")
            if new and k.startswith("rpn.head.conv.") and not k.startswith("rpn.head.conv.0.0.") else k)


for name in files:
    path = os.path.join(exports, name)
    cfg = get_default_cfg()
    cfg.INPUT.MIN_SIZE, cfg.INPUT.MAX_SIZE = 240, 320
    cfg.MODEL.ROI_HEAD.SCORE_THRESH_TEST = 0.0   # random weights: keep boxes (torch 1.2 BatchNorm crashes on an empty batch)
    torch.manual_seed(0)
    model = SeqNet(cfg).eval()
    try:
        epoch = resume_from_ckpt(path, model)        # the client's own loading call
    except Exception as exc:                         # torch 1.2 on a zip file: its own error
        result("SeqNet (%s)" % name, VERSION, "resume_from_ckpt(FILE, model)", (0, len(model.state_dict()), 0),
               "no", "load failed: %s" % str(exc).splitlines()[0].replace(path, "FILE")[:80])
        continue
    file_sd = torch.load(path)["model"]
    counts = count(model.state_dict(), file_sd, rename=rpn_names(model.state_dict().keys()))
    with torch.no_grad():
        out = model([torch.rand(3, 240, 320)])
    result("SeqNet (%s)" % name, VERSION, "resume_from_ckpt(FILE, model)", counts,
           "yes" if "boxes" in out[0] else "no", "epoch %s" % epoch)
