"""timm and torchvision (project Python): their own loading calls on our exports.

usage: probe_timm_torchvision.py EXPORT_DIR
"""
import os
import sys

import timm
import torch
import torchvision
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from _count import count, result  # noqa: E402

exports = sys.argv[1]
x = torch.rand(1, 3, 224, 224)

path = os.path.join(exports, "timm_resnet50.safetensors")
model = timm.create_model("resnet50", pretrained=False, num_classes=0, checkpoint_path=path)   # strict
with torch.no_grad():
    fwd = "yes" if model.eval()(x).shape == (1, 2048) else "no"
result("timm resnet50", "timm %s" % timm.__version__,
       'create_model("resnet50", num_classes=0, checkpoint_path=FILE)', count(model.state_dict(), load_file(path)), fwd)
model = timm.create_model("resnet50", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path))
result("timm resnet50 (pretrained_cfg_overlay)", "timm %s" % timm.__version__,
       'create_model("resnet50", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=FILE))',
       count(model.state_dict(), load_file(path)), fwd)

path = os.path.join(exports, "torchvision_resnet50.pth")
model = torchvision.models.resnet50(weights=None)
model.load_state_dict(torch.load(path))                          # strict
with torch.no_grad():
    fwd = "yes" if model.eval()(x).shape == (1, 1000) else "no"
result("torchvision resnet50 (--with-fc)", "torchvision %s" % torchvision.__version__.split("+")[0],
       "resnet50(weights=None).load_state_dict(torch.load(FILE))", count(model.state_dict(), torch.load(path)), fwd)
