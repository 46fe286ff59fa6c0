"""Callbacks of the diffusion training stage: the EMA of the weights and sample grids from it. (The loss curve
is ``diffusion.training.step_means``, which both training stages' Trainers carry.)

The grids run on rank 0 only and touch the host only every N steps, so the training step itself never waits for
them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, EMAWeightAveraging

from diffusion.evaluation.grid import make_grid
from diffusion.scheduler import DDPMScheduler
from diffusion.training.checkpointing import log_image


class EMA(EMAWeightAveraging):
    """Lightning's `EMAWeightAveraging` (ema = decay * ema + (1 - decay) * weights after every optimizer
    step, kept in and restored from the checkpoint), updated by one foreach kernel per device and dtype, with
    diffusers' warm-up of the decay.

    `EMAWeightAveraging` hands its `AveragedModel` a per-tensor ``avg_fn``: a Python loop issuing three
    kernels for each of the system's ~300 tensors every step (12 ms a step on 2 CPU cores for the default
    DiT, text encoder and VAE, 6% of the step; ~900 kernel launches on a GPU). ``multi_avg_fn`` here is
    torch's ``_foreach_lerp_`` of the same average, 5 ms there. Same state, checkpoint format and hooks.

    Warm-up (``warmup=True``): the n-th update after the first (which copies the weights) uses
    ``min(decay, (1 + n) / (10 + n))``, as diffusers' ``EMAModel.get_decay`` does by default. With a fixed
    0.999 the average after 200 steps is still 82% the weights of step 1; warmed up, it follows the early,
    fast-changing weights and reaches the full decay only after (10 decay - 1) / (1 - decay) updates. The
    decay is a Python number computed from ``trainer.global_step`` (restored on resume), so the update reads
    nothing back from the device.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, **kwargs: Any) -> None:
        super().__init__(decay=decay, **kwargs)
        self.max_decay, self.warmup = decay, warmup
        now = self._decay_now = [decay]  # the decay of the coming update, read by the closure below

        @torch.no_grad()
        def lerp(ema: list[torch.Tensor], current: list[torch.Tensor], _: Any) -> None:
            # One call per device and dtype (AveragedModel groups them); lerp takes floating tensors only, so an
            # integer buffer is averaged and cast back as torch's own get_ema_multi_avg_fn does.
            if ema[0].is_floating_point() or ema[0].is_complex():
                torch._foreach_lerp_(ema, current, 1.0 - now[0])  # ema += (1 - decay) (current - ema)
            else:
                for e, c in zip(ema, current, strict=True):
                    e.copy_(e * now[0] + c * (1.0 - now[0]))

        # AveragedModel accepts one of the two; setup() passes these kwargs to it. A closure, not a bound method:
        # the AveragedModel holding it stays free of a reference to the callback.
        del self._kwargs["avg_fn"]
        self._kwargs["multi_avg_fn"] = lerp

    def decay_at(self, global_step: int) -> float:
        """The decay of the update after optimizer step `global_step` (1-based; the update after step 1 copies)."""
        n = global_step - 1
        return min(self.max_decay, (1 + n) / (10 + n)) if self.warmup else self.max_decay

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._decay_now[0] = self.decay_at(trainer.global_step)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning runs callbacks' setup before the strategy moves the module to its device, so the average's
        # default device, pl_module.device, is still the CPU on a GPU run: every step would then copy all
        # weights to the host (a sync) and average them there. Keep it where training will run.
        if self._device is None:
            self._device = trainer.strategy.root_device
        super().setup(trainer, pl_module, stage)


def ema_model(trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.nn.Module:
    """The `LatentDiffusionModel` holding the EMA weights, or the live one if there is no EMA callback.

    Lightning's `EMAWeightAveraging` keeps its average in an `AveragedModel` wrapping a copy of the whole
    LightningModule (``_average_model.module``); it has no public accessor, so we read the attribute rather
    than swap weights in and out of the live model.
    """
    for cb in trainer.callbacks:
        if isinstance(cb, EMAWeightAveraging) and getattr(cb, "_average_model", None) is not None:
            return cb._average_model.module.model
    return pl_module.model


class SampleGrid(Callback):
    """Every `every_n_steps` optimizer steps, sample `prompts` with the EMA weights and a fast sampler, and
    log one grid (a row per seed, a column per prompt) to MLflow as ``samples/step_XXXXXXX.png``.

    Args:
        tokens: (P, T) the tokenized fixed prompts.
        scheduler: the training noise schedule.
        image_size: side of the generated images (pixels).
        every_n_steps: how often; 0 disables.
        sampler, num_steps, guidance: how to sample (a few DPM-Solver++ steps keep this cheap).
        seeds: one row of images per seed.
        final_step: a step whose grid the caller draws itself once training ends, from the weights it exports
            (the train stage's ``samples/final.png``, which every run has: runs compare by it). Not drawn here
            too, where it would be the same images a second time (None: every N-th step is drawn).
    """

    def __init__(
        self, tokens: torch.Tensor, scheduler: DDPMScheduler, image_size: int, every_n_steps: int,
        sampler: str = "dpmpp", num_steps: int = 10, guidance: float = 4.0, seeds: Sequence[int] = (0, 1),
        final_step: int | None = None,
    ) -> None:
        self.tokens, self.scheduler, self.image_size = tokens, scheduler, image_size
        self.every, self.sampler, self.num_steps, self.guidance = every_n_steps, sampler, num_steps, guidance
        self.seeds, self.final_step = tuple(seeds), final_step

    @torch.no_grad()
    def render(self, model: torch.nn.Module) -> Any:
        """Sample every prompt once per seed; returns the grid as a PIL image."""
        device = next(model.parameters()).device
        rows = []
        for seed in self.seeds:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            rows.append(model.generate(
                text_tokens=self.tokens.to(device), scheduler=self.scheduler.to(device),
                num_inference_steps=self.num_steps, guidance_scale=self.guidance,
                image_size=(self.image_size, self.image_size), sampler=self.sampler, generator=generator,
            ))
        return make_grid(torch.cat(rows), nrow=len(self.tokens))  # (seeds * P, 3, H, W)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        # Only a batch that made an optimizer step: under gradient accumulation the others end on the step
        # before (the first ones on step 0, which drew a grid of the untrained model).
        if not self.every or step % self.every or not trainer.is_global_zero or step == self._step_before:
            return
        if step == self.final_step:  # the caller draws this step's grid (final_step)
            return
        log_image(trainer, self.render(ema_model(trainer, pl_module)), f"samples/step_{step:07d}.png")
