"""psvis 1.6.0 (PyPI; the released PretrainPS package) on torch 1.7 / mmcv 1.3.9.

usage: probe_psvis.py EXPORT_DIR FILE
Three ways in, each psvis' own code: the printed usage line (strict load_state_dict of
["state_dict"]), pretrained=True with the file in the hub cache under its released name, and
init_weights(pretrained=FILE) (mmcv load_checkpoint).
"""
import os
import shutil
import sys
import tempfile

import mmcv
import psvis
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _count import count, result  # noqa: E402

exports, name = sys.argv[1], sys.argv[2]
path = os.path.join(exports, name)
VERSION = "psvis %s / mmcv %s / torch %s" % (psvis.__version__, mmcv.__version__, torch.__version__)
file_sd = torch.load(path)["state_dict"]


def forward(model):
    with torch.no_grad():
        model.eval()   # mmdet-style train() returns None
        outs = model(torch.rand(1, 3, 224, 224))
    return "yes" if len(outs) else "no"


from psvis.models.backbones import ResNet, resnet50  # noqa: E402  (the usage line's import)

torch.manual_seed(0)
model = resnet50(pretrained=False)
model.load_state_dict(torch.load(path)["state_dict"])          # strict, as printed
result("psvis resnet50 (%s)" % name, VERSION, 'resnet50(pretrained=False).load_state_dict(torch.load(FILE)["state_dict"])',
       count(model.state_dict(), file_sd), forward(model))

hub = tempfile.mkdtemp()
os.makedirs(os.path.join(hub, "hub", "checkpoints"))
shutil.copy(path, os.path.join(hub, "hub", "checkpoints", "resnet50-ps12.pth"))
os.environ["TORCH_HOME"] = hub
model = resnet50(pretrained=True)                              # hub cache: no download when present
result("psvis resnet50 (%s in hub cache)" % name, VERSION, "resnet50(pretrained=True), TORCH_HOME/hub/checkpoints/resnet50-ps12.pth",
       count(model.state_dict(), file_sd), forward(model))

model = ResNet(50)
model.init_weights(pretrained=path)                            # mmcv load_checkpoint (strict=False)
result("psvis ResNet(50).init_weights (%s)" % name, VERSION, "ResNet(50).init_weights(pretrained=FILE)",
       count(model.state_dict(), file_sd), forward(model))
try:
    psvis.resnet50
    top = "exists"
except AttributeError:
    top = "AttributeError"
print("psvis.resnet50 at top level: %s (the pre-fix usage line)" % top)
