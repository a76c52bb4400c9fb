"""hybridps.registry: the one way formats, layouts, backbones and targets are registered."""
from __future__ import annotations

import sys

import pytest

from hybridps.registry import Registry, UnknownNameError


@pytest.fixture()
def plugin_pkg(tmp_path, monkeypatch):
    pkg = tmp_path / "myplugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "zeta.py").write_text("NAME = 'zeta'\nORDER = 1\ndef parse(): return 'z'\n")
    (pkg / "alpha.py").write_text("NAME = 'alpha'\ndef parse(): return 'a'\n")
    (pkg / "helpers.py").write_text("X = 1\n")                    # no NAME/parse: not an entry
    (pkg / "_private.py").write_text("NAME = 'hidden'\ndef parse(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "myplugins"
    for mod in [m for m in sys.modules if m == "myplugins" or m.startswith("myplugins.")]:
        del sys.modules[mod]


def test_discovery_finds_modules_with_the_required_attributes_in_order(plugin_pkg):
    reg = Registry("thing", package=plugin_pkg, requires=("parse",))
    assert list(reg) == ["zeta", "alpha"]          # ORDER 1 before the default 100
    assert reg["alpha"].parse() == "a" and "helpers" not in reg and "hidden" not in reg and len(reg) == 2


def test_unknown_name_lists_the_known_ones(plugin_pkg):
    reg = Registry("thing", package=plugin_pkg, requires=("parse",))
    with pytest.raises(UnknownNameError, match=r"unknown thing 'nope'; known: zeta, alpha") as err:
        reg.get("nope")
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)


def test_decorator_keeps_insertion_order_and_refuses_a_second_entry_under_one_name():
    reg: Registry = Registry("backbone")

    @reg.register("b")
    def b():
        return 2

    @reg.register("a")
    def a():
        return 1

    assert list(reg) == ["b", "a"] and reg["a"]() == 1
    reg.add("a", a)                                  # the same object again is fine
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("a", b)
    with pytest.raises(ValueError, match="non-empty"):
        reg.add("", a)


def test_the_project_registries_use_it():
    from hybridps.checkpoints.layouts import LAYOUTS
    from hybridps.checkpoints.targets import TARGETS
    from hybridps.data_prep.formats import FORMATS
    from hybridps.pretrain.model.backbones import BACKBONES

    for reg in (FORMATS, LAYOUTS, TARGETS, BACKBONES):
        assert isinstance(reg, Registry) and len(reg) >= 3
    assert list(FORMATS)[:2] == ["crowdhuman", "ecp"] and "posetrack21" in FORMATS
    assert list(LAYOUTS)[0] == "detectron2" and list(LAYOUTS)[-1] == "mmdet"   # detection order kept
    assert {"resnet50", "resnet18", "shufflenet"} <= set(BACKBONES)
