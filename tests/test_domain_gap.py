"""The synthetic world's domain-gap knob (data_prep synth --domain-gap)."""
from __future__ import annotations

import numpy as np
import pytest

from hybridps.data_prep.synth.render import STYLES, appearance_for, domain_gap, effective_style, render_crop, stable_rng


def _crop(name: str, gap: float) -> np.ndarray:
    with domain_gap(gap):
        return render_crop(STYLES[name], appearance_for(0, "x", 1), 40, 100, stable_rng("t"))


def _distance(style_a, style_b) -> float:
    fields = lambda s: np.array([*s.bg_a, *s.bg_b, *(100 * np.array(s.gain)), s.noise, s.blur, 100 * s.brightness])
    return float(np.abs(fields(style_a) - fields(style_b)).sum())


def test_gap_moves_every_source_style_relative_to_the_target():
    target = STYLES["prw"]
    for name in ("crowdhuman", "ecp", "msmt17", "cuhk03", "luperson"):
        with domain_gap(0.0):
            zero = effective_style(STYLES[name])
        with domain_gap(2.5):
            strong = effective_style(STYLES[name])
        assert _distance(zero, target) == pytest.approx(0.0, abs=1e-6)
        assert _distance(strong, target) > _distance(STYLES[name], target) > 0
    with domain_gap(3.0):
        assert effective_style(target) == target          # the target itself never moves


def test_gap_changes_pixels_but_default_is_unchanged():
    base = _crop("msmt17", 1.0)
    with domain_gap(1.0):
        assert np.array_equal(base, _crop("msmt17", 1.0))
    prw = _crop("prw", 1.0).astype(float).mean(axis=(0, 1))
    near = np.abs(_crop("msmt17", 0.0).astype(float).mean(axis=(0, 1)) - prw).sum()
    far = np.abs(_crop("msmt17", 2.5).astype(float).mean(axis=(0, 1)) - prw).sum()
    assert near < np.abs(base.astype(float).mean(axis=(0, 1)) - prw).sum() < far
    with pytest.raises(ValueError, match="gap"):
        with domain_gap(-1):
            pass


def test_synth_cli_takes_the_gap_and_bench_size(tmp_path):
    from hybridps.data_prep.cli import main

    assert main(["synth", str(tmp_path / "w"), "--only", "prw", "--size", "bench", "--domain-gap", "2"]) == 0
    import json
    truth = json.loads((tmp_path / "w" / "synth_truth.json").read_text())
    assert len(truth["prw"]["protocol"]["queries"]) >= 100
    assert main(["synth", str(tmp_path / "x"), "--only", "prw", "--domain-gap", "-1"]) == 2
