"""The LightningModule "system" that trains a denoiser and its text encoder (STYLE.md 11).

It owns the loss and the optimizer and nothing else: the networks are plain modules held by a
`LatentDiffusionModel`, the noise schedule is a `DDPMScheduler`, and sampling lives in `samplers.py`.

One training step (Ho et al. 2020, Algorithm 1, in latent space as in Rombach et al. 2022):

    z_0 ~ data (cached VAE latents, or images encoded by the frozen VAE on the fly)
    t ~ U{0, ..., T-1},  eps ~ N(0, I)
    z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps                     (eq. 4)
    loss = w(t) * || f_theta(z_t, t, text) - target(z_0, eps, t) ||^2

where the target is eps, v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0 (Salimans & Ho 2022) or z_0,
following the scheduler's `prediction_type`, and w(t) is 1 or the Min-SNR-gamma weight (Hang et al.
2023, eq. 10), whose form depends on the prediction type (pitfall 9):

    epsilon: min(SNR, gamma) / SNR      v_prediction: min(SNR, gamma) / (SNR + 1)      sample: min(SNR, gamma)

Every one of these is the same weighting of the z_0 error, min(SNR, gamma): the eps error is sqrt(SNR)
times the z_0 error and the v error sqrt(SNR + 1) times. `min_snr_on="snr_plus_one"` caps SNR + 1 instead,
min(SNR + 1, gamma), i.e. v-prediction's own unweighted loss with its low-noise end capped. The two differ
at high noise, where the layout is decided: min(SNR, gamma) goes to 0 there, min(SNR + 1, gamma) stays 1.
On the built-in shapes the plain weight left "top left" unlearned after 90k samples (position at chance),
while v-prediction with the capped SNR + 1 had it right every time by 83k (README, What to expect).

Two perturbations of the noise, both off by default and both as diffusers' `train_text_to_image.py` has them:

- noise offset (``noise_offset`` delta; Guttenberg 2023, "Diffusion with Offset Noise"): eps + delta * n with
  n ~ N(0, I) of shape (B, C, 1, 1), one constant per sample and channel. eps ~ N(0, I) has next to no energy in
  a latent's mean, so a model trained on it never learns to move a whole image's brightness or colour, and
  samples stay near the data's average tone. The offset noise is the noise the model is trained on: it enters
  z_t and the target alike.
- input perturbation (``input_perturbation`` gamma; Ning et al. 2023, "Input Perturbation Reduces Exposure
  Bias in Diffusion Models", Algorithm 1): z_t is made from eps + gamma * xi, xi ~ N(0, I), while the target keeps
  eps. At sampling time the network sees its own slightly wrong z_t, not the exact forward-process one; the
  perturbation trains it on inputs off the forward process in the same way. The paper and diffusers use 0.1.

Each draws its extra noise after t and eps, and only when it is on: with both at 0 the step draws what it
always drew, so the default run is unchanged. The validation loss (training/val_loss.py) measures the plain
objective either way, so runs with and without them compare on the same figure.

Caption dropout (so classifier-free guidance has an unconditional model to subtract) happens in the
loader, at load time (pitfall 2); the system sees already-dropped captions.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from diffusion.scheduler import DDPMScheduler
from diffusion.training.optim import FusedAdamWClipping, adamw, lr_lambda


@dataclass(frozen=True)
class OptimSettings:
    """What the system needs from the train config: the optimizer, the schedule, the loss weighting and the
    noise perturbations (module docstring)."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    max_steps: int = 1000
    lr_schedule: str = "cosine"  # after the warm-up: a key of training.optim.LR_SCHEDULES
    min_lr_ratio: float = 0.1
    min_snr_gamma: float | None = None
    min_snr_on: str = "snr"
    noise_offset: float = 0.0  # module docstring: delta of eps + delta * n, n constant per sample and channel
    input_perturbation: float = 0.0  # gamma of z_t made from eps + gamma * xi, the target still eps


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str, on: str = "snr") -> torch.Tensor:
    """Min-SNR-gamma loss weight per sample (Hang et al. 2023, eq. 10), for each prediction type.

    The paper states the weight for x0-prediction, min(SNR, gamma); predicting eps scales the x0 error by
    SNR, and predicting v by SNR + 1, so those weights are divided accordingly. ``on="snr_plus_one"`` caps
    SNR + 1 instead (module docstring): an x0 weight of min(SNR + 1, gamma).
    """
    if on not in ("snr", "snr_plus_one"):
        raise ValueError(f"min_snr_on: expected snr or snr_plus_one, got {on!r}")
    if on == "snr_plus_one" and prediction_type == "epsilon":
        # min(SNR + 1, gamma) / SNR has no upper bound as SNR -> 0: weights of 2.5e4 at t = 999 (linear betas).
        raise ValueError("min_snr_on: 'snr_plus_one' needs prediction_type 'v_prediction' or 'sample'; with "
                         "'epsilon' its weight min(SNR + 1, gamma) / SNR grows without bound at high noise")
    clipped = (snr + 1 if on == "snr_plus_one" else snr).clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


