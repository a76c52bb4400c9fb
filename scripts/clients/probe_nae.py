"""NAE4PS (DeanChan/NAE4PS, Python 2.7): resume_from_checkpoint(args, model) (strict) into its model.

usage: probe_nae.py NAE4PS_SRC EXPORT_DIR FILE
The model is built as scripts/test_NAE.py builds it (pretrained_backbone=False: no download);
the load is NAE4PS' own lib.utils.misc.resume_from_checkpoint, which is strict.
"""
from __future__ import print_function

import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
from _count import count, result  # noqa: E402

src, exports, name = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, src)
from configs import args_faster_rcnn_norm_aware  # noqa: E402
from lib.model.faster_rcnn_norm_aware import get_norm_aware_model  # noqa: E402
from lib.utils.misc import Nestedspace, resume_from_checkpoint  # noqa: E402

VERSION = "python %d.%d / torch %s / torchvision %s" % (sys.version_info[0], sys.version_info[1],
                                                        torch.__version__, torchvision.__version__)
args = args_faster_rcnn_norm_aware().parse_args([], namespace=Nestedspace())
args.test.min_size, args.test.max_size = 600, 1000
torch.manual_seed(0)
model = get_norm_aware_model(args, training=False, pretrained_backbone=False).eval()
args.resume = os.path.join(exports, name)
try:
    resume_from_checkpoint(args, model)           # the client's own (strict) loading call
except Exception as exc:
    result("NAE4PS (%s)" % name, VERSION, "resume_from_checkpoint(args, model)", (0, len(model.state_dict()), 0),
           "no", "load failed: %s" % str(exc).splitlines()[0].replace(args.resume, "FILE")[:80])
    sys.exit(0)
file_sd = torch.load(args.resume)["model"]
counts = count(model.state_dict(), file_sd)
forward = "no"
try:
    with torch.no_grad():
        out = model([torch.rand(3, 600, 800)])
    forward = "yes" if len(out) else "no"
except Exception as exc:
    forward = "no (%s)" % str(exc).splitlines()[0][:60]
result("NAE4PS (%s)" % name, VERSION, "resume_from_checkpoint(args, model)", counts, forward,
       "epoch %s" % args.train.start_epoch)
