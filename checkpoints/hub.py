"""Publishing a run to the Hugging Face hub and reading it back (``hf://OWNER/NAME[@REV]``).

``push`` uploads what a downstream user needs from a pre-training or
fine-tuning run folder -- the safetensors weights, ``config.yaml``,
``meta.json`` -- plus a generated model card (``README.md``: the data the
weights saw, the run's numbers, the datasets' licence terms) as one commit
made with huggingface_hub's ``create_commit``.  Nothing pickled is ever
uploaded or read back.

``hf://OWNER/NAME`` names such a repository: its files are fetched with the
same hub client and cache as registry downloads (:func:`download.hf_download`)
into one snapshot folder, which then reads like the run folder it came from.
``hf://OWNER/NAME/FILE`` names one weight file of any repository.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hybridps.runlog import read_json_object

from .download import DownloadError, check_format, hf_download

# What a run folder publishes, weights first (CONTRACTS 5; finetune's save_run).
WEIGHT_FILES = ("model.safetensors", "backbone.safetensors")
SIDE_FILES = ("config.yaml", "meta.json")
# The hub's rules for a repository name part (huggingface_hub's validate_repo_id).
_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
FINETUNE_KIND = "hybridps-finetune"

# One line per dataset (the terms each release states; README "Dataset licences"):
# the weights were trained on these images, so their terms travel with the card.
DATASET_TERMS = {
    "crowdhuman": "CrowdHuman: non-commercial research and educational use only; images may not be "
                  "redistributed; cite Shao et al. 2018.",
    "ecp": "EuroCity Persons: TU Delft Research Use License -- research purposes, qualified academic users; "
           "trained weights may be shared free of charge for research if no test data was used.",
    "msmt17": "MSMT17: non-commercial research only, obtained from PKU under a release agreement.",
    "cuhk03": "CUHK03: academic or research use only, obtained from CUHK on request.",
    "luperson": "LUPerson: research only, commercial use forbidden (images from third-party videos).",
    "market1501": "Market-1501: research use only; cite Zheng et al. ICCV 2015.",
    "cuhk_sysu": "CUHK-SYSU: research use only; obtained from the authors (Xiao et al., CVPR 2017).",
    "prw": "PRW: research use only; obtained from the authors (Zheng et al., CVPR 2017).",
    "posetrack21": "PoseTrack21: research use only, under the PoseTrack terms (Doering et al., CVPR 2022).",
}
PERSONAL_DATA = ("All of these datasets show identifiable people: treat them, and anything that can "
                 "reproduce them, as personal data.")


class HubError(ValueError):
    """A bad repository id or hf:// address, a run that cannot be published, a refused upload."""


@dataclass(frozen=True)
class HubRef:
    """``hf://repo[/file][@revision]``."""

    repo: str
    file: str | None = None
    revision: str = "main"


def check_repo_id(repo: str) -> str:
    """``OWNER/NAME`` with the hub's character rules, or HubError."""
    parts = repo.split("/") if isinstance(repo, str) else []
    if len(parts) != 2 or not all(_PART.match(p) for p in parts) or any(".." in p or "--" in p for p in parts):
        raise HubError(f"{repo!r} is not a hub repository id: expected OWNER/NAME (letters, digits, '-', '_', '.', "
                       "at most 96 characters each, no '--' or '..')")
    return repo


def parse_hf(uri: str) -> HubRef:
    """``hf://OWNER/NAME``, ``hf://OWNER/NAME@REV``, ``hf://OWNER/NAME/FILE[@REV]``."""
    if not uri.startswith("hf://"):
        raise HubError(f"{uri!r}: hub addresses start with hf://")
    body, _, revision = uri[len("hf://"):].partition("@")
    if "@" in uri and not revision:
        raise HubError(f"{uri!r}: empty revision after '@'")
    parts = body.strip("/").split("/")
    repo = "/".join(parts[:2])
    check_repo_id(repo)
    file = "/".join(parts[2:]) or None
    if file is not None and any(p in ("", ".", "..") for p in parts[2:]):
        raise HubError(f"{uri!r}: the file part must be a plain path inside the repository")
    return HubRef(repo, file, revision or "main")


