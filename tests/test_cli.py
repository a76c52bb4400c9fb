"""python -m hybridps.data_prep: synth / build argument errors / preview / inspect."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hybridps.data_prep import cli
from hybridps.data_prep.formats import FORMATS
from hybridps.data_prep.preview import BACKGROUND
from hybridps.data_prep.synth import write_world, writer_module

REPO = Path(__file__).resolve().parents[1]
DATASETS = ["market1501", "crowdhuman", "cuhk_sysu", "ecp"]


def run_cli(*argv) -> int:
    return cli.main([str(a) for a in argv])


def run_module(*argv, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridps.data_prep", *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Same shared tiny world as test_build (written once per session)."""
    root = tmp_path_factory.getbasetemp() / "synth_world_tiny_s0"
    if not (root / "synth_truth.json").exists():
        write_world(root, seed=0, size="tiny", only=[n for n in FORMATS if writer_module(n) is not None])
    return root


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_build")
    args = ["build", out, "--shard-size", 6, "--quiet", "--workers", 1]
    for n in DATASETS:
        args += ["--source", f"{n}={world / n}"]
    assert run_cli(*args) == 0
    return out


# --------------------------------------------------------------------------- synth
def test_synth_command_writes_layouts_and_truth(tmp_path):
    out = tmp_path / "w"
    r = run_module("synth", out, "--only", "market1501,msmt17", "--seed", 2)
    assert r.returncode == 0, r.stderr
    truth = json.loads((out / "synth_truth.json").read_text())
    assert sorted(truth) == ["market1501", "msmt17"]
    assert (out / "market1501").is_dir() and (out / "msmt17").is_dir() and not (out / "ecp").exists()
    for name in truth:
        assert name in r.stdout
    n_train = len(truth["market1501"]["splits"]["train"]["records"])
    assert any(line.split()[:3] == ["market1501", "train", str(n_train)] for line in r.stdout.splitlines())


def test_synth_unknown_name_is_usage_error(tmp_path, capsys):
    assert run_cli("synth", tmp_path / "w", "--only", "market1501,nope") == 2
    err = capsys.readouterr().err
    assert "unknown dataset(s) nope" in err and "Traceback" not in err


# --------------------------------------------------------------------------- build errors
@pytest.mark.parametrize("args, message", [
    ([], "at least one --source"),
    (["--source", "market1501"], "expected NAME=ROOT"),
    (["--source", "imagenet=/tmp"], "unknown dataset 'imagenet'"),
    (["--source", "market1501=/definitely/not/here"], "no such directory"),
    (["--source", "market1501={w}/market1501", "--split", "market1501=train,bogus"], "unknown split(s) bogus"),
    (["--source", "market1501={w}/market1501", "--limit", "ecp=3"], "'ecp' is not a --source"),
    (["--source", "market1501={w}/market1501", "--limit", "market1501=x"], "N must be an integer"),
    (["--source", "market1501={w}/market1501", "--format-option", "market1501:colour=red"], "market1501 accepts"),
    (["--source", "market1501={w}/market1501", "--canvas-size", "big"], "expected WxH"),
    (["--source", "market1501={w}/market1501", "--shard-size", "0"], "--shard-size must be >= 1"),
    (["--source", "market1501={w}/market1501", "--source", "market1501={w}/market1501"], "given twice"),
])
def test_build_usage_errors_exit_2(world, tmp_path, capsys, args, message):
    args = [a.replace("{w}", str(world)) for a in args]
    assert run_cli("build", tmp_path / "out", "--quiet", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_module_entry_point_usage_error_has_no_traceback(tmp_path):
    r = run_module("build", tmp_path / "o", "--source", "market1501=/nope", "--quiet")
    assert r.returncode == 2
    assert "hybridps data build: error:" in r.stderr and "Traceback" not in r.stderr
    r = run_module("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_format_option_reaches_the_parser(world, tmp_path):
    out = tmp_path / "out"
    assert run_cli("build", out, "--source", f"crowdhuman={world / 'crowdhuman'}", "--format-option",
                   "crowdhuman:box=vbox", "--quiet") == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["options"]["format_options"] == {"crowdhuman": {"box": "vbox"}}


def test_coerce_value():
    assert cli.coerce_value("3") == 3 and cli.coerce_value("0.5") == 0.5
    assert cli.coerce_value("true") is True and cli.coerce_value("None") is None
    assert cli.coerce_value("day,night") == ["day", "night"] and cli.coerce_value("vbox") == "vbox"


# --------------------------------------------------------------------------- preview
@pytest.mark.parametrize("n, tile, size", [(16, 64, (256, 256)), (5, 48, (144, 96))])
def test_preview_writes_grid_of_expected_size(built, tmp_path, n, tile, size, capsys):
    png = tmp_path / "grid.png"
    assert run_cli("preview", built, "--out", png, "--n", n, "--tile", tile, "--seed", 1) == 0
    assert f"({n} samples)" in capsys.readouterr().out
    img = Image.open(png)
    assert img.format == "PNG" and img.size == size
    arr = np.asarray(img.convert("RGB"))
    cols = size[0] // tile
    for i in range(n):  # every tile holds an image, not just background
        r, c = divmod(i, cols)
        t = arr[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
        assert (np.abs(t.astype(int) - BACKGROUND).max(axis=2) > 10).mean() > 0.2


def test_preview_from_shard_glob_and_deterministic(built, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    glob = str(built / "*" / "train-*.tar")
    assert run_cli("preview", glob, "--out", a, "--n", 4, "--tile", 32) == 0
    assert run_cli("preview", glob, "--out", b, "--n", 4, "--tile", 32) == 0
    assert a.read_bytes() == b.read_bytes()


def test_preview_bad_input_exit_2(tmp_path, capsys):
    assert run_cli("preview", tmp_path / "nothing-*.tar", "--out", tmp_path / "x.png") == 2
    assert "matches no file" in capsys.readouterr().err


# --------------------------------------------------------------------------- inspect
def test_inspect_prints_every_dataset(built, capsys):
    assert run_cli("inspect", built) == 0
    out = capsys.readouterr().out
    m = json.loads((built / "manifest.json").read_text())
    lines = out.splitlines()
    for name in DATASETS:
        row = next(line for line in lines if line.startswith(name))
        e = m["datasets"][name]
        assert str(e["splits"]["train"]["samples"]) in row.split()
        assert f"[{e['id_range'][0]},{e['id_range'][1]})" in row
    assert "corrupt_image=1" in out                       # the synthetic CrowdHuman truncated JPEG
    total = next(line for line in lines if line.startswith("TOTAL"))
    assert f"num_ids={m['num_ids']}" in total


def test_inspect_shards_without_manifest(built, capsys):
    assert run_cli("inspect", str(built / "market1501" / "*.tar")) == 0
    out = capsys.readouterr().out
    assert "market1501" in out and "crowdhuman" not in out


def test_inspect_non_build_dir_exit_2(tmp_path, capsys):
    assert run_cli("inspect", tmp_path) == 2
    assert "no manifest" in capsys.readouterr().err
