"""The seed's training entry point: train a `LatentDiffusionModel` on a map-style dataset in a few lines.

    import torch

    from diffusion.data import create_dummy_dataset
    from diffusion.models import LatentDiffusionModel
    from diffusion.scheduler import DDPMScheduler
    from diffusion.train import train_diffusion_model

    data = create_dummy_dataset(num_samples=100)
    torch.manual_seed(0)  # the initial weights (train_diffusion_model seeds the training itself)
    model = LatentDiffusionModel(vocab_size=data.tokenizer.get_vocab_size(), denoising_type="unet")
    trainer = train_diffusion_model(model=model, scheduler=DDPMScheduler(num_timesteps=1000), train_dataset=data)

The dataset yields ``(image (3, H, W) in [-1, 1], tokens (T,))`` pairs (`diffusion.data.TextImageDataset`);
images are encoded by the model's (frozen) VAE on the fly. The DVC pipeline's `train` stage uses the same
system on cached latents, with checkpoints, resume and MLflow (pipeline/train.py).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ProgressBar

from diffusion.training.callbacks import EMA
from diffusion.training.diffusion_system import DiffusionSystem, OptimSettings
from diffusion.training.step_means import StepMeans
from diffusion.training.trainer import LossBar


class CaptionDropoutCollate:
    """Batches (image, tokens) pairs and replaces each caption by the null caption with probability `p`,
    at load time (pitfall 2), so the model also learns the unconditional prediction that
    classifier-free guidance subtracts (Ho & Salimans 2022, sec. 3.2)."""

    def __init__(self, null_token_row: torch.Tensor, p: float, seed: int = 0) -> None:
        self.null = null_token_row  # (T,) long
        self.p = p
        self.generator = torch.Generator().manual_seed(seed)
        self._worker_seed: int | None = None

    def _rng(self) -> torch.Generator:
        """The main process's generator (one stream across epochs), or in a loader worker one seeded by that
        worker's seed: each worker gets a copy of this object, generator included, at the start of every epoch,
        so the copy would draw the same drops in every worker and every epoch. The DataLoader draws the workers'
        base seed from its own (seeded) generator each epoch, so this stays reproducible."""
        info = torch.utils.data.get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            self._worker_seed = info.seed
            self.generator = torch.Generator().manual_seed(info.seed)
        return self.generator

    def __call__(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        images = torch.stack([img for img, _ in items])  # (B, 3, H, W)
        tokens = torch.stack([tok for _, tok in items])  # (B, T)
        drop = torch.rand(len(items), generator=self._rng()) < self.p  # (B,)
        tokens[drop] = self.null.to(tokens.dtype)
        return {"image": images, "tokens": tokens}


def train_diffusion_model(
    model: torch.nn.Module,
    scheduler: Any,
    train_dataset: torch.utils.data.Dataset,
    *,
    batch_size: int = 8,
    max_steps: int = 100,
    lr: float = 1e-4,
    warmup_steps: int = 10,
    lr_schedule: str = "cosine",
    caption_dropout: float = 0.1,
    ema_decay: float = 0.999,
    ema_warmup: bool = True,
    min_snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
    precision: str = "32",
    accumulate_grad_batches: int = 1,
    gradient_clip_val: float | None = 1.0,
    num_workers: int = 0,
    seed: int = 0,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """Train `model`'s text encoder and denoiser on `train_dataset`; returns the Lightning trainer.

    When it returns, the model holds the EMA weights (our `EMA`, a Lightning `EMAWeightAveraging`, copies them
    in at the end of training; with `ema_warmup`, update n uses min(ema_decay, (1 + n) / (10 + n)), as
    diffusers' EMAModel). `lr_schedule`: after the warm-up, ``cosine``, ``linear`` or ``constant`` (training/optim.py).
    `noise_offset` and `input_perturbation`: training/diffusion_system.py's module docstring (0: off).
    Extra keyword arguments go to `pl.Trainer` (e.g. ``devices``, ``logger``)."""
    pl.seed_everything(seed, workers=True, verbose=False)
    length = train_dataset[0][1].shape[0]
    collate = CaptionDropoutCollate(model.null_tokens(1, length)[0].cpu(), caption_dropout, seed)
    loader = torch.utils.data.DataLoader(
        train_dataset, batch_size=batch_size, shuffle=True, drop_last=len(train_dataset) >= batch_size,
        num_workers=num_workers, collate_fn=collate, generator=torch.Generator().manual_seed(seed),
    )
    system = DiffusionSystem(
        model, scheduler,
        OptimSettings(lr=lr, warmup_steps=warmup_steps, max_steps=max_steps, lr_schedule=lr_schedule,
                      min_snr_gamma=min_snr_gamma, noise_offset=noise_offset, input_perturbation=input_perturbation),
    )
    trainer_kwargs.setdefault("logger", False)
    trainer_kwargs.setdefault("enable_checkpointing", False)
    # The loss as the stages log it: its mean over each window of log_every_n_steps steps and every rank
    # (training/step_means.py), read back from the device once per window (each read is a wait for a GPU).
    every = trainer_kwargs.setdefault("log_every_n_steps", 10)
    callbacks = [StepMeans(every), EMA(decay=ema_decay, warmup=ema_warmup), *trainer_kwargs.pop("callbacks", [])]
    if trainer_kwargs.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        # The pipeline's bar, with the loss. Lightning's default (its rich bar, where `rich` is installed) shows
        # no loss (it is not logged to the bar: an .item() per step) and counts epochs out of -2 (max_epochs -1).
        callbacks.append(LossBar(refresh_rate=every))
    trainer = pl.Trainer(max_steps=max_steps, precision=precision, accumulate_grad_batches=accumulate_grad_batches,
                         gradient_clip_val=gradient_clip_val, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(system, loader)
    system.restore_frozen_vae(model)
    return trainer
