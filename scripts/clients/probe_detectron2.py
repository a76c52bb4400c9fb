"""detectron2 (source tree, no _C): DetectionCheckpointer(model).load(FILE) into real R50-C4 and R50-FPN models.

usage: probe_detectron2.py DETECTRON2_SRC EXPORT_DIR [DIFFUSIONDET_SRC]
With DIFFUSIONDET_SRC (ShoufaChen/DiffusionDet), also its configs/diffdet.coco.res50.yaml model
(PSDiff's code is not published; DiffusionDet is the detectron2 project it builds on).
Also loads the pre-fix naming (``backbone.bottom_up.*``) into the C4 model, to show what issue 10 fixed.
"""
import logging
import os
import pickle
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _count import count, result  # noqa: E402

src, exports = sys.argv[1], sys.argv[2]
diffdet = sys.argv[3] if len(sys.argv) > 3 else None
sys.path.insert(0, src)
import detectron2  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

logging.basicConfig(level=logging.ERROR)
CONFIGS = {"R50-C4": "configs/COCO-Detection/faster_rcnn_R_50_C4_1x.yaml",
           "R50-FPN": "configs/COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"}


def model_for(name):
    cfg = get_cfg()
    if name == "DiffusionDet-R50":
        sys.path.insert(0, diffdet)
        from diffusiondet import add_diffusiondet_config
        from diffusiondet.util.model_ema import add_model_ema_configs
        add_diffusiondet_config(cfg)
        add_model_ema_configs(cfg)
        cfg.merge_from_file(os.path.join(diffdet, "configs/diffdet.coco.res50.yaml"))
    else:
        cfg.merge_from_file(os.path.join(src, CONFIGS[name]))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False      # the usage line: pytorch-style weights
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.280, 103.530]
    cfg.MODEL.PIXEL_STD = [58.395, 57.120, 57.375]
    return build_model(cfg).eval()


def probe(label, name, path, version=None):
    model = model_for(name)
    DetectionCheckpointer(model).load(path)          # the client's own loading call
    with open(path, "rb") as f:
        arrays = pickle.load(f, encoding="latin1")["model"]   # our own export
    counts = count(model.state_dict(), {k: torch.as_tensor(v) for k, v in arrays.items()}, suffix=True)
    forward = "no"
    if counts[0]:
        with torch.no_grad():
            out = model([{"image": torch.rand(3, 192, 256) * 255}])
        forward = "yes" if "instances" in out[0] else "no"
    result(label, version or "detectron2 %s @ source" % detectron2.__version__, "DetectionCheckpointer(model).load(FILE)",
           counts, forward, "file keys %d" % len(arrays))


probe("detectron2 %s (--to detectron2)" % "R50-C4", "R50-C4", os.path.join(exports, "detectron2.pkl"))
probe("detectron2 %s (--to psdiff)" % "R50-FPN", "R50-FPN", os.path.join(exports, "psdiff.pkl"))
if diffdet:
    probe("DiffusionDet R50 (--to psdiff)", "DiffusionDet-R50", os.path.join(exports, "psdiff.pkl"),
          "DiffusionDet @ source on detectron2 %s" % detectron2.__version__)
# before the fix: the same arrays under backbone.bottom_up.*
with open(os.path.join(exports, "detectron2.pkl"), "rb") as f:
    data = pickle.load(f, encoding="latin1")
data["model"] = {"backbone.bottom_up." + k: v for k, v in data["model"].items()}
old = os.path.join(tempfile.mkdtemp(), "old_bottom_up.pkl")
with open(old, "wb") as f:
    pickle.dump(data, f)
probe("detectron2 R50-C4 (pre-fix bottom_up names)", "R50-C4", old)
