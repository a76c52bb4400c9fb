"""Hostile files, faults and bad values against ``python -m data_prep`` (issue 9).

Every input is made here for real: pickles written byte by byte (a list that
reuses itself level after level, a list that holds itself), user files in an
output directory, a second real build process holding the output lock, JPEG
and PNG bytes made with PIL and then damaged.  The build runs through
``data_prep.cli.main`` in this process (the command's code path); the lock
test needs a second process and starts one.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep import cli
from data_prep.formats import luperson
from test_build import sources, synth_world

REPO = Path(__file__).resolve().parents[1]


def run_cli(*argv) -> int:
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synth_world(tmp_path_factory)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ hostile pickles
def laughs_pickle(levels: int = 50) -> bytes:
    """Protocol-2 bytes of L[i] = [L[i-1], L[i-1]]: ~10 bytes a level, 2**levels leaves."""
    out = bytearray(b"\x80\x02]q\x00")
    for i in range(1, levels + 1):
        out += b"]q" + bytes([i]) + b"(h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"e"
    return bytes(out + b".")


def self_pickle() -> bytes:
    x: list = []
    x.append(x)
    return pickle.dumps(x, protocol=2)


def deep_pickle(depth: int = 20000) -> bytes:
    # EMPTY_LIST MARK ... nested without recursion in the writer
    return b"\x80\x02" + b"](" * depth + b"e" * depth + b"."


def reduce_pickle(marker: Path) -> bytes:
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    return pickle.dumps([Boom()], protocol=2)


@pytest.mark.parametrize("kind", ["laughs", "self", "deep"])
@pytest.mark.parametrize("reader", ["keys", "names"])
def test_luperson_bounded_pickles_refused_quickly(tmp_path, kind, reader):
    data = {"laughs": laughs_pickle, "self": self_pickle, "deep": deep_pickle}[kind]()
    assert len(data) < 100_000
    path = tmp_path / ("keys.pkl" if reader == "keys" else "CFS_list.pkl")
    path.write_bytes(data)
    t0 = time.monotonic()
    with pytest.raises(ValueError) as err:
        (luperson.read_keys_pickle if reader == "keys" else luperson.read_name_list)(path)
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    assert any(w in msg for w in ("billion laughs", "contains itself", "levels deep")), msg


def test_luperson_reduce_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "keys.pkl"
    path.write_bytes(reduce_pickle(marker))
    with pytest.raises(ValueError, match="refusing to load"):
        luperson.read_keys_pickle(path)
    assert not marker.exists()


def test_luperson_keys_of_wrong_type_are_a_clear_error(tmp_path):
    path = tmp_path / "keys.pkl"
    path.write_bytes(pickle.dumps({"keys": [["a"], ["b"]]}, protocol=2))
    with pytest.raises(ValueError, match="not a string"):
        luperson.read_keys_pickle(path)
    path.write_bytes(pickle.dumps({"keys": ["a", "b"], "pids": ["x", None]}, protocol=2))
    with pytest.raises(ValueError, match="pid is not an integer"):
        luperson.read_keys_pickle(path)


# ------------------------------------------------------------------ output directory
def test_overwrite_removes_only_what_a_build_wrote(world, tmp_path):
    out = tmp_path / "out"
    args = ["build", out, *sources(world[0], ["market1501"]), "--quiet", "--workers", 1]
    assert run_cli(*args, "--shard-size", 5) == 0
    ds = out / "market1501"
    mine = {ds / "mine.tar": b"user tar", ds / "notes.tmp": b"user tmp", ds / "README.txt": b"notes",
            ds / "train-old.tar": b"not a shard name", out / "notes.txt": b"top"}
    for p, b in mine.items():
        p.write_bytes(b)
    ours_tmp = ds / "train-000042.tar.tmp"          # a killed build's own leftover
    ours_tmp.write_bytes(b"partial")
    assert run_cli(*args, "--shard-size", 4, "--overwrite") == 0
    for p, b in mine.items():
        assert p.read_bytes() == b, p
    assert not ours_tmp.exists()
    shards = sorted(p.name for p in ds.glob("train-*.tar"))
    assert shards == [f"train-{i:06d}.tar" for i in range(5)] + ["train-old.tar"]


def test_overwrite_of_a_non_build_directory_keeps_user_files(world, tmp_path):
    out = tmp_path / "precious"
    (out / "market1501").mkdir(parents=True)
    keep = out / "market1501" / "backup.tar"
    keep.write_bytes(b"a user's own tar")
    note = out / "market1501" / "x.tmp"
    note.write_bytes(b"tmp")
    assert run_cli("build", out, *sources(world[0], ["market1501"]), "--quiet", "--overwrite",
                   "--shard-size", 1000) == 0
    assert note.read_bytes() == b"tmp" and keep.read_bytes() == b"a user's own tar"


def test_second_build_on_same_out_exits_2(world, tmp_path, capsys):
    out = tmp_path / "busy"
    log = tmp_path / "stderr.txt"
    env = {**os.environ, "HYBRIDPS_BUILD_STALL_AFTER": "3", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "data_prep", "build", str(out), *sources(world[0], ["market1501"]),
           "--workers", "1", "--quiet", "--shard-size", "5"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stderr=f, stdout=subprocess.DEVNULL, cwd=REPO, env=env)
    try:
        deadline = time.time() + 60
        while "stalled after 3 samples" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline
            time.sleep(0.1)
        capsys.readouterr()
        assert run_cli("build", out, *sources(world[0], ["market1501"]), "--quiet", "--workers", 1,
                       "--shard-size", 5) == 2
        err = one_line_error(capsys)
        assert "another build" in err and ".build.lock" in err
    finally:
        proc.kill()
        proc.wait()
    # the lock dies with its process: the build resumes
    assert run_cli("build", out, *sources(world[0], ["market1501"]), "--quiet", "--workers", 1,
                   "--shard-size", 5) == 0