class DiffusionSystem(FusedAdamWClipping, pl.LightningModule):
    """Trains `model.text_encoder` and `model.denoiser` of a `LatentDiffusionModel`; the VAE stays frozen.

    Args:
        model: a `LatentDiffusionModel` (text encoder, VAE, denoiser, latent scale and shift).
        scheduler: the noise schedule and prediction type.
        optim: optimizer, LR schedule and loss-weighting settings.
        compile_denoiser: run the training forward's denoiser through ``torch.compile`` (TrainConfig.compile).
            The first step then compiles (about a minute for DiT-B/2); on an H200 the steps after it were
            1.4-1.6x faster (docs/performance.md). The weights, the state dict and sampling are unchanged.
    """

    def __init__(self, model: torch.nn.Module, scheduler: DDPMScheduler, optim: OptimSettings,
                 compile_denoiser: bool = False) -> None:
        super().__init__()
        if getattr(getattr(model.denoiser, "cfg", None), "learn_sigma", False):
            # DiT trains its variance channels with the VLB term (Nichol & Dhariwal 2021, L_hybrid), which this
            # loss does not have; our samplers do not read them either.
            raise ValueError("learn_sigma: the diffusion loss has no variance term (DiT's L_vlb); build the "
                             "denoiser with learn_sigma false")
        if optim.min_snr_gamma is not None:  # a bad combination fails here, not at the first step
            min_snr_weight(torch.ones(1), optim.min_snr_gamma, scheduler.prediction_type, optim.min_snr_on)
        lr_lambda(optim.lr_schedule, optim.warmup_steps, optim.max_steps, optim.min_lr_ratio)  # an unknown name, here
        self.model = model
        self.scheduler = scheduler
        self.optim = optim
        self.compile_denoiser = compile_denoiser
        # The VAE is a fixed feature map here (it was trained by the train_vae stage): no gradients, and
        # kept in float32 under mixed precision (pitfall 10) by encoding outside autocast.
        self.model.vae.requires_grad_(False)
        # Lightning's EMA averages every parameter of the module, frozen ones included, and float rounding
        # of decay * x + (1 - decay) * x drifts them by a few ulps; keep the VAE's exact weights to put back.
        self._vae_state = {k: v.detach().clone() for k, v in self.model.vae.state_dict().items()}

    def on_fit_start(self) -> None:
        # Again, now that DDP has broadcast rank 0's weights: the copy taken at construction is this process's
        # own, which under DDP differs between ranks wherever the VAE was not loaded from a file.
        self._vae_state = {k: v.detach().clone() for k, v in self.model.vae.state_dict().items()}

    def restore_frozen_vae(self, model: torch.nn.Module) -> torch.nn.Module:
        """Put the VAE's original weights into `model` (the live or the EMA copy); returns it."""
        model.vae.load_state_dict(self._vae_state)
        return model

    def _compiled_denoiser(self) -> torch.nn.Module:
        """A ``torch.compile`` wrapper of the denoiser, made on first use and kept out of the module tree.

        Made lazily, i.e. after Lightning's EMA callback has deep-copied this system in ``setup`` (a copied
        compiled function would still call the original module). Kept in ``__dict__`` rather than as a
        submodule attribute, so the state dict gains no duplicate ``_orig_mod.`` keys. It shares the
        denoiser's parameters, so the optimizer and the EMA see the same weights either way.
        """
        compiled = self.__dict__.get("_compiled")
        if compiled is None:
            compiled = self.__dict__["_compiled"] = torch.compile(self.model.denoiser)
        return compiled

    def setup(self, stage: str) -> None:
        # seed_everything seeds every rank alike, and diffusion_loss draws t and the noise from the global
        # generator: without an offset, all ranks of a DDP run would draw the same timesteps and noise for
        # their different batches. Rank 0 keeps the seed, so a one-device run is unchanged.
        if stage == "fit" and self.global_rank:
            torch.manual_seed(torch.initial_seed() + self.global_rank)

    def latents_of(self, batch: dict) -> torch.Tensor:
        """Scaled latents of a batch: cached (the latent loader already sampled and scaled them) or, for
        image batches (the seed's map-style datasets), encoded now by the frozen VAE."""
        if "latents" in batch:
            return batch["latents"]
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            self.model.vae.eval()
            return self.model.encode_images(batch["image"].float())

    def diffusion_loss(self, latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The weighted denoising loss of one batch (see the module docstring): t ~ U{0, ..., T-1} and eps ~ N(0, I)
        drawn from the global generator (t first, then the noise, then the offset's and the perturbation's noise
        where they are on; ExactResume seeds it), then :meth:`weighted_loss`."""
        b, c = latents.shape[:2]
        t = torch.randint(0, self.scheduler.num_timesteps, (b,), device=latents.device)
        noise = torch.randn_like(latents)
        if self.optim.noise_offset:  # Guttenberg 2023: a constant per sample and channel, in z_t and the target
            noise = noise + self.optim.noise_offset * torch.randn(b, c, 1, 1, device=noise.device, dtype=noise.dtype)
        input_noise = None
        if self.optim.input_perturbation:  # Ning et al. 2023, Algorithm 1: z_t from eps + gamma * xi, the target eps
            input_noise = noise + self.optim.input_perturbation * torch.randn_like(noise)
        return self.weighted_loss(latents, tokens, t, noise, input_noise=input_noise).mean()

    def weighted_loss(self, latents: torch.Tensor, tokens: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                      model: torch.nn.Module | None = None, input_noise: torch.Tensor | None = None) -> torch.Tensor:
        """The training objective per sample at given timesteps and noise: w(t) || f(z_t, t, text) - target ||^2,
        the mean over each sample's latent values (module docstring). The one formula of the training step and the
        train stage's validation (training/val_loss.py), which fixes t and eps so that its estimate moves only with
        the weights.

        Args:
            latents: (B, C, h, w) scaled latents z_0.
            tokens: (B, T) token ids.
            t: (B,) long timesteps; noise: (B, C, h, w), eps.
            model: the `LatentDiffusionModel` to evaluate (validation passes the EMA copy), run eagerly; None: this
                system's own, through the compiled denoiser when ``compile_denoiser``.
            input_noise: (B, C, h, w), the noise z_t is made from when it is not `noise` (input perturbation);
                the target is `noise`'s either way.

        Returns: (B,) float32 losses.
        """
        noisy = self.scheduler.add_noise(latents, noise if input_noise is None else input_noise, t)
        if model is not None:
            pred = model(noisy, t, tokens)
        elif self.compile_denoiser:  # LatentDiffusionModel.forward, with the compiled denoiser
            states, mask, pooled = self.model.encode_text(tokens)
            pred = self._compiled_denoiser()(noisy, t, context=states, context_mask=mask, pooled=pooled)
        else:
            pred = self.model(noisy, t, tokens)
        target = self.scheduler.get_target(latents, noise, t)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if self.optim.min_snr_gamma is not None:
            weight = min_snr_weight(self.scheduler.snr(t), self.optim.min_snr_gamma, self.scheduler.prediction_type,
                                    self.optim.min_snr_on)
            per_sample = per_sample * weight
        return per_sample

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Not logged here: a Trainer's StepMeans logs the loss's mean over each logging window and every rank
        # (training/step_means.py), with no host sync inside the step.
        return self.diffusion_loss(self.latents_of(batch), batch["tokens"])

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        # No weight decay on biases and norm gains (1-d tensors), as in GPT-2/nanoGPT and DiT.
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": self.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # Fused (one kernel for every parameter), or foreach under a GradScaler: training/optim.py.
        opt = adamw(self, groups, lr=self.optim.lr, betas=self.optim.betas)
        o = self.optim
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.lr_schedule, o.warmup_steps, o.max_steps, o.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
