"""The train stage's held-out loss: the training objective on a fixed set of val latents, with the EMA weights.

The training loss (``training/step_means.py``) is measured on the batches being trained on, each sample at a random
timestep: it cannot show overfitting, and its scatter hides small differences between runs. Every
`val_every_n_steps` optimizer steps, and after the last, :class:`ValLoss` reports

    val/loss            the mean over n held-out samples of w(t_i) || f_ema(z_i noised to t_i, t_i, c_i) - target_i ||^2
    val/seen_loss       the same over n train samples, with the same t_i and eps_i: val/loss - val/seen_loss is
                        the generalisation gap at equal conditions (as evaluate's adherence_seen and
                        adherence_heldout compare attribute combinations trained on and held out)
    val/loss_tA_B       val/loss over the samples whose t_i lies in one quarter of [0, T): t000_249, t250_499,
                        t500_749, t750_999 for T = 1000, where in the noise range the model improves or overfits

with the objective of the training step (``DiffusionSystem.weighted_loss``: the prediction type, Min-SNR weight
and float32 loss of training) and the set prepared once, in memory, by :func:`prepare_val_set`:

- n = ``val_batches * batch_size`` held-out latents, a seeded uniform choice of the val split (reservoir sampling,
  Vitter 1985, Algorithm R: a latent folder's shards are in key order, class order for class folders), or all of
  them if the split is smaller; and as many train latents for the seen loss, chosen the same way.
- z_0 ~ q(z|x) drawn once from the cached posterior and scaled as the loader does (``data.latents.sample_latents``);
  the full captions' tokens (no caption dropout: the conditional loss), padding trimmed per batch as the loader does.
- Stratified timesteps: t_i = floor((i + 1/2) T / n), i < n, assigned to the samples by a seeded permutation. The
  loss spans orders of magnitude over t, so with t drawn at random most of the estimate's variance is which t's
  were drawn; one t per stratum removes it (the low-discrepancy timesteps of Kingma et al. 2021, "Variational
  Diffusion Models", appendix on variance reduction, fixed here rather than redrawn).
- eps ~ N(0, I), drawn once.

Everything comes from one ``torch.Generator`` seeded with the stage's seed (posterior draws of the held-out, then the
seen latents, the permutation, the noise), never the global generator; it depends on the seed, the data, val_batches
and batch_size only, not on val_every_n_steps. So every validation sees the same (z_0, tokens, t, eps), and the curve
moves only because the weights do.

Weights: the EMA's, the ones the stage exports and samples with, read from Lightning's `EMAWeightAveraging` as the
sample grids read them (``callbacks.ema_model``). Lightning's validation loop would see them too (its
`WeightAveraging` swaps the average into the module from ``on_validation_epoch_start`` to ``_end``), but the stage does
not use that loop: this callback runs at the optimizer step's end, before the checkpoint of that step is written
(Lightning orders checkpoint callbacks last), so the checkpoint holds the figures of its own step and a resumed run
logs and writes what an uninterrupted one does. Lightning's loop runs after the checkpoint and, resuming from a
checkpoint at a validation step, skips that validation; the default cadences (both 250) put every checkpoint there.
Nor does validation swap weights or create a loader iterator (which draws its seed from the global generator): it
reads the average, forward only, under ``torch.no_grad`` with the networks in eval mode, and draws nothing, so the
trained weights are the same to the bit with or without it (tests/test_val_loss.py).

Precision: the forward runs in the Trainer's precision context (autocast under bf16-mixed), as the training step's
does, and the loss in float32; eagerly also when ``train.compile`` (a no-grad forward of other batch sizes would
only make the compiled denoiser recompile, for the same figures up to rounding).

DDP: every rank evaluates the whole (small) set with its copy of the EMA weights, which is the same on every rank:
no collective, so no rank can wait for another, and rank 0 (whose loggers write) has every figure.
"""

from __future__ import annotations

import csv
import io
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from tokenizers import Tokenizer

from diffusion.data.latents import decode_latent_sample, sample_latents
from diffusion.data.shard_reading import expand_urls, tar_samples
from diffusion.data.tokenizer import encode, trim_padding


@dataclass(frozen=True)
class ValSet:
    """The fixed validation samples, CPU tensors. n held-out samples, k <= n seen (train) ones.

    Attributes:
        latents: (n, C, h, w) scaled held-out latents z_0; tokens: (n, L) their captions' ids, padded.
        seen_latents: (k, C, h, w) train latents; seen_tokens: (k, L').
        t: (n,) long stratified timesteps; noise: (n, C, h, w) eps. The seen samples use their first k.
        batch_size: samples per forward pass (the training batch size).
        num_timesteps: T, for the quarters of the noise range.
    """

    latents: torch.Tensor
    tokens: torch.Tensor
    seen_latents: torch.Tensor
    seen_tokens: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    batch_size: int
    num_timesteps: int

    def __len__(self) -> int:
        return len(self.latents)


