"""The Lightning "system" that trains the KL autoencoder: losses and optimizers only (STYLE 11).

Objective (Rombach et al. 2022, sec. 3.1 and app. G; LDM's ``LPIPSWithDiscriminator`` without the
perceptual term and the learned output log-variance):

    L = l1_weight * |x - x'| + mse_weight * (x - x')^2          (means over pixels)
        + kl_weight * KL(q(z|x) || N(0, I)) / (3 * H * W)        (KL summed over latent dims, mean over batch)
        + lambda * disc_weight * L_G                             (after discriminator.start_step, if enabled)

LDM sums its reconstruction loss over pixels and adds ``kl_weight * KL``; dividing *both* terms by the
number of pixel values gives a loss whose scale does not depend on the resolution while keeping LDM's
balance, so their ``kl_weight = 1e-6`` means the same here. The KL only has to keep the latent space from
drifting far; a larger weight blurs reconstructions.

The adversarial term (VQGAN, Esser et al. 2021, sec. 3.1) uses a PatchGAN discriminator with the hinge
loss, switched on after `start_step` (the autoencoder first learns to reconstruct at all), and the
adaptive weight lambda of VQGAN's eq. 7. Two optimizers stepping alternately need Lightning's manual
optimization, which forbids gradient accumulation and clipping flags (pitfall 13).
"""

from __future__ import annotations

import warnings

from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from diffusion.models.vae import AutoencoderKL, DiagonalGaussian
from diffusion.training.discriminator import D_LOSSES, NLayerDiscriminator, adaptive_weight, generator_loss
from diffusion.training.optim import FusedAdamWClipping, adamw, lr_lambda

if TYPE_CHECKING:
    from diffusion.stage_configs import TrainVAEConfig


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Images from [-1, 1] to [0, 1] (clamped) in float32, the range PSNR and SSIM are computed in."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def schedule(cfg: TrainVAEConfig):
    """The LambdaLR factor of `cfg`: linear warm-up over ``warmup_steps``, then ``lr_schedule`` down to
    ``lr * min_lr_ratio`` at ``max_steps``; ``min_lr_ratio: null`` is 1.0, no decay (LDM's constant LR)."""
    min_ratio = 1.0 if cfg.min_lr_ratio is None else cfg.min_lr_ratio
    return lr_lambda(cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps, min_ratio)


