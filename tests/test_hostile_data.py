"""Hostile files, faults and bad values against ``python -m hybridps.data_prep`` (issue 9).

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

from hybridps.data_prep import cli
from hybridps.data_prep.formats import luperson
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
    cmd = [sys.executable, "-m", "hybridps.data_prep", "build", str(out), *sources(world[0], ["market1501"]),
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


# ------------------------------------------------------------------ images and annotations
import io
import shutil
import struct
import zlib

import numpy as np
from PIL import Image

from hybridps.data_prep import imageio
from hybridps.data_prep.manifest import load_manifest, shard_paths
from hybridps.data_prep.preview import read_samples


def copy_dataset(world, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / "src" / name
    shutil.copytree(world[0] / name, dst)
    return dst


def market_images(root: Path) -> list[Path]:
    return sorted((root / "Market-1501-v15.09.15" / "bounding_box_train").glob("*.jpg"))


def jpeg_bytes(w=48, h=64, seed=0, quality=90) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def with_jpeg_size(data: bytes, w: int, h: int) -> bytes:
    """The same bytes with the frame header claiming another size (a decompression bomb)."""
    i = data.index(b"\xff\xc0")
    return data[:i + 5] + struct.pack(">HH", h, w) + data[i + 9:]


def png_with_size(w: int, h: int) -> bytes:
    """A few-hundred-byte PNG whose IHDR says w x h (CRC valid)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def corrupt_scan(data: bytes) -> bytes:
    sos = data.index(b"\xff\xda")
    return data[:sos + 40] + b"\xff\xd5" * 20 + data[sos + 80:]


def build(out, root, name, *extra) -> int:
    return run_cli("build", out, "--source", f"{name}={root}", "--quiet", "--workers", 1, *extra)


def skipped(out, name, split="train") -> dict:
    return load_manifest(out)["datasets"][name]["splits"][split]["skipped"]


def test_bombs_and_oversized_headers_are_counted_skips(world, tmp_path):
    root = copy_dataset(world, "market1501", tmp_path)
    imgs = market_images(root)
    imgs[0].write_bytes(with_jpeg_size(jpeg_bytes(), 11000, 11000))      # 121 Mpx in ~2 KB
    imgs[1].write_bytes(with_jpeg_size(jpeg_bytes(seed=1), 60000, 60000))
    imgs[2].write_bytes(png_with_size(60000, 60000))                       # PIL DecompressionBombError
    assert all(p.stat().st_size < 20_000 for p in imgs[:3])
    t0 = time.monotonic()
    assert build(tmp_path / "out", root, "market1501") == 0
    assert time.monotonic() - t0 < 30
    assert skipped(tmp_path / "out", "market1501").get("too_large_image") == 3
    # the limit is an option: a 48x64 image is over a 3000-pixel limit
    assert build(tmp_path / "out2", root, "market1501", "--max-pixels", 3000) == 0
    assert skipped(tmp_path / "out2", "market1501")["too_large_image"] == len(imgs)


def test_bomb_is_a_clear_error_for_every_decode(tmp_path):
    for payload, fmt in ((png_with_size(60000, 60000), "png"), (with_jpeg_size(jpeg_bytes(), 11000, 11000), "jpeg")):
        with pytest.raises(imageio.ImageError) as err:
            imageio.decode_rgb(payload, fmt)
        assert err.value.reason == "too_large_image"
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_size(60000, 60000))
    assert imageio.header_size_or_reason(path) == "too_large_image"


