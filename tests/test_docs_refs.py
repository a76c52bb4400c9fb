"""Docs cited by the code must ship with it.

Every ``something.md`` named in the packages, scripts, benchmarks, docs/ or the
README must be a file of this repository (relative to the citing file or to the
repository root), and every "X.md section N" must name a numbered heading of X.
Web links are not checked; names of Markdown files our commands *write* are listed
in GENERATED.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("data_prep", "pretrain", "checkpoints", "finetune", "hybridps", "benchmarks", "scripts", "docs")
SCANNED_FILES = ("README.md",)
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".txt", ".toml", ".cfg", ".json"}
# Markdown files that commands write (outputs, not docs): hybridps finetune compare, benchmarks/*ablation.py
GENERATED = {"comparison.md", "ablation.md", "ablation_3seeds.md", "psdiff_ablation.md", "modules_ablation.md"}
# Development-time reference notes that never shipped: cited by name, with or without ".md"
NOT_SHIPPED = re.compile(r"\b(ps_datasets_eval|pretrain_datasets|ckpt_formats|anchors_deps)\b|shared/reference")

URL = re.compile(r"\w+://\S+")
MD_REF = re.compile(r"(?<![\w./-])([\w./-]*\w\.md)\b")
SECTION_REF = re.compile(
    r"([\w./-]*\w\.md)[`\]()\w./-]*\s+sections?\s+(\d+(?:\.\d+)*)(?:\s*-\s*(\d+(?:\.\d+)*))?")
HEADING = re.compile(r"^#+\s+(\d+(?:\.\d+)*)\.?\s", re.M)


def scanned_files() -> list[Path]:
    files = [ROOT / f for f in SCANNED_FILES]
    for d in SCANNED_DIRS:
        files += [p for p in sorted((ROOT / d).rglob("*"))
                  if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    return files


def resolve(ref: str, citing: Path) -> Path | None:
    for base in (citing.parent, ROOT):
        path = (base / ref).resolve()
        if path.is_file() and ROOT in path.parents:
            return path
    return None


def broken_refs(text: str, citing: Path) -> list[str]:
    """Problems with the .md citations of ``text`` (cited from file ``citing``)."""
    text = URL.sub(" ", text)
    problems = []
    for m in MD_REF.finditer(text):
        ref = m.group(1)
        if Path(ref).name in GENERATED and not ref.startswith("docs/"):
            continue
        if resolve(ref, citing) is None:
            line = text.count("\n", 0, m.start()) + 1
            problems.append(f"{citing.relative_to(ROOT)}:{line}: cites {ref}, which is not in the repository")
    for m in NOT_SHIPPED.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        problems.append(f"{citing.relative_to(ROOT)}:{line}: cites {m.group(0)}, a note users do not have")
    for m in SECTION_REF.finditer(text):
        target = resolve(m.group(1), citing)
        if target is None:
            continue  # reported above
        headings = set(HEADING.findall(target.read_text(encoding="utf-8")))
        for section in filter(None, (m.group(2), m.group(3))):
            if section not in headings:
                line = text.count("\n", 0, m.start()) + 1
                problems.append(f"{citing.relative_to(ROOT)}:{line}: cites {m.group(1)} section {section}, "
                                f"which has no such numbered heading")
    return problems


def test_every_cited_md_file_exists_with_its_sections():
    problems = []
    for path in scanned_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        problems += broken_refs(text, path)
    assert not problems, "\n".join(problems)


def test_docs_are_listed_in_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in readme, f"README does not link docs/{doc.name}"


@pytest.mark.parametrize("text, bad", [
    ("see ps_datasets_eval.md 2.4 for the LUT", "ps_datasets_eval.md"),
    ("Layout (see docs/reference ``ckpt_formats.md`` section 1)", "ckpt_formats.md"),
    ("details in docs/protocol.md section 99", "section 99"),
    ("details in [`docs/datasets.md`](docs/datasets.md) sections 3.4-3.9", "section 3.9"),
    ("written to docs/comparison.md", "docs/comparison.md"),
    ("initialisation (ckpt_formats / ps_datasets_eval 6.4)", "ckpt_formats"),
])
def test_checker_catches_broken_citations(text, bad):
    problems = broken_refs(text, ROOT / "finetune" / "engine.py")
    assert problems and bad in problems[0]


@pytest.mark.parametrize("text", [
    "see docs/protocol.md section 8 and docs/datasets.md sections 3.4-3.5",
    "the layout of https://github.com/x/y/blob/main/doc/dataset_structure.md",
    "writes OUT/comparison.md and out / 'ablation.md'",
    "tables: `.json` and `.md`",
])
def test_checker_accepts_valid_citations(text):
    assert broken_refs(text, ROOT / "finetune" / "engine.py") == []