def fetch_hf(uri: str, *, cache: str | Path | None = None, offline: bool | None = None) -> Path:
    """Download what ``uri`` names with the registry's hub client; return the
    local weight file (``hf://.../FILE``) or the snapshot folder that holds a
    published run (``hf://OWNER/NAME``)."""
    ref = parse_hf(uri)
    quiet: Callable[[str], None] = lambda _m: None      # hub files are checked by their commit, not a pinned hash
    if ref.file is not None:
        return hf_download(ref.repo, ref.file, revision=ref.revision, cache=cache, offline=offline, log=quiet)
    weights = None
    for name in WEIGHT_FILES:
        try:
            weights = hf_download(ref.repo, name, revision=ref.revision, cache=cache, offline=offline, log=quiet)
            break
        except DownloadError as exc:
            if "file not found" not in str(exc):
                raise
    if weights is None:
        raise DownloadError(f"{uri}: the repository holds neither {' nor '.join(WEIGHT_FILES)}; "
                            "name a file with hf://OWNER/NAME/FILE")
    for name in SIDE_FILES:
        try:
            hf_download(ref.repo, name, revision=ref.revision, cache=cache, offline=offline, log=quiet)
        except DownloadError as exc:
            if "file not found" not in str(exc):
                raise
    return weights.parent           # the snapshot folder of that commit


# ------------------------------------------------------------------ publishing
def _read_meta(run: Path) -> dict[str, Any]:
    path = run / "meta.json"
    if not path.is_file():
        raise HubError(f"{run}: no meta.json; push a finished pre-training or fine-tuning run folder")
    return read_json_object(path, HubError)


def run_files(run: str | Path) -> list[Path]:
    """The files of ``run`` that get published, each checked first."""
    run = Path(run)
    if not run.is_dir():
        raise HubError(f"{run}: not a run folder")
    _read_meta(run)
    weights = [run / f for f in WEIGHT_FILES if (run / f).is_file()]
    if not weights or weights[0].name != "model.safetensors":
        raise HubError(f"{run}: no model.safetensors; push a finished pre-training or fine-tuning run folder")
    for path in weights:
        try:
            check_format(path, path.name)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise HubError(f"{path}: not a valid safetensors file ({exc})") from None
    return weights + [run / f for f in SIDE_FILES if (run / f).is_file()]


