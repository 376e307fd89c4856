"""The learning-rate schedule (captioner.train.step.lr_at): train.warmup_steps of linear warm-up, then a
cosine decay to zero over the rest of the run, or a constant rate; a pure function of the step."""

import math

import pytest

from captioner.config import TrainConfig, load_config
from captioner.train.step import lr_at


def test_warm_up_then_cosine_or_constant():
    cfg = TrainConfig(lr=2e-4, warmup_steps=10)
    assert [lr_at(s, cfg, 110) for s in (0, 4, 9)] == pytest.approx([2e-5, 1e-4, 2e-4])  # rises linearly
    assert lr_at(10, cfg, 110) == pytest.approx(2e-4)  # the peak, where the decay starts
    assert lr_at(60, cfg, 110) == pytest.approx(1e-4)  # half-way through the decay
    assert lr_at(110, cfg, 110) == pytest.approx(0.0, abs=1e-12) and lr_at(500, cfg, 110) == pytest.approx(0.0, abs=1e-12)
    constant = TrainConfig(lr=2e-4, warmup_steps=10, schedule="constant")
    assert lr_at(3, constant, 110) == pytest.approx(8e-5) and lr_at(90, constant, 110) == pytest.approx(2e-4)
    assert lr_at(0, TrainConfig(lr=1e-3, warmup_steps=0), 50) == pytest.approx(1e-3)  # no warm-up
    assert all(math.isfinite(lr_at(s, cfg, 0)) for s in range(20))  # a run of no steps divides by nothing


def test_the_fine_tuning_recipe_warms_up_gently():
    cfg = load_config("finetune")
    assert cfg.train.lr <= 5e-4 and 0 < cfg.train.warmup_steps <= 50 and cfg.train.epochs <= 10
    assert cfg.data.holdout > 0 and cfg.train.select_metric == "CIDEr"
