"""Released-weights registry, download, safe loading and conversion between key layouts.

A leaf package: it works on plain state_dicts and files and imports nothing
from data_prep, pretrain or finetune.  What pretrain/finetune call:

* :func:`load_pretrained` -- registry name / file / run dir -> canonical weights + report
* :func:`to_canonical` -- any known layout (auto-detected) -> our layout
* :func:`load_into` -- load canonical weights into a model, refusing a near-empty match
* :func:`load_state_dict` -- safe loading of .safetensors / .pth / detectron2 .pkl
"""
from .convert import Pretrained, canonicalize, convert, load_pretrained, read_source, to_canonical
from .layouts import detect_layout, get_layout
from .report import InsufficientMatchError, Report, load_into
from .safe_load import UnsafeFileError, load_checkpoint, load_state_dict
from .style import StyleMismatchError

__all__ = ["Pretrained", "canonicalize", "convert", "load_pretrained", "read_source", "to_canonical",
           "detect_layout", "get_layout", "InsufficientMatchError", "Report", "load_into",
           "UnsafeFileError", "load_checkpoint", "load_state_dict", "StyleMismatchError"]