def test_16_bit_png_is_scaled_not_white(world, tmp_path):
    root = copy_dataset(world, "market1501", tmp_path)
    img = market_images(root)[0]
    ramp = np.tile(np.linspace(0, 65535, 48).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(img, format="PNG")               # PNG bytes at a .jpg name
    assert Image.open(img).mode.startswith("I")
    arr = imageio.decode_rgb(img.read_bytes(), "png")
    assert arr.dtype == np.uint8 and arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255
    assert 100 < arr.mean() < 155                       # PIL's convert("RGB") gives ~255 everywhere
    assert build(tmp_path / "out", root, "market1501") == 0
    out = tmp_path / "out"
    key = img.stem
    for p in shard_paths(load_manifest(out), out):
        for s in read_samples(p):
            if key in s["__key__"]:
                got = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("L"))
                assert 100 < got.mean() < 155
                return
    pytest.fail("the 16-bit image is missing from the shards")


def test_corrupt_scan_counted_with_verify_decode(world, tmp_path):
    root = copy_dataset(world, "market1501", tmp_path)
    img = market_images(root)[0]
    img.write_bytes(corrupt_scan(img.read_bytes()))
    Image.open(img).load()                              # PIL alone decodes it without a word
    assert build(tmp_path / "plain", root, "market1501") == 0
    assert "corrupt_image" not in skipped(tmp_path / "plain", "market1501")
    assert build(tmp_path / "checked", root, "market1501", "--verify-decode") == 0
    assert skipped(tmp_path / "checked", "market1501")["corrupt_image"] == 1
    # every intact image still passes the check
    n = load_manifest(tmp_path / "checked")["datasets"]["market1501"]["splits"]["train"]["samples"]
    assert n == len(market_images(root)) - 1


@pytest.mark.parametrize("size", ["40000x40000", "4097x10", "0x5"])
def test_canvas_size_bounded(world, tmp_path, capsys, size):
    assert run_cli("build", tmp_path / "out", *sources(world[0], ["market1501"]), "--quiet",
                   "--canvas", "expand_resize", "--canvas-size", size) == 2
    assert "--canvas-size" in one_line_error(capsys)


def _odgt(root: Path) -> Path:
    return sorted(root.glob("annotation_*.odgt"))[0]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e30"])
def test_non_finite_box_dropped_with_reason(world, tmp_path, value):
    root = copy_dataset(world, "crowdhuman", tmp_path)
    odgt = _odgt(root)
    lines = odgt.read_text().splitlines()
    entry = json.loads(lines[0])
    person = next(g for g in entry["gtboxes"] if g["tag"] == "person")
    box_field = "fbox"
    person[box_field] = [float(value), 1, 20, 40] if value != "1e30" else [1, 1, 1e30, 40]
    lines[0] = json.dumps(entry)
    odgt.write_text("\n".join(lines) + "\n")
    split = "train" if "train" in odgt.name else "val"
    out = tmp_path / "out"
    assert run_cli("build", out, "--source", f"crowdhuman={root}", "--split", f"crowdhuman={split}",
                   "--quiet", "--workers", 1) == 0
    assert skipped(out, "crowdhuman", split).get("non_finite_box") == 1
    for p in shard_paths(load_manifest(out), out):
        for s in read_samples(p):
            boxes = np.asarray(json.loads(s["json"])["boxes"], dtype=np.float64)
            assert np.isfinite(boxes).all() and np.abs(boxes).max() <= 1e6


def test_check_record_drops_every_bad_box_shape():
    from hybridps.data_prep.record import ImageRef, Record, check_record
    rec = Record("x", "train", "k", ImageRef("file", "/nonexistent"), "det", False,
                 boxes=[[0, 0, 10, 10], [float("nan"), 0, 1, 1], [0, 0, 1], "abcd", [0, 0, True, 5],
                        [0, 0, 2e6, 5]], ids=[-1] * 6, ignore=[[0, 0, float("inf"), 1]])
    dropped = check_record(rec)
    assert rec.boxes == [[0, 0, 10, 10]] and rec.ids == [-1] and rec.ignore == []
    assert sorted(r for r, _ in dropped) == ["malformed_annotation"] * 3 + ["non_finite_box"] * 3