class VAESystem(FusedAdamWClipping, pl.LightningModule):
    """Trains ``AutoencoderKL(cfg.model)`` (and, if enabled, a PatchGAN discriminator).

    Batches: ``{"image": (B, 3, H, W) float in [-1, 1], ...}`` (diffusion.data.loader).
    """

    def __init__(self, cfg: TrainVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vae = AutoencoderKL(cfg.model)
        d = cfg.discriminator
        self.discriminator = (
            NLayerDiscriminator(cfg.model.in_channels, d.channels, d.num_layers) if d.enabled else None
        )
        # Two optimizers stepping in turn: manual optimization (module docstring).
        self.automatic_optimization = not d.enabled
        self.psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))  # per image, then averaged
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        #: The optimizer step of this process's last validation inside a fit (None before one).
        self.validated_at: int | None = None

    # ----------------------------------------------------------------------------------------------
    # Loss
    # ----------------------------------------------------------------------------------------------

    def reconstruction_losses(
        self, x: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussian
    ) -> dict[str, torch.Tensor]:
        """x, recon: (B, 3, H, W). Returns scalar float32 terms: l1, mse, kl (per pixel value), rec, loss.

        Computed in float32 even under autocast (pitfall 10)."""
        x, recon = x.float(), recon.float()
        l1 = (x - recon).abs().mean()
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().float().mean() / x[0].numel()  # (B,) -> mean over batch, per pixel value
        rec = self.cfg.l1_weight * l1 + self.cfg.mse_weight * mse
        return {"l1": l1, "mse": mse, "kl": kl, "rec": rec, "loss": rec + self.cfg.kl_weight * kl}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """The loss to minimise and its terms. Not logged here: a Trainer's StepMeans logs each returned value's
        mean over the logging window and every rank as ``train/<name>`` (training/step_means.py)."""
        if not self.automatic_optimization:
            return self._adversarial_step(batch["image"])
        recon, posterior = self.vae(batch["image"])
        losses = self.reconstruction_losses(batch["image"], recon, posterior)
        return {k: v if k == "loss" else v.detach() for k, v in losses.items()}

    def _adversarial_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One step of each optimizer (manual optimization): the autoencoder, then the discriminator."""
        d_cfg = self.cfg.discriminator
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        active = self.global_step >= d_cfg.start_step
        recon, posterior = self.vae(x)
        losses = self.reconstruction_losses(x, recon, posterior)
        loss = losses["loss"]
        self.toggle_optimizer(opt_g)  # discriminator weights get no gradient from the generator's loss
        if active:
            g_loss = generator_loss(self.discriminator(recon))
            # lambda balances the two terms at the decoder's last layer (VQGAN eq. 7).
            lam = adaptive_weight(losses["rec"], g_loss, self.vae.decoder.conv_out.weight)
            loss = loss + d_cfg.weight * lam * g_loss
            losses.update(g_loss=g_loss.detach(), d_weight=lam, loss=loss)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt_g.step()
        sched_g.step()
        self.untoggle_optimizer(opt_g)
        # Both schedules count every batch, so both reach lr * min_lr_ratio at max_steps (counted from
        # start_step, the discriminator's would end far above it and restart its warm-up there).
        if active:
            losses.update(self._discriminator_step(x, recon.detach(), opt_d))
            sched_d.step()
        else:
            with warnings.catch_warnings():  # opt_d has not stepped yet, which torch would warn about
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                sched_d.step()
        return {k: v.detach() for k, v in losses.items()}

    def _discriminator_step(self, x: torch.Tensor, recon: torch.Tensor, opt_d: Any) -> dict[str, torch.Tensor]:
        self.toggle_optimizer(opt_d)
        logits_real, logits_fake = self.discriminator(x), self.discriminator(recon)
        d_loss = D_LOSSES[self.cfg.discriminator.loss](logits_real.float(), logits_fake.float())
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        # Lightning counts every LightningOptimizer.step() as a global step under manual optimization
        # (pytorch-lightning #17958), which would halve max_steps and shift checkpoints. Stepping the
        # discriminator through the strategy does the same work (precision plugin, AMP scaler) uncounted,
        # so one global step = one batch = one step of each optimizer.
        self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None)
        self.untoggle_optimizer(opt_d)
        return {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().float().mean(),
            "logits_fake": logits_fake.detach().float().mean(),
        }

    # ----------------------------------------------------------------------------------------------
    # Validation
    # ----------------------------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor] | None:
        """Reconstruct from the posterior mean (deterministic); update PSNR/SSIM on [0, 1] images.

        In float32 outside autocast even when training is bf16-mixed: the VAE is used that way downstream
        (encode_latents, decoding samples), and SSIM's Gaussian filtering in bf16 is meaningless (it read
        0.26 for reconstructions that measure 0.87 in float32)."""
        x = batch["image"].float()
        with torch.autocast(self.device.type, enabled=False):
            recon, posterior = self.vae(x, sample_posterior=False)
            losses = self.reconstruction_losses(x, recon, posterior)
            x01, r01 = to_unit(x), to_unit(recon)
            self.psnr.update(r01, x01)
            self.ssim.update(r01, x01)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, on_epoch=True, sync_dist=True,
                      batch_size=x.shape[0])
        self.log("val/psnr", self.psnr, on_epoch=True, prog_bar=True)
        self.log("val/ssim", self.ssim, on_epoch=True)
        return {"image": x01, "recon": r01} if batch_idx == 0 else None

    def on_validation_epoch_end(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.validated_at = self.global_step

    # ----------------------------------------------------------------------------------------------
    # Optimizers and checkpoints
    # ----------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        betas = (cfg.beta1, cfg.beta2)  # LDM/VQGAN's (0.5, 0.9): a short memory suits the GAN game
        # Fused (one kernel for every parameter), or foreach under a GradScaler: training/optim.py.
        opt_g = adamw(self, self.vae.parameters(), lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
        sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, schedule(cfg))
        if self.discriminator is None:
            return {"optimizer": opt_g, "lr_scheduler": {"scheduler": sched_g, "interval": "step"}}
        d_lr = cfg.discriminator.lr if cfg.discriminator.lr is not None else cfg.lr
        opt_d = adamw(self, self.discriminator.parameters(), lr=d_lr, betas=betas, weight_decay=cfg.weight_decay)
        sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, schedule(cfg))
        return [opt_g, opt_d], [sched_g, sched_d]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The exact config that built this state travels with it (STYLE 4).
        checkpoint["train_vae_config"] = self.cfg.to_dict()


class ReconstructionGrid(Callback):
    """Log originals beside their reconstructions (first validation batch) to MLflow as a PNG artifact,
    ``reconstructions/step_XXXXXXX.png``, at every validation.

    Args:
        num_images: pairs shown (at most the batch size).
        pairs_per_row: pairs in a row of the grid.
    """

    def __init__(self, num_images: int = 8, pairs_per_row: int = 4) -> None:
        self.num_images, self.pairs_per_row = num_images, pairs_per_row

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or not isinstance(outputs, dict) or not trainer.is_global_zero:
            return
        from diffusion.evaluation.grid import make_grid, pairs
        from diffusion.training.checkpointing import log_image

        n = self.num_images
        grid = make_grid(pairs(outputs["image"][:n], outputs["recon"][:n]), nrow=2 * self.pairs_per_row)
        log_image(trainer, grid, f"reconstructions/step_{trainer.global_step:07d}.png")
