"""AdamW as the training systems build it (one fused kernel where Lightning allows it, and the gradient
clipping that goes with that), and their learning-rate schedules (at the end).

PyTorch's fused AdamW (``fused=True``) updates every parameter in one kernel launch, on CUDA and on a CPU.
Without it, AdamW on a CPU runs its for-loop form, about ten small kernels per parameter tensor: for the
VAE of ``params.yaml`` (~150 tensors) that was 9 of a 146 ms training step on 2 cores, and the fused one
made the step 4% faster (docs/performance.md). The update is the same up to float rounding.

Two things keep the fused kernel from being a plain switch, both about Lightning's mixed precision:

* Under ``16-mixed`` the GradScaler would unscale the gradients inside the fused kernel, after Lightning's
  gradient clipping, which would then clip scaled gradients (Lightning refuses the combination); there
  :func:`adamw` builds the multi-tensor (foreach) AdamW, which Lightning unscales before clipping.
* Under ``bf16-mixed`` there is no GradScaler, yet Lightning's precision plugin refuses to clip for any
  optimizer that unscales gradients itself; :class:`FusedAdamWClipping` clips there itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch


def grad_scaler(module: Any) -> Any:
    """The 16-mixed GradScaler of the module's Trainer, or None (32 and bf16-mixed scale no loss; no Trainer
    attached yet)."""
    trainer = getattr(module, "_trainer", None)
    return getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None


def adamw(module: Any, params: Iterable[Any], **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)`` for `module`'s Trainer: fused, or foreach under a GradScaler."""
    fused = grad_scaler(module) is None
    return torch.optim.AdamW(params, fused=fused, foreach=not fused, **kwargs)


class FusedAdamWClipping:
    """LightningModule mixin (list it before ``pl.LightningModule``): gradient clipping as Lightning does it,
    also for a fused AdamW under bf16-mixed.

    Lightning's mixed-precision plugin refuses to clip for any optimizer that unscales gradients itself (a
    fused one), assuming a GradScaler; bf16-mixed has none, so the gradients are the true ones and are
    clipped here over the optimizer's parameters (the same call Lightning makes under precision 32).
    """

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if gradient_clip_val and fused and grad_scaler(self) is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


# --------------------------------------------------------------------------------------------------
# Learning-rate schedules: a linear warm-up, then a decay chosen by name (``train.lr_schedule``)
# --------------------------------------------------------------------------------------------------
# Each decay is a pure function of the decay's progress p (0 at the warm-up's end, 1 at max_steps and after)
# and the floor m = min_lr_ratio; :func:`lr_factor` adds the warm-up, the one copy of it. The names are those of
# diffusers' ``get_scheduler`` (``SchedulerType``), whose schedules also include a warm-up, except ``constant``,
# which is its ``constant_with_warmup`` (and its ``constant`` with ``warmup_steps: 0``).


def cosine_decay(progress: float, min_ratio: float) -> float:
    """m + (1 - m) * (1 + cos(pi * p)) / 2: half a cosine from 1 to m (SGDR, Loshchilov & Hutter 2017, eq. 5,
    one cycle without restarts; diffusers' ``get_cosine_schedule_with_warmup`` is the case m = 0)."""
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def linear_decay(progress: float, min_ratio: float) -> float:
    """m + (1 - m) * (1 - p): a straight line from 1 to m (diffusers' ``get_linear_schedule_with_warmup``, whose
    ``f_min`` is m; 0 by default)."""
    return min_ratio + (1 - min_ratio) * (1 - progress)


def constant(progress: float, min_ratio: float) -> float:
    """1: the peak LR to the end, m unused (diffusers' ``get_constant_schedule_with_warmup``; LDM's schedule)."""
    return 1.0


#: The choices of ``lr_schedule`` (stage_configs.py declares them as its Literal), by name.
LR_SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "cosine": cosine_decay, "linear": linear_decay, "constant": constant,
}


def lr_factor(schedule: str, step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The LR multiplier of optimizer step `step` (0-based): (step + 1) / warmup while step < warmup, then
    ``LR_SCHEDULES[schedule](p, min_ratio)`` with p = min(1, (step - warmup) / max(1, total - warmup)).

    The warm-up runs one step ahead of diffusers' step / warmup, so that the first step does not run at LR 0;
    from step `warmup` on the two agree (tests/test_lr_schedule.py).
    """
    decay = _decay(schedule)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return decay(progress, min_ratio)


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """``lr_factor`` as a ``LambdaLR`` function of the step. A lambda, not a callable object: LambdaLR would
    save an object's attributes into every checkpoint."""
    _decay(schedule)  # an unknown name fails here, when the optimizer is built, not at the first step
    return lambda step: lr_factor(schedule, step, warmup, total, min_ratio)


def _decay(schedule: str) -> Callable[[float, float], float]:
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule: expected one of {', '.join(map(repr, LR_SCHEDULES))}, got {schedule!r}")
    return LR_SCHEDULES[schedule]
