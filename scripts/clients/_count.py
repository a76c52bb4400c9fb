"""Count what a client's own loader put into its model (Python 2.7 and 3.x alike: NAE4PS runs on 2.7).

After the client's loading call, a model key counts as *loaded* when it holds exactly the
file's value under the name the client matches it by: the same name, a detectron2-style
suffix, or a name the client itself renames (``rename``).  The exports are made from
random weights (make_exports.py), so a value equal to the file's is not a coincidence.
"""
import torch


def count(model_sd, file_sd, rename=None, suffix=False):
    """-> (loaded, missing, unexpected) key counts of ``model_sd`` after the client's load."""
    used = set()
    loaded = 0
    by_name = dict((rename(k) if rename else k, k) for k in file_sd)
    for key, value in model_sd.items():
        cands = [by_name[key]] if key in by_name else []
        if suffix and not cands:
            cands = [f for f in file_sd if key.endswith("." + f)]
            cands = sorted(cands, key=len)[-1:]
        hit = None
        for f in cands:
            v = file_sd[f]
            v = torch.as_tensor(v)
            if tuple(v.shape) == tuple(value.shape) and torch.equal(v.to(value.dtype).cpu(), value.cpu()):
                hit = f
        if hit is not None:
            loaded += 1
            used.add(hit)
    return loaded, len(model_sd) - loaded, len([k for k in file_sd if k not in used])


def result(client, version, call, counts, forward, note=""):
    """One machine-readable line; check_clients.sh turns these into the README table."""
    loaded, missing, unexpected = counts
    print("RESULT\t%s\t%s\t%s\t%d\t%d\t%d\t%s\t%s" % (client, version, call, loaded, missing, unexpected,
                                                    forward, note))