def _metrics(run: Path) -> list[tuple[str, dict]]:
    """(folder, metrics.json) of the evaluations stored inside the run."""
    found = []
    for path in sorted(run.glob("*/metrics.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            continue
        if isinstance(data, dict) and isinstance(data.get("search"), dict):
            found.append((path.parent.name, data))
    return found


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}" if isinstance(v, (int, float)) and v == v else "n/a"


def model_card(run: str | Path, repo: str) -> str:
    """README.md for the hub: what the weights are, the data they saw, the
    run's own numbers and the datasets' terms."""
    run = Path(run)
    meta = _read_meta(run)
    finetuned = meta.get("kind") == FINETUNE_KIND
    backbone = str(meta.get("backbone", "unknown"))
    datasets = [str(d) for d in (meta.get("domains") or [])]
    init_note = None
    if finetuned:
        datasets = [str(meta["dataset"])] if meta.get("dataset") else []
        # the weights also saw what the INIT was trained on
        init = str(meta.get("init") or "none")
        init_meta = Path(init) / "meta.json"
        if init_meta.is_file():
            try:
                pre = json.loads(init_meta.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                pre = {}
            domains = [str(d) for d in (pre.get("domains") or [])] if isinstance(pre, dict) else []
            datasets += [d for d in domains if d not in datasets]
            seen = ", ".join(domains) or "datasets unrecorded"
            init_note = f"Initialised from the pre-training run `{init}` ({seen})."
        elif init != "none":
            init_note = (f"Initialised from `{init}`; what it was trained on is not recorded here -- see its own "
                         "terms (for the released PretrainPS backbones: their pre-training datasets' terms apply).")
    lines = ["---", "library_name: hybridps", "license: other", "tags:", "- person-search", "- hybridps",
             f"- {backbone}", "---", "",
             f"# {repo.split('/')[1]}", ""]
    if finetuned:
        lines += [f"NAE person-search model ({backbone}) fine-tuned on {meta.get('dataset')} for "
                  f"{meta.get('steps')} steps ({meta.get('train_images')} training images, init "
                  f"`{meta.get('init')}`, scope {meta.get('init_scope')}, seed {meta.get('seed')}).", ""]
    else:
        lines += [f"Hybrid person-search pre-training ({backbone}): {meta.get('steps')} steps on "
                  f"{meta.get('world_size', 1)} process(es), {meta.get('num_ids', '?')} identities; shards "
                  f"manifest sha256 `{meta.get('manifest_sha256', '?')}`.", ""]
    lines += ["## Use", "", "```python", "from hybridps.finetune.api import create_model",
              f'model = create_model("nae_{backbone}", weights="hf://{repo}")',
              "hits = model.search(query_image, query_box, gallery_images, topk=5)", "```", "",
              "or initialise fine-tuning with it:", "", "```bash",
              f"python -m hybridps.finetune train --dataset prw --root data/PRW --init hf://{repo}", "```", "",
              "## Files", "",
              "* `model.safetensors`: the whole search model, hybridps layout"
              + (" (with the OIM table of the fine-tuning identities)" if finetuned else " (no OIM tables)"),
              ]
    if (run / "backbone.safetensors").is_file():
        lines.append("* `backbone.safetensors`: the ResNet/ShuffleNet trunk incl. layer4 in its own key layout")
    lines += ["* `config.yaml`, `meta.json`: the resolved run configuration and its record", "",
              f"Input: RGB in [0, 1], normalised inside the model with mean {meta.get('mean')} and std "
              f"{meta.get('std')}; style {meta.get('style', 'pytorch')}.", "", "## Data", ""]
    lines += [f"* {DATASET_TERMS.get(d, f'{d}: see the dataset authors for its terms.')}" for d in datasets] \
        or ["* not recorded in meta.json"]
    if init_note:
        lines += ["", init_note]
    lines += ["", PERSONAL_DATA, "The weights inherit these terms: research use; not for commercial use "
              "where any dataset above forbids it.", "", "## Results", ""]
    evals = _metrics(run)
    if evals:
        lines += ["| evaluation | dataset | mAP (%) | top-1 (%) | det AP (%) | det recall (%) |",
                  "|---|---|---:|---:|---:|---:|"]
        for name, m in evals:
            s, d = m["search"], m.get("detection") or {}
            top = s.get("topk") or {}
            lines.append(f"| {name} | {m.get('dataset', '?')} | {_pct(s.get('mAP'))} | "
                         f"{_pct(top.get('1', top.get(1)))} | {_pct(d.get('ap'))} | {_pct(d.get('recall'))} |")
    else:
        lines.append("No evaluation is stored in the run folder.")
    losses = meta.get("final_losses") or {}
    if isinstance(losses, dict) and losses:
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in losses.items())
        lines += ["", f"Final training losses: {shown}."]
    return "\n".join(lines) + "\n"


def _token(token: str | None) -> str:
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise HubError("no Hugging Face token: set HF_TOKEN, pass --token, or run `hf auth login`")
    return found


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP library under huggingface_hub (httpx, or its fork httpx2 in 2.x) raises its own
    connection errors, not OSError."""
    import importlib

    for name in ("httpx2", "httpx"):
        try:
            return (importlib.import_module(name).TransportError,)
        except (ImportError, AttributeError):
            continue
    return ()


def push(run: str | Path, repo: str, *, token: str | None = None, revision: str | None = None,
         private: bool = False, message: str | None = None, endpoint: str | None = None) -> tuple[str, list[str]]:
    """Create ``repo`` if needed and commit the run's files and its model card;
    return (commit id, uploaded paths)."""
    import os

    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub import errors as hf_errors

    check_repo_id(repo)
    files = run_files(run)
    card = model_card(run, repo).encode()
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=_token(token))
    ops = [CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=str(f)) for f in files]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.create_commit(repo, ops, commit_message=message or f"hybridps: publish {Path(run).name}",
                                 revision=revision)
    except hf_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        why = {401: "the token was refused (401)", 403: "no write access to this repository (403)",
               404: "repository or revision not found (404)"}.get(status, str(exc).splitlines()[0])
        raise HubError(f"push to {repo}: {why}") from None
    except (OSError, *_transport_errors()) as exc:      # no route, refused, timed out
        raise HubError(f"push to {repo}: cannot reach the hub ({type(exc).__name__}: {exc})") from None
    return info.oid, [op.path_in_repo for op in ops]
