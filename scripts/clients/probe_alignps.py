"""AlignPS (daodaofr/AlignPS, its own mmdet 2.4.0) on torch 1.7 / mmcv 1.1.6: ResNet.init_weights(pretrained=FILE).

usage: probe_alignps.py EXPORT_DIR FILE   (AlignPS' source tree on PYTHONPATH)
``import mmdet.models`` pulls every head, and the heads need mmcv's compiled ops (mmcv._ext), which
are not built here.  The backbone module itself needs none: ``mmdet.models`` and
``mmdet.models.backbones`` are entered as bare packages (their __init__ not run) and AlignPS' own
``mmdet/models/backbones/resnet.py`` is imported from them, unchanged.  Its ``init_weights`` is
the code path of ``model = dict(pretrained=FILE)``: mmcv ``load_checkpoint(strict=False)``.
"""
import importlib
import os
import sys
import types

import mmcv
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _count import count, result  # noqa: E402

exports, name = sys.argv[1], sys.argv[2]
path = os.path.join(exports, name)
import mmdet  # noqa: E402  (version check: mmcv <= 1.2)

root = os.path.dirname(mmdet.__file__)
for pkg in ("mmdet.models", "mmdet.models.backbones"):
    mod = types.ModuleType(pkg)
    mod.__path__ = [os.path.join(root, *pkg.split(".")[1:])]
    sys.modules[pkg] = mod
ResNet = importlib.import_module("mmdet.models.backbones.resnet").ResNet

VERSION = "AlignPS mmdet %s / mmcv %s / torch %s" % (mmdet.__version__, mmcv.__version__, torch.__version__)
torch.manual_seed(0)
model = ResNet(depth=50, style="pytorch")        # the usage line: backbone=dict(style='pytorch')
model.init_weights(pretrained=path)              # what model=dict(pretrained=FILE) runs
file_sd = torch.load(path)["state_dict"]
model.eval()
with torch.no_grad():
    outs = model(torch.rand(1, 3, 224, 224))
result("AlignPS ResNet-50 backbone (%s)" % name, VERSION, "ResNet(depth=50, style='pytorch').init_weights(pretrained=FILE)",
       count(model.state_dict(), file_sd), "backbone only" if len(outs) else "no",
       "detector not built: its heads need compiled mmcv ops")