def test_invalid_utf8_line_is_one_skip_not_a_failed_dataset(world, tmp_path):
    root = copy_dataset(world, "crowdhuman", tmp_path)
    odgt = _odgt(root)
    split = "train" if "train" in odgt.name else "val"
    assert run_cli("build", tmp_path / "base", "--source", f"crowdhuman={root}", "--split", f"crowdhuman={split}",
                   "--quiet", "--workers", 1) == 0
    base = skipped(tmp_path / "base", "crowdhuman", split).get("malformed_annotation", 0)
    data = odgt.read_bytes().split(b"\n")
    data[0] = data[0].replace(b'"person"', b'"pers\xffon"', 1)
    odgt.write_bytes(b"\n".join(data))
    split = "train" if "train" in odgt.name else "val"
    out = tmp_path / "out"
    assert run_cli("build", out, "--source", f"crowdhuman={root}", "--split", f"crowdhuman={split}",
                   "--quiet", "--workers", 1) == 0
    assert skipped(out, "crowdhuman", split)["malformed_annotation"] == base + 1


def test_invalid_utf8_in_msmt17_list(world, tmp_path):
    root = copy_dataset(world, "msmt17", tmp_path)
    lst = sorted(root.rglob("list_train.txt"))[0]
    lines = lst.read_bytes().splitlines()
    lines[0] = lines[0] + b"\xfe"
    lst.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    assert build(out, root, "msmt17") == 0
    assert skipped(out, "msmt17")["malformed_annotation"] >= 1


def test_out_that_is_a_file_is_exit_2_one_line(world, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("not a directory")
    assert run_cli("build", out, *sources(world[0], ["market1501"]), "--quiet") == 2
    err = one_line_error(capsys)
    assert "in the way" in err or "exists" in err


def test_unreadable_image_is_reported_as_such(world, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files regardless of their mode")
    root = copy_dataset(world, "market1501", tmp_path)
    img = market_images(root)[0]
    img.chmod(0)
    assert build(tmp_path / "out", root, "market1501") == 0
    assert skipped(tmp_path / "out", "market1501").get("unreadable_file") == 1


def test_ecp_wrong_json_types_cost_one_object(world, tmp_path):
    root = copy_dataset(world, "ecp", tmp_path)
    labels = sorted(root.rglob("*.json"))
    frames = [p for p in labels if '"frame"' in p.read_text()]
    assert len(frames) >= 3
    # a list as identity, a 3-value box, a string as a coordinate, NaN; and one file nested past json's limit
    doc = json.loads(frames[0].read_text())
    doc["children"] += [{"identity": ["pedestrian"], "x0": 1, "y0": 1, "x1": 20, "y1": 40},
                        {"identity": "pedestrian", "x0": 1, "y0": 1, "x1": "wide", "y1": 40},
                        {"identity": "pedestrian", "x0": float("nan"), "y0": 1, "x1": 20, "y1": 40, "tags": 5}]
    frames[0].write_text(json.dumps(doc))
    frames[1].write_text('{"identity": "frame", "children": ' + "[" * 5000 + "]" * 5000 + "}")
    frames[2].write_bytes(frames[2].read_bytes().replace(b'"frame"', b'"fr\xffame"', 1))
    out = tmp_path / "out"
    args = ["build", out, "--source", f"ecp={root}", "--quiet", "--workers", 1]
    assert run_cli(*args) == 0
    m = load_manifest(out)["datasets"]["ecp"]["splits"]
    got = {r: n for s in m.values() for r, n in s["skipped"].items()}
    assert got.get("malformed_annotation", 0) >= 4 and got.get("non_finite_box", 0) >= 1, got


def test_full_disk_is_exit_2_disk_full(world, tmp_path, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    out = tmp_path / "out"
    out.mkdir()
    (out / "build.json.tmp").symlink_to("/dev/full")    # every write through it fails with ENOSPC
    assert run_cli("build", out, *sources(world[0], ["market1501"]), "--quiet", "--overwrite") == 2
    assert "disk full" in one_line_error(capsys)
