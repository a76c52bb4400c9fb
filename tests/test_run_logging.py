"""One rule for progress and logs (hybridps/runlog.py), checked through the CLIs
with stdout/stderr piped: periodic plain lines appear, log.txt holds them,
JSON files parse with a strict parser, and pre-training and fine-tuning write
the same history fields."""
from __future__ import annotations

import enum
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hybridps import runlog
from hybridps.data_prep.synth import prw as synth_prw

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY_PRE = ROOT / "pretrain" / "configs" / "tiny.yaml"
TINY_FT = ROOT / "finetune" / "configs" / "tiny.yaml"
FAST_FT = ["model.min_size=96", "model.max_size=176", "model.roi_batch_size=8", "model.rpn_post_nms_train=32",
           "model.rpn_post_nms_test=12", "model.rpn_pre_nms_test=100", "model.detections_per_img=8",
           "eval.visualize=0"]


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (Python's parser accepts them; JSON does not)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HYBRIDPS_LOG_INTERVAL": "0", **extra}


def progress_lines(text: str, what: str) -> list[str]:
    return [ln for ln in text.splitlines() if f": {what} " in ln and " | elapsed " in ln]


# --------------------------------------------------------------------------- the helper itself
def test_strict_json_writes_null_and_plain_enum_strings():
    class Kind(enum.Enum):
        MULTI = "MULTI_GPU"

    obj = {"nan": float("nan"), "inf": [float("inf"), -float("inf")], "ok": 1.5, "kind": Kind.MULTI,
           "np": np.float32(2.5), "arr": np.array([1.0, np.nan]), "path": Path("a/b"), 3: (1, 2)}
    back = strict_json(runlog.dumps(obj))
    assert back == {"nan": None, "inf": [None, None], "ok": 1.5, "kind": "MULTI_GPU", "np": 2.5,
                    "arr": [1.0, None], "path": "a/b", "3": [1, 2]}
    with pytest.raises(ValueError):
        strict_json('{"a": NaN}')
    with pytest.raises(TypeError):
        runlog.dumps({"x": object()})


def test_progress_lines_when_not_a_terminal(monkeypatch):
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("pretrain.test_progress")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    monkeypatch.setenv(runlog.INTERVAL_ENV, "0")
    with runlog.Progress(4, "step", unit="step", logger=logger, memory=True) as p:
        for i in range(4):
            p.update(1, loss=1.0 / (i + 1), lr=1e-5)
    lines = [r.getMessage() for r in records]
    assert len(lines) == 4 and lines[0].startswith("step 1/4 (25%) | loss 1.0000 lr 1.000e-05 | ")
    assert "ETA" in lines[0] and "mem " in lines[0] and ("step/s" in lines[0] or "s/step" in lines[0])
    assert lines[-1].startswith("step 4/4 (100%)") and "ETA" not in lines[-1]
    assert p.bar is None                                   # pytest's stderr is not a terminal

    records.clear()
    monkeypatch.setenv(runlog.INTERVAL_ENV, "3600")
    with runlog.Progress(10, "images", unit="img", logger=logger) as p:
        for _ in range(10):
            p.update(1)
    # the first update and the close: nothing in between within the interval
    assert [r.getMessage().split(" |")[0] for r in records] == ["images 1/10 (10%)", "images 10/10 (100%)"]
    monkeypatch.setenv(runlog.INTERVAL_ENV, "soon")
    assert runlog.log_interval() == runlog.DEFAULT_INTERVAL


def test_other_libraries_info_stays_out_and_ranks_other_than_0_only_warn(tmp_path, monkeypatch, capsys):
    with runlog.cli_logging("prog", ["a"]) as run:
        run.to_folder(tmp_path)
        logging.getLogger("pretrain.x").info("ours")
        logging.getLogger("accelerate.x").info("theirs")
        logging.getLogger("accelerate.x").warning("their warning")
    err = capsys.readouterr().err
    assert "prog: ours" in err and "theirs" not in err and "prog: warning: their warning" in err
    text = (tmp_path / "log.txt").read_text()
    assert "prog a" in text and "ours" in text and "their warning" in text and "theirs\n" not in text
    monkeypatch.setenv("RANK", "1")
    with runlog.cli_logging("prog", []) as run:
        assert run.to_folder(tmp_path / "r1") is None
        logging.getLogger("pretrain.x").info("rank1 info")
        logging.getLogger("pretrain.x").warning("rank1 warning")
    err = capsys.readouterr().err
    assert "rank1 info" not in err and "rank1 warning" in err and not (tmp_path / "r1").exists()


# --------------------------------------------------------------------------- the CLIs, piped
@pytest.fixture(scope="module")
def build(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A two-dataset build (detection + re-ID), made through the CLI with stderr piped."""
    tmp = tmp_path_factory.mktemp("world")
    synth = tmp / "synth"
    proc = subprocess.run([PY, "-m", "hybridps.data_prep", "synth", str(synth), "--size", "tiny", "--only", "crowdhuman,msmt17"],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp / "build"
    proc = subprocess.run([PY, "-m", "hybridps.data_prep", "build", str(out), "--workers", "1", "--limit", "crowdhuman=4",
                           "--source", f"crowdhuman={synth / 'crowdhuman'}", "--source", f"msmt17={synth / 'msmt17'}"],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


def test_build_prints_count_lines_when_piped_and_keeps_log_txt(build, tmp_path):
    out, proc = build
    lines = progress_lines(proc.stderr, "images")
    assert len(lines) >= 2 and ("img/s" in lines[0] or "s/img" in lines[0])
    assert lines[-1].split(": ", 1)[1].startswith("images 24/24 (100%)")       # 4 crowdhuman + 20 msmt17 crops
    log = (out / "log.txt").read_text()
    assert "hybridps data build" in log and all(ln.split(": ", 1)[1] in log for ln in lines)
    assert "TOTAL" in log                                                          # the result table too
    strict_json((out / "manifest.json").read_text())
    # --quiet: nothing on stderr but the plan; log.txt still gets the lines
    quiet = tmp_path / "quiet"
    proc = subprocess.run([PY, "-m", "hybridps.data_prep", "build", str(quiet), "--workers", "1", "--quiet",
                           "--source", f"msmt17={out.parent / 'synth' / 'msmt17'}"],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 0 and not progress_lines(proc.stderr, "images")
    assert "images 20/20 (100%)" in (quiet / "log.txt").read_text()


@pytest.fixture(scope="module")
def pretrained(build, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("pre") / "run"
    proc = subprocess.run([PY, "-m", "hybridps.pretrain", "--config", str(TINY_PRE), "--shards", str(build[0]), "--out", str(out),
                           "--max-steps", "3", "train.log_with=null"],
                          capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_pretrain_prints_step_lines_when_piped(pretrained):
    out, proc = pretrained
    lines = progress_lines(proc.stderr, "step")
    assert [ln.split(": ", 1)[1].split(" |")[0] for ln in lines] == ["step 1/3 (33%)", "step 2/3 (67%)",
                                                                     "step 3/3 (100%)"]
    assert all(" loss " in ln and " lr " in ln and " mem " in ln and "elapsed" in ln for ln in lines)
    assert "ETA" in lines[0]
    assert "run directory:" in proc.stdout
    log = (out / "log.txt").read_text()
    assert all(ln.split(": ", 1)[1] in log for ln in lines) and "run directory:" in log
    for name in ("meta.json", "ranks/rank0.json"):
        assert strict_json((out / name).read_text())["distributed_type"] == "NO"     # a plain string, not an enum
    rows = [strict_json(ln) for ln in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


@pytest.fixture(scope="module")
def prw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "prw"
    synth_prw.write(root, seed=0, size="tiny")
    return root


@pytest.mark.slow
def test_finetune_prints_step_lines_and_writes_the_same_history_fields(pretrained, prw, tmp_path, capsys,
                                                                       monkeypatch):
    from hybridps.finetune import cli
    from hybridps.pretrain.history import FIELDS

    monkeypatch.setenv(runlog.INTERVAL_ENV, "0")
    out = tmp_path / "ft"
    assert cli.main(["train", "--dataset", "prw", "--root", str(prw), "--config", str(TINY_FT), "--init", "none",
                     "--out", str(out), "--max-steps", "2", "--eval", *FAST_FT]) == 0
    captured = capsys.readouterr()
    lines = progress_lines(captured.err, "step")
    assert [ln.split(": ", 1)[1].split(" |")[0] for ln in lines] == ["step 1/2 (50%)", "step 2/2 (100%)"]
    assert progress_lines(captured.err, "gallery")                       # inference counts its images too
    assert "mAP" in captured.out                                         # the result table: stdout
    log = (out / "log.txt").read_text()
    assert all(ln.split(": ", 1)[1] in log for ln in lines) and "mAP" in log
    for name in ("meta.json", "eval_prw/metrics.json", "eval_prw/per_query.json"):
        strict_json((out / name).read_text())

    pre = [strict_json(ln) for ln in (pretrained[0] / "history.jsonl").read_text().splitlines()]
    ft = [strict_json(ln) for ln in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ft] == [1, 2]
    assert all(tuple(r) == FIELDS for r in pre + ft)                     # same names, same order
    for r in pre + ft:
        assert isinstance(r["terms"], dict) and r["terms"] and all(k != "loss" for k in r["terms"])
        assert math.isfinite(r["loss"]) and r["time"] >= 0 and r["mem_mib"] > 0 and r["lr"] > 0
    assert "loss_reid" in pre[0]["terms"] and "loss_reid" in ft[0]["terms"]


def test_terminal_gets_a_bar_and_log_txt_still_gets_the_lines(build, tmp_path):
    """stderr on a pseudo-terminal: a tqdm bar, no plain progress lines there; log.txt has them."""
    import pty
    import select

    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))   # a 120-column terminal
    out = tmp_path / "tty"
    proc = subprocess.Popen([PY, "-m", "hybridps.data_prep", "build", str(out), "--workers", "1",
                             "--source", f"msmt17={build[0].parent / 'synth' / 'msmt17'}"],
                            stdout=subprocess.DEVNULL, stderr=slave, env=env())
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(master, 4096)
        except OSError:            # the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "\rimages:   0%|" in screen and "/20 [" in screen and "img/s]" in screen     # tqdm's bar
    assert not progress_lines(screen, "images")                                   # no plain lines
    assert "images 20/20 (100%)" in (out / "log.txt").read_text()
