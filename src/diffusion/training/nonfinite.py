"""Stopping a training stage at a non-finite loss, without reading the loss back on every step.

Shared by train_vae and train (``pipeline/<stage>.py`` adds the callback); ``cli.py`` turns the error into
exit 1 with the message, which names the step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step. Checkpoints stay as they were."""


class NonFiniteLossCheck(Callback):
    """Stop training with :class:`NonFiniteLossError` when the loss is not finite.

    Trade-off: ``loss.item()`` every step would force a host-device sync per step. Instead the first bad
    step is recorded *on the device* (``torch.where``, no sync) and read back every `check_every` steps,
    before every checkpoint save (so a checkpoint never holds the weights of a diverged run, and the last
    good ``last.ckpt`` stays), and at the end of training. A divergence is therefore reported up to
    `check_every` steps late, but it names the step where it happened.

    Reads the loss from the training step's output (``{"loss": tensor}`` or a tensor), automatic or manual
    optimization alike.
    """

    def __init__(self, check_every: int = 1) -> None:
        if check_every < 1:
            raise ValueError(f"check_every: expected >= 1, got {check_every}")
        self.check_every = check_every
        self._bad_step: torch.Tensor | None = None  # () long; -1 while every loss was finite
        self._bad_value: torch.Tensor | None = None  # () float; the first non-finite loss
        self._step_before = 0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach().float()
        if self._bad_step is None:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_value = torch.zeros((), device=loss.device)
        first = (self._bad_step < 0) & ~torch.isfinite(loss).all()
        # The 1-based number of the optimizer step this batch belongs to (under gradient accumulation the batches
        # before the group's last end with global_step still at the step before).
        self._bad_step = torch.where(first, self._step_before + 1, self._bad_step)
        self._bad_value = torch.where(first, loss.reshape(-1)[0], self._bad_value)
        if trainer.global_step % self.check_every == 0:
            self.check(trainer)

    def check(self, trainer: pl.Trainer | None = None) -> None:
        """Raise if a non-finite loss was recorded (one host sync)."""
        if self._bad_step is None:
            return
        step = int(self._bad_step)
        where = f"({float(self._bad_value)})"
        if trainer is not None and trainer.world_size > 1:
            # Every rank checks at the same steps. Stop them all together: a rank that raised alone would leave
            # the others blocked in the next gradient all-reduce ("Connection closed" on gloo, a hang on NCCL).
            first = int(trainer.strategy.reduce(self._bad_step.clone(), reduce_op="max"))
            if first >= 0 and step < 0:
                step, where = first, "on another rank"
        if step >= 0:
            now = f" (detected at step {trainer.global_step})" if trainer is not None else ""
            raise NonFiniteLossError(
                f"non-finite training loss {where} at step {step}{now}; training stopped, "
                "the last checkpoint is from before it. Lower the learning rate, enable gradient clipping, "
                "or use bf16 rather than fp16"
            )

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Raising here aborts the save (this hook runs while the checkpoint is assembled, before writing).
        self.check(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)
