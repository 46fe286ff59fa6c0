"""The learning-rate schedules (``train.lr_schedule``, ``train_vae.lr_schedule``; training/optim.py): each one's
values against its formula and against diffusers' schedule of the same name, the config's choices, and the
default (cosine) unchanged to the bit. The LR a trained optimizer actually ran at: tests/test_train_stage.py.
"""

import math
from typing import get_args

import pytest
import torch
from diffusers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from diffusion.config import ConfigError
from diffusion.stage_configs import LRSchedule, TrainConfig, TrainVAEConfig
from diffusion.training.optim import LR_SCHEDULES, lr_lambda

WARMUP, TOTAL = 10, 110  # the decay runs over steps 10 ... 110: midway is step 60


@pytest.mark.parametrize("schedule, mid, end", [
    # m + (1 - m) * (1 + cos(pi * p)) / 2 at p = 1/2 and 1 (SGDR eq. 5)
    ("cosine", 0.2 + 0.8 * 0.5, 0.2),
    # m + (1 - m) * (1 - p)
    ("linear", 0.2 + 0.8 * 0.5, 0.2),
    ("constant", 1.0, 1.0),
])
def test_each_schedule_warms_up_then_follows_its_formula(schedule, mid, end):
    f = lr_lambda(schedule, WARMUP, TOTAL, 0.2)
    assert [f(s) for s in range(WARMUP)] == pytest.approx([(s + 1) / WARMUP for s in range(WARMUP)])
    assert f(WARMUP) == 1.0  # the warm-up's end: the peak
    assert f(60) == pytest.approx(mid)
    assert f(TOTAL) == pytest.approx(end) and f(TOTAL + 50) == pytest.approx(end)  # and it stays there
    # A quarter of the way the shapes part: cosine still near the peak, linear a quarter down.
    quarter = {"cosine": 0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2, "linear": 0.2 + 0.8 * 0.75, "constant": 1.0}
    assert f(35) == pytest.approx(quarter[schedule])


@pytest.mark.parametrize("schedule, reference, kwargs", [
    ("cosine", get_cosine_schedule_with_warmup, {}),  # decays to 0: our min_lr_ratio 0
    ("linear", get_linear_schedule_with_warmup, {}),
    ("linear", get_linear_schedule_with_warmup, {"f_min": 0.1}),  # its floor is our min_lr_ratio
    ("constant", get_constant_schedule_with_warmup, {}),
])
def test_schedules_match_diffusers_after_the_warm_up(schedule, reference, kwargs):
    """From the warm-up's end to max_steps each equals diffusers' schedule of the same name. In the warm-up ours
    runs one step ahead ((s + 1) / warmup against s / warmup: our first step does not run at LR 0); past max_steps
    (a run resumed with a lower max_steps) ours stays at the floor where diffusers' cosine climbs again."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    args = (opt, WARMUP) if schedule == "constant" else (opt, WARMUP, TOTAL)
    theirs = reference(*args, **kwargs).lr_lambdas[0]
    ours = lr_lambda(schedule, WARMUP, TOTAL, kwargs.get("f_min", 0.0))
    steps = range(WARMUP, TOTAL + 1)
    assert [ours(s) for s in steps] == pytest.approx([theirs(s) for s in steps], abs=1e-12)
    assert [ours(s) for s in range(WARMUP - 1)] == pytest.approx([theirs(s + 1) for s in range(WARMUP - 1)])


def test_cosine_is_the_schedule_it_replaced_to_the_bit():
    """The default run trains the same weights as before lr_schedule existed: the factors of params.yaml's
    settings (train: 100 warm-up steps of 1300, to 0.1; train_vae: of 1600, to 0.02) equal, as floats, those of
    the function it replaced (copied here as it was)."""

    def before(step, warmup, total, min_ratio):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    for total, ratio in ((1300, 0.1), (1600, 0.02), (12, 0.1)):
        f = lr_lambda("cosine", 100 if total > 12 else 2, total, ratio)
        assert [f(s) for s in range(total + 1)] == [before(s, 100 if total > 12 else 2, total, ratio)
                                                   for s in range(total + 1)]


def test_vae_min_lr_ratio_null_is_a_constant_lr_after_the_warm_up_whatever_the_schedule():
    """train_vae.min_lr_ratio: null meant a constant LR after the warm-up before lr_schedule existed (the gpu
    profile's); it still does, as a ratio of 1.0, for every schedule, and to the bit as the old factor
    min(1, (step + 1) / warmup)."""
    from diffusion.training.vae_system import schedule

    for name in get_args(LRSchedule):
        cfg = TrainVAEConfig.from_dict({"lr_schedule": name, "min_lr_ratio": None, "warmup_steps": 5,
                                        "max_steps": 40}, "train_vae")
        f = schedule(cfg)
        assert [f(s) for s in range(60)] == [min(1.0, (s + 1) / 5) for s in range(60)], name
    linear = schedule(TrainVAEConfig.from_dict({"lr_schedule": "linear", "min_lr_ratio": 0.0, "warmup_steps": 0,
                                                "max_steps": 40}, "train_vae"))
    assert linear(20) == pytest.approx(0.5) and linear(40) == 0.0


def test_the_configs_choices_are_the_schedules():
    assert get_args(LRSchedule) == tuple(LR_SCHEDULES)
    assert TrainConfig().lr_schedule == TrainVAEConfig().lr_schedule == "cosine"


@pytest.mark.parametrize("cls", [TrainConfig, TrainVAEConfig])
@pytest.mark.parametrize("bad", ["cosine_with_restarts", "constant_with_warmup", "Linear", 1])
def test_a_bad_schedule_is_refused_naming_the_key_and_the_choices(cls, bad):
    with pytest.raises(ConfigError, match=rf"^{cls.section}\.lr_schedule: expected one of 'cosine', 'linear', "
                                          rf"'constant', got {bad!r}$"):
        cls.from_dict({"lr_schedule": bad}, cls.section)


def test_an_unknown_name_fails_when_the_optimizer_is_built():
    """The Python API (OptimSettings, train_diffusion_model) has no config to refuse it: the name is checked
    when the factor function is made, not at the first step."""
    with pytest.raises(ValueError, match="lr_schedule: expected one of 'cosine', 'linear', 'constant', got 'step'"):
        lr_lambda("step", 10, 100, 0.1)
