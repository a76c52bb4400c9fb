"""Publishing a run to the hub and loading it back through the download path,
against the loopback hub (tests/hub_emulation.py): real HTTP, real huggingface_hub."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridps.checkpoints import cli
from hybridps.checkpoints.convert import load_pretrained, read_source
from hybridps.checkpoints.hub import HubError, model_card, parse_hf
from hub_emulation import start_hub

TOKEN = "hf_test_token"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    srv = start_hub(tokens=(TOKEN,))
    for var in ("HYBRIDPS_OFFLINE", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HYBRIDPS_CACHE", "HF_TOKEN",
                "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr("huggingface_hub.constants.HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored"))
    yield srv
    srv.shutdown()
    srv.server_close()


def make_run(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A pre-training run folder as pretrain/export.py writes it (small tensors: the push path
    does not care what the weights are, only that they are safetensors)."""
    g = torch.Generator().manual_seed(seed)
    state = {"backbone.conv1.weight": torch.randn(8, 3, 3, 3, generator=g),
             "backbone.bn1.weight": torch.rand(8, generator=g), "rpn.head.conv.weight": torch.randn(4, 8, generator=g)}
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"), metadata={"hybridps_layout": "hybridps"})
    (path / "config.yaml").write_text("model:\n  backbone: resnet18\n")
    (path / "meta.json").write_text(json.dumps({
        "backbone": "resnet18", "style": "pytorch", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "manifest_sha256": "ab" * 32, "num_ids": 40, "domains": ["crowdhuman", "ecp", "luperson"], "steps": 3,
        "world_size": 1, "final_losses": {"loss_total": 1.5}}))
    return state


def test_push_then_load_back_through_the_download_path(hub, tmp_path, capsys, monkeypatch):
    state = make_run(tmp_path / "run")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli.main(["push", str(tmp_path / "run"), "--repo", "me/tiny-ps"]) == 0
    out = capsys.readouterr().out
    assert "hf://me/tiny-ps" in out and "README.md" in out
    files = hub.repos["me/tiny-ps"]
    assert set(files) == {"model.safetensors", "config.yaml", "meta.json", "README.md"}
    assert files["model.safetensors"] == (tmp_path / "run" / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: hybridps") and "LUPerson: research only" in card
    assert "EuroCity Persons" in card and "CrowdHuman" in card and "3 steps" in card
    assert [c[:2] for c in hub.commit_log] == [("me/tiny-ps", "main")]

    src = read_source("hf://me/tiny-ps")
    assert src.layout == "hybridps" and src.metadata["domains"] == ["crowdhuman", "ecp", "luperson"]
    assert all(torch.equal(src.state_dict[k], v) for k, v in state.items())
    local = Path(str(src.description).split("(run ")[1].split(" (")[0])
    assert str(local).startswith(str(tmp_path / "hf_home" / "hub"))        # the hub cache, as downloads
    assert {p.name for p in local.iterdir()} >= {"model.safetensors", "meta.json", "config.yaml"}
    # cached: offline mode reads it without the server
    hub.shutdown()
    assert torch.equal(read_source("hf://me/tiny-ps", offline=True).state_dict["backbone.bn1.weight"],
                       state["backbone.bn1.weight"])


def test_revisions_load_the_files_of_that_commit(hub, tmp_path):
    first = make_run(tmp_path / "run", seed=0)
    assert cli.main(["push", str(tmp_path / "run"), "--repo", "me/tiny-ps", "--token", TOKEN]) == 0
    second = make_run(tmp_path / "run", seed=1)
    assert cli.main(["push", str(tmp_path / "run"), "--repo", "me/tiny-ps", "--token", TOKEN]) == 0
    (_, _, oid1, _), (_, _, oid2, _) = hub.commit_log
    assert oid1 != oid2
    key = "backbone.conv1.weight"
    assert torch.equal(read_source("hf://me/tiny-ps").state_dict[key], second[key])
    assert torch.equal(read_source(f"hf://me/tiny-ps@{oid1}").state_dict[key], first[key])
    assert torch.equal(read_source("hf://me/tiny-ps/model.safetensors@" + oid2).state_dict[key], second[key])
    # a branch
    assert cli.main(["push", str(tmp_path / "run"), "--repo", "me/tiny-ps", "--token", TOKEN,
                     "--revision", "v1"]) == 0
    assert hub.commit_log[-1][1] == "v1"
    assert torch.equal(read_source("hf://me/tiny-ps@v1").state_dict[key], second[key])


def test_push_error_contract(hub, tmp_path, capsys):
    make_run(tmp_path / "run")

    def err(argv):
        code = cli.main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (code, lines)
        return lines[0]

    for bad in ("noslash", "a/b/c", "-x/name", "me/na--me", "me/" + "x" * 97, "me/..", "me/name.", "/name"):
        assert "not a hub repository id" in err(["push", str(tmp_path / "run"), f"--repo={bad}", "--token", TOKEN])
    assert hub.log == []                                   # refused before any request
    assert "no Hugging Face token" in err(["push", str(tmp_path / "run"), "--repo", "me/tiny"])
    assert "token was refused" in err(["push", str(tmp_path / "run"), "--repo", "me/tiny", "--token", "hf_wrong"])
    assert "no meta.json" in err(["push", str(tmp_path), "--repo", "me/tiny", "--token", TOKEN])
    (tmp_path / "run" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert "not a valid safetensors" in err(["push", str(tmp_path / "run"), "--repo", "me/tiny", "--token", TOKEN])
    assert hub.commit_log == []
    # loading: a missing repository and a bad address are one-line errors too
    assert "repository not found" in err(["inspect", "hf://me/nothing-here"])
    assert "not a hub repository id" in err(["inspect", "hf://just-a-name"])


def test_parse_hf_addresses():
    assert parse_hf("hf://me/x") == parse_hf("hf://me/x@main")
    ref = parse_hf("hf://me/x/sub/w.safetensors@abc")
    assert (ref.repo, ref.file, ref.revision) == ("me/x", "sub/w.safetensors", "abc")
    for bad in ("hf://me", "hf://me/x@", "hf://me/x/../y", "me/x"):
        with pytest.raises(HubError):
            parse_hf(bad)


def test_model_card_of_a_finetune_run_lists_its_metrics(tmp_path):
    make_run(tmp_path / "ft")
    meta = json.loads((tmp_path / "ft" / "meta.json").read_text())
    make_run(tmp_path / "pre")                                 # the INIT: crowdhuman, ecp, luperson
    meta.update(kind="hybridps-finetune", dataset="prw", init=str(tmp_path / "pre"), init_scope="full", seed=0,
                train_images=150)
    (tmp_path / "ft" / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "ft" / "eval").mkdir()
    (tmp_path / "ft" / "eval" / "metrics.json").write_text(json.dumps({
        "dataset": "prw", "search": {"mAP": 0.1905, "topk": {"1": 0.3}}, "detection": {"ap": 0.644, "recall": 0.8498}}))
    card = model_card(tmp_path / "ft", "me/ft")
    assert "fine-tuned on prw" in card and "| eval | prw | 19.05 | 30.00 | 64.40 | 84.98 |" in card
    assert "PRW: research use only" in card and "LUPerson: research only" in card   # its INIT's data too
    assert "Initialised from the pre-training run" in card and "Market-1501" not in card
    meta["init"] = "psvis-resnet50"
    (tmp_path / "ft" / "meta.json").write_text(json.dumps(meta))
    card = model_card(tmp_path / "ft", "me/ft")
    assert "CrowdHuman" not in card and "`psvis-resnet50`; what it was trained on is not recorded" in card
