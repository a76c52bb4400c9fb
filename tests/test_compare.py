"""finetune compare: the demo's comparison table."""
import json

import pytest

from hybridps.finetune.cli import main
from hybridps.finetune.compare import CompareError, compare_table


def _metrics(tmp_path, name, mAP, top1, det_ap):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({
        "dataset": "prw",
        "search": {"mAP": mAP, "top1": top1, "top5": top1 + 0.01, "top10": top1 + 0.02},
        "detection": {"ap": det_ap, "recall": 0.5},
    }))
    return d


def test_table_has_one_row_per_eval_with_its_values(tmp_path):
    a = _metrics(tmp_path, "a", 0.10, 0.1325, 0.40)
    b = _metrics(tmp_path, "b", 0.125, 0.20, 0.455)
    table = compare_table([a, b / "metrics.json"], ["random", "full"])
    rows = [r for r in table.splitlines() if r.startswith("| random") or r.startswith("| full")]
    assert rows[0].split("|")[2].strip() == "10.00" and rows[0].split("|")[3].strip() == "13.25"
    assert rows[1].split("|")[2].strip() == "12.50" and rows[1].split("|")[6].strip() == "45.50"


def test_cli_writes_table_and_rejects_bad_input(tmp_path, capsys):
    a = _metrics(tmp_path, "a", 0.01, 0.02, 0.03)
    out = tmp_path / "cmp.md"
    assert main(["compare", str(a), "--names", "x", "--out", str(out)]) == 0
    assert "| x | 1.00 |" in out.read_text()
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "no metrics.json" in capsys.readouterr().err
    with pytest.raises(CompareError, match="2 metrics files but 1 names"):
        compare_table([a, a], ["only-one"])


def test_mixed_iou_rules_are_named_per_row(tmp_path):
    a = _metrics(tmp_path, "a", 0.10, 0.2, 0.4)                  # an older file: standard rule
    b = _metrics(tmp_path, "b", 0.12, 0.2, 0.4)
    m = json.loads((b / "metrics.json").read_text())
    (b / "metrics.json").write_text(json.dumps({**m, "iou_rule": "fixed"}))
    same = compare_table([a, a], ["x", "y"])
    assert "IoU rule: standard" in same.splitlines()[0] and "| IoU rule" not in same
    mixed = compare_table([a, b], ["std", "fix"])
    assert "IoU rules DIFFER" in mixed.splitlines()[0]
    rows = {r.split("|")[1].strip(): r.split("|")[-2].strip() for r in mixed.splitlines() if r.startswith("| ")}
    assert rows["std"] == "standard" and rows["fix"] == "fixed"
