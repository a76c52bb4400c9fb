"""Import layering of the four parts, read from the source (every import statement).

data_prep and checkpoints import neither of the others; pretrain may use both; finetune may
use all three.  The shared core (``hybridps.registry``, ``hybridps.cli``) imports no part at
module level, and no file imports a part under its old top-level name.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("data_prep", "pretrain", "checkpoints", "finetune")
ALLOWED = {"data_prep": {"data_prep"}, "checkpoints": {"checkpoints"},
           "pretrain": {"pretrain", "data_prep", "checkpoints"}, "finetune": set(PARTS), "hybridps": set()}


def imported_parts(path: Path) -> list[tuple[int, str]]:
    """(line, part) for each absolute import of a part; old top-level names count as 'OLD:<part>'."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        for name in names:
            bits = name.split(".")
            if bits[0] in PARTS:
                out.append((node.lineno, f"OLD:{bits[0]}"))
            elif bits[0] == "hybridps" and len(bits) > 1 and bits[1] in PARTS:
                out.append((node.lineno, bits[1]))
    return out


@pytest.mark.parametrize("owner", sorted(ALLOWED))
def test_parts_import_only_what_they_may(owner):
    bad = []
    for path in sorted((ROOT / owner).rglob("*.py")):
        if owner == "hybridps" and path.name == "cli.py":
            continue        # the command dispatches to the parts by module name, at call time
        for line, part in imported_parts(path):
            if part.startswith("OLD:") or part not in ALLOWED[owner]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {part}")
    assert not bad, bad


def test_no_old_top_level_imports_anywhere():
    bad = [f"{p.relative_to(ROOT)}:{line}" for folder in ("tests", "benchmarks", "scripts")
           for p in sorted((ROOT / folder).rglob("*.py")) for line, part in imported_parts(p) if part.startswith("OLD:")]
    assert not bad, bad


def test_the_check_sees_a_violation(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import os\nfrom hybridps.pretrain.train import train\nimport finetune.cli\nfrom . import y\n")
    assert imported_parts(f) == [(2, "pretrain"), (3, "OLD:finetune")]
