"""The installed package: one ``hybridps`` namespace and one ``hybridps`` command.

Builds the real wheel offline (``pip wheel --no-build-isolation --no-deps``), installs it
into a scratch folder and runs the console script from outside the source tree, so a
left-over top-level import (``import pretrain``) or a missing data file fails here.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("data_prep", "pretrain", "checkpoints", "finetune")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"       # a copy of the tracked sources: the build must not write into the checkout
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if rel.split("/")[0] in (*PARTS, "hybridps") or rel in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
            dest = src / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / rel).is_file():
                dest.write_bytes((ROOT / rel).read_bytes())
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(wheels), str(src)], check=True, timeout=300, capture_output=True)
    (wheel,) = wheels.glob("hybridps-*.whl")
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, timeout=300, capture_output=True)
    return wheel, target, tmp


def _run(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYBRIDPS_DEBUG")}
    env["PYTHONPATH"] = str(target)
    return subprocess.run([*args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_holds_one_namespace_with_data_files(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"hybridps"}, tops               # nothing installs as top-level data_prep/pretrain/...
    for f in ("hybridps/pretrain/train.py", "hybridps/pretrain/data/loader.py", "hybridps/finetune/cli.py",
              "hybridps/data_prep/formats/__init__.py", "hybridps/runlog.py", "hybridps/finetune/evaluate/scoring.py",
              "hybridps/checkpoints/registry.json", "hybridps/pretrain/configs/tiny.yaml",
              "hybridps/finetune/configs/prw.yaml", "hybridps/cli.py"):
        assert f in names, f
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "License-Expression: Apache-2.0" in text
    ep = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "hybridps = hybridps.cli:main" in ep


def test_console_command_runs_every_part_outside_the_checkout(installed):
    _, target, tmp = installed
    exe = target / "bin" / "hybridps"
    assert exe.is_file()
    out = _run(target, tmp, str(exe), "--help")
    assert out.returncode == 0 and all(c in out.stdout for c in ("data", "pretrain", "ckpt", "finetune")), out
    for cmd in (["data", "--help"], ["pretrain", "--help"], ["ckpt", "--help"], ["finetune", "--help"]):
        r = _run(target, tmp, str(exe), *cmd)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), (cmd, r.stderr[-2000:])
    r = _run(target, tmp, str(exe), "ckpt", "list")         # reads the packaged registry.json
    assert r.returncode == 0 and "psvis-resnet50" in r.stdout, r.stderr[-2000:]
    r = _run(target, tmp, str(exe), "nonsense")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown command" in r.stderr
    # the installed copy is the one used, and no part is imported under a top-level name
    probe = ("import sys, hybridps.finetune.cli, hybridps.pretrain.train, hybridps.data_prep.cli, "
             "hybridps.checkpoints.cli; print(hybridps.__file__); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in " + repr(PARTS) + "))")
    r = _run(target, tmp, sys.executable, "-c", probe)
    assert r.returncode == 0, r.stderr[-2000:]
    where, leaked = r.stdout.splitlines()
    assert where.startswith(str(target)) and leaked == "[]", r.stdout


def test_python_m_forms_work_in_the_checkout():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for mod in ("hybridps", "hybridps.data_prep", "hybridps.pretrain", "hybridps.checkpoints", "hybridps.finetune"):
        r = subprocess.run([sys.executable, "-m", mod, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), (mod, r.stderr[-1500:])


def test_every_source_folder_package_is_in_the_wheel(installed):
    """setup.py maps every sub-package: a new folder with __init__.py needs no packaging edit."""
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    on_disk = [p.relative_to(ROOT).as_posix() for part in PARTS for p in (ROOT / part).rglob("*.py")
               if "__pycache__" not in p.parts]
    missing = [rel for rel in on_disk if f"hybridps/{rel}" not in names]
    assert not missing, missing