def stratified_timesteps(n: int, num_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) long: t_i = floor((i + 1/2) T / n), one per stratum of [0, T), in an order drawn from `generator` (so
    which sample gets which t does not follow the shards' order, e.g. their classes)."""
    i = torch.arange(n, dtype=torch.float64)
    t = ((i + 0.5) * num_timesteps / n).floor().long()  # (n,) sorted, in [0, T)
    return t[torch.randperm(n, generator=generator)]


def quarters(num_timesteps: int) -> list[tuple[str, int, int]]:
    """``(name, first, last)`` of the four quarters of [0, T): ("loss_t000_249", 0, 249) ... for T = 1000."""
    edges = [round(q * num_timesteps / 4) for q in range(5)]
    width = len(str(num_timesteps - 1))
    return [(f"loss_t{lo:0{width}d}_{hi - 1:0{width}d}", lo, hi - 1) for lo, hi in itertools.pairwise(edges) if hi > lo]


def choose_latents(urls: Sequence[str] | str, limit: int, seed: int, salt: str) -> list[dict[str, Any]]:
    """A seeded, uniform choice of at most `limit` samples of the latent shards `urls` (all if fewer), in shard order,
    read in one pass holding at most `limit` (reservoir sampling, Vitter 1985, Algorithm R: the i-th sample takes a
    random slot with probability limit / i). Decoded as ``data.latents.decode_latent_sample``; only the chosen are."""
    rng = random.Random(f"{seed}/{salt}")
    kept: list[tuple[int, dict[str, Any]]] = []  # (position in the split, raw sample)
    for i, sample in enumerate(tar_samples({"url": u} for u in expand_urls(urls))):
        if i < limit:
            kept.append((i, sample))
        elif (slot := rng.randrange(i + 1)) < limit:
            kept[slot] = (i, sample)
    return [decode_latent_sample(sample) for _, sample in sorted(kept, key=lambda p: p[0])]


def _posterior_draws(samples: list[dict[str, Any]], scale: Any, shift: Any, generator: torch.Generator) -> torch.Tensor:
    """(N, C, h, w) scaled latents drawn from the samples' posteriors, as the training loader draws them."""
    mean = torch.stack([s["mean"] for s in samples]).float()  # (N, C, h, w)
    logvar = torch.stack([s["logvar"] for s in samples]).float()
    return sample_latents(mean, logvar, scale, shift, generator)


def prepare_val_set(val_urls: Sequence[str], train_urls: Sequence[str], tokenizer: Tokenizer, *, batch_size: int,
                    batches: int, latent_scale: Any, latent_shift: Any, num_timesteps: int, seed: int) -> ValSet:
    """The validation set (module docstring): `batches` * `batch_size` held-out latents or as many as the val split
    has, as many train latents (or as many as the train split has), their tokens, stratified timesteps and noise.
    The caller checks that it is large enough (``len``)."""
    held_out = choose_latents(val_urls, batch_size * batches, seed, "val_loss/val")
    if not held_out:
        raise ValueError("prepare_val_set: the val split holds no latents")
    seen = choose_latents(train_urls, len(held_out), seed, "val_loss/seen")
    generator = torch.Generator().manual_seed(seed)
    latents = _posterior_draws(held_out, latent_scale, latent_shift, generator)
    seen_latents = _posterior_draws(seen, latent_scale, latent_shift, generator)
    t = stratified_timesteps(len(held_out), num_timesteps, generator)
    noise = torch.randn(latents.shape, generator=generator)  # (n, C, h, w)
    return ValSet(latents, encode(tokenizer, [s["caption"] for s in held_out]), seen_latents,
                  encode(tokenizer, [s["caption"] for s in seen]), t, noise, batch_size, num_timesteps)


@torch.no_grad()
def _losses(system: Any, model: torch.nn.Module, latents: torch.Tensor, tokens: torch.Tensor, t: torch.Tensor,
            noise: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """(N,) per-sample objective on `device`, a batch at a time, padding trimmed per batch as the loader does."""
    out = []
    for start in range(0, len(latents), batch_size):
        part = slice(start, start + batch_size)
        out.append(system.weighted_loss(latents[part].to(device), trim_padding(tokens[part]).to(device),
                                        t[part].to(device), noise[part].to(device), model=model))
    return torch.cat(out)


def evaluate(system: Any, model: torch.nn.Module, val_set: ValSet, context: Any = None) -> dict[str, float]:
    """The figures of one validation (module docstring), names without the ``val/`` prefix.

    Args:
        system: the `DiffusionSystem` whose ``weighted_loss`` is the objective.
        model: the `LatentDiffusionModel` evaluated (the EMA copy), put in eval mode meanwhile.
        val_set: from :func:`prepare_val_set`.
        context: a callable giving the precision context (``trainer.precision_plugin.forward_context``).
    """
    device = next(model.parameters()).device
    k, was_training = len(val_set.seen_latents), model.training
    model.eval()
    try:
        with context() if context is not None else torch.autocast(device.type, enabled=False):
            held = _losses(system, model, val_set.latents, val_set.tokens, val_set.t, val_set.noise,
                           val_set.batch_size, device)
            seen = _losses(system, model, val_set.seen_latents, val_set.seen_tokens, val_set.t[:k],
                           val_set.noise[:k], val_set.batch_size, device)
    finally:
        model.train(was_training)
    both = torch.cat([held, seen]).double().cpu()  # one read-back from the device
    held, seen = both[:len(held)], both[len(held):]
    means = {"loss": held.mean(), "seen_loss": seen.mean()}
    for name, lo, hi in quarters(val_set.num_timesteps):
        inside = (val_set.t >= lo) & (val_set.t <= hi)
        if inside.any():  # with fewer than 4 samples a quarter may have none
            means[name] = held[inside].mean()
    return dict(zip(means, torch.stack(list(means.values())).tolist()))


class ValLoss(Callback):
    """Validate every `every_n_steps` optimizer steps and after the last (module docstring): log ``val/<name>`` to the
    Trainer's loggers at that step and keep the figures, in the checkpoint too, for the curve and the final metrics.

    Put it after the EMA callback among the Trainer's callbacks: it reads the average that callback updated at the
    same step.

    Args:
        val_set: from :func:`prepare_val_set`.
        every_n_steps: optimizer steps between validations (``val_every_n_steps``).

    Attributes:
        points: ``(step, figures)`` of every validation so far, a resumed run's included.
    """

    def __init__(self, val_set: ValSet, every_n_steps: int) -> None:
        self.val_set, self.every = val_set, every_n_steps
        self.points: list[tuple[int, dict[str, float]]] = []
        # How many held-out latents the last point measured (None: unknown, a checkpoint from before this was kept).
        # A finished run resumed with another val_batches trains no step: its last point is another set's.
        self.last_samples: int | None = None
        self._step_before = 0

    @property
    def last(self) -> dict[str, float]:
        """The last validation's figures ({} before one)."""
        return dict(self.points[-1][1]) if self.points else {}

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        # Only a batch that made an optimizer step (under gradient accumulation the others end on the step before).
        final = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        if step != self._step_before and (step % self.every == 0 or final):
            self.validate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training that stopped before max_steps (a requested stop): validate its last step too.
        if trainer.global_step and (not self.points or self.points[-1][0] != trainer.global_step):
            self.validate(trainer, pl_module)

    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        from diffusion.training.callbacks import ema_model

        figures = evaluate(pl_module, ema_model(trainer, pl_module), self.val_set,
                           trainer.precision_plugin.forward_context)
        self.points.append((trainer.global_step, figures))
        self.last_samples = len(self.val_set)
        # To the loggers here, as StepMeans does: before this step's checkpoint (see the module docstring).
        for logger in trainer.loggers:  # Lightning's loggers write on global rank 0 only
            logger.log_metrics({f"val/{k}": v for k, v in figures.items()}, step=trainer.global_step)
        return figures

    def curve_csv(self) -> str:
        """The curve as CSV: ``step`` and a column per figure (``loss, seen_loss, loss_t...``), a row per validation."""
        names = list(dict.fromkeys(name for _, figures in self.points for name in figures))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["step", *names])
        writer.writerows([step, *(f"{figures[n]:.6f}" if n in figures else "" for n in names)]
                         for step, figures in self.points)
        return buf.getvalue()

    def write(self, path: str | Path) -> Path:
        """The curve (:meth:`curve_csv`) to `path`, replaced atomically."""
        from diffusion.atomic import atomic_write_text

        return atomic_write_text(path, self.curve_csv())

    def state_dict(self) -> dict[str, Any]:
        return {"points": [(step, dict(figures)) for step, figures in self.points], "samples": self.last_samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = [(int(step), dict(figures)) for step, figures in state_dict.get("points", [])]
        self.last_samples = state_dict.get("samples")
