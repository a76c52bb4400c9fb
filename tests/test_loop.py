"""The training-loop pieces shared by pre-training and fine-tuning (pretrain/loop.py, pretrain/optim.py)."""
from __future__ import annotations

import pytest
import torch

from hybridps.pretrain.loop import flatten, hparams, to_device
from hybridps.pretrain.optim import linear_warmup, param_groups, sgd, step_decay


def test_flatten_gives_dotted_keys_and_drops_empty_dicts():
    assert flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": {}, "f": None}) == {"a.b": 1, "a.c.d": [2], "f": None}


def test_hparams_keep_scalars_and_write_the_rest_as_text():
    from hybridps.finetune.config import FinetuneConfig

    hp = hparams(FinetuneConfig())
    assert hp and all(isinstance(v, (int, float, str, bool)) for v in hp.values())
    assert hp["train.milestones"] == str(list(FinetuneConfig().train.milestones))


def test_to_device_keeps_containers_and_moves_every_tensor():
    batch = ([torch.zeros(2, dtype=torch.float64)], [{"boxes": torch.ones(1, 4), "key": "a"}], ("x", torch.ones(1)))
    moved = to_device(batch, "meta")
    assert isinstance(moved, tuple) and isinstance(moved[0], list) and isinstance(moved[2], tuple)
    assert moved[0][0].device.type == "meta" and moved[1][0]["boxes"].device.type == "meta"
    assert moved[1][0]["key"] == "a" and moved[2][0] == "x"


def test_to_device_rebuilds_namedtuples():
    from collections import namedtuple

    Pair = namedtuple("Pair", "image target")
    moved = to_device(Pair(torch.zeros(1), {"boxes": torch.ones(1, 4)}), "meta")
    assert type(moved) is Pair and moved.image.device.type == "meta" and moved.target["boxes"].device.type == "meta"


def test_tracker_problem_names_how_to_turn_it_off(monkeypatch):
    import accelerate.utils

    from hybridps.pretrain.loop import tracker_problem

    assert tracker_problem(None) is None
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    assert tracker_problem("tensorboard", off="--log-with none").endswith("or --log-with none)")


def test_warmup_and_step_decay():
    assert [linear_warmup(s, 4, 0.2) for s in (0, 2, 4, 9)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    assert linear_warmup(0, 0, 0.5) == 1.0                    # no warm-up
    assert [step_decay(e, (2, 4), 0.1) for e in (0, 1.5, 2, 4, 7)] == pytest.approx([1, 1, 0.1, 0.01, 0.01])


def test_sgd_groups_follow_the_decay_flags():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    opt = sgd(model, lr=0.1, momentum=0.9, weight_decay=5e-4)
    decayed, free = opt.param_groups
    assert len(decayed["params"]) == 2 and free["weight_decay"] == 0.0 and len(free["params"]) == 4
    assert opt.defaults["momentum"] == 0.9
    every = sgd(model, 0.1, 0.9, 5e-4, decay_bias=True, decay_norm=True)
    assert len(every.param_groups) == 1 and len(every.param_groups[0]["params"]) == 6
    assert sum(len(g["params"]) for g in param_groups(model, 5e-4, decay_bias=True)) == 6
