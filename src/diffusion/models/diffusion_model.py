"""The text-to-image latent diffusion model: text encoder + KL autoencoder + a denoiser, and sampling.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"): the
denoiser works on the VAE's latents, scaled to about unit variance, and is conditioned on text states by
cross-attention (sec. 3.3). Sampling uses classifier-free guidance (Ho & Salimans 2022) with the null caption
``""`` as the unconditional input, the same caption that caption dropout feeds in training (pitfall 2).

Denoisers come from a registry, not an ``if/elif`` chain (STYLE.md 3): :mod:`diffusion.models.registry`, which
says how to register one (``register_denoiser``) and resolves the parts' configs so that their widths agree
(``resolve_config``); both are importable from here too, where they were defined before.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffusion import inpainting
from diffusion.config import Config
from diffusion.data.tokenizer import BOS_ID, EOS_ID, trim_padding
from diffusion.guidance import classifier_free_guidance
from diffusion.models.io import load_weights, read_config, save_module
from diffusion.models.layers import reuse_text_keys_values
from diffusion.models.registry import DENOISERS, register_denoiser, resolve_config  # noqa: F401
from diffusion.models.text_encoder import TextEncoder, TextEncoderConfig
from diffusion.models.vae import AutoencoderKL, VAEConfig
from diffusion.samplers import SAMPLERS, ModelFn, StepCallback, run_sampler
from diffusion.timesteps import img2img_timesteps


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Gaussian noise of `shape` (B, ...) drawn on the generator's device (so a CPU seed gives the same x_T
    everywhere), one image at a time: image i gets the generator's i-th draw whatever the batching, so the
    deterministic samplers (ddim, dpmpp, euler, heun), whose only randomness is x_T, give the same images in batches
    of any size. One draw of B images is not B draws of one: torch's CPU generator fills blocks of 16 values, so the
    two agree only where an image's size is a multiple of 16 (for 3x6x6 latents they differ)."""
    g_device = generator.device if generator is not None else device
    draws = [torch.randn(shape[1:], generator=generator, device=g_device) for _ in range(shape[0])]
    return (torch.stack(draws) if draws else torch.empty(shape, device=g_device)).to(device)


def image_side_pair(image_size: Any) -> tuple[int, int]:
    """An image size given as one side or as (H, W), as two ints. Raises TypeError for anything else (a float
    side, a string, a 3-tuple), naming what was given."""
    def side(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if side(image_size):
        return int(image_size), int(image_size)
    if isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(map(side, image_size)):
        return int(image_size[0]), int(image_size[1])
    raise TypeError(f"image_size: expected an int side or a pair (H, W) of ints, got {image_size!r}")


class LatentDiffusionModel(nn.Module):
    """Text encoder, VAE and denoiser, with consistent widths, and text-to-image sampling.

    Args:
        vocab_size: tokenizer vocabulary size (sets ``text_encoder.vocab_size``).
        denoising_type: a key of :data:`DENOISERS` ("unet", "dit", or one registered).
        text_encoder, vae, denoiser: configs or mappings of their fields (None: defaults). The denoiser's
            ``in_channels`` (and ``out_channels``) are set to the VAE's ``latent_dim`` and its ``context_dim``
            to the text encoder's ``width``; a config that says otherwise is refused.
        latent_scale, latent_shift: the diffusion space is ``(z - shift) * scale``, measured on the VAE's
            latents over the data (pitfall 4), not SD's 0.18215.
    """

    def __init__(
        self,
        vocab_size: int,
        denoising_type: str = "unet",
        text_encoder: TextEncoderConfig | Mapping[str, Any] | None = None,
        vae: VAEConfig | Mapping[str, Any] | None = None,
        denoiser: Config | Mapping[str, Any] | None = None,
        latent_scale: float = 1.0,
        latent_shift: float = 0.0,
    ) -> None:
        super().__init__()
        if denoising_type not in DENOISERS:
            raise ValueError(f"unknown denoising_type {denoising_type!r}; expected one of: {', '.join(DENOISERS)}")
        if not latent_scale > 0:
            raise ValueError(f"latent_scale: expected a value > 0, got {latent_scale!r}")
        text_cfg = resolve_config(
            TextEncoderConfig, text_encoder, {"vocab_size": (vocab_size, "the tokenizer's vocabulary")}, "text_encoder"
        )
        vae_cfg = resolve_config(VAEConfig, vae, {}, "vae")
        config_cls, module_cls = DENOISERS[denoising_type]
        forced = {
            "in_channels": (vae_cfg.latent_dim, "vae.latent_dim"),
            "context_dim": (text_cfg.width, "text_encoder.width"),
        }
        if "out_channels" in {f.name for f in dataclasses.fields(config_cls)}:
            forced["out_channels"] = (vae_cfg.latent_dim, "vae.latent_dim")
        den_cfg = resolve_config(config_cls, denoiser, forced, "denoiser")

        self.vocab_size = vocab_size
        self.denoising_type = denoising_type
        self.latent_scale = float(latent_scale)
        self.latent_shift = float(latent_shift)
        self.text_encoder = TextEncoder(text_cfg)
        self.vae = AutoencoderKL(vae_cfg)
        self.denoiser = module_cls(den_cfg)
        self.denoiser_config = den_cfg

    @property
    def config(self) -> dict[str, Any]:
        """The resolved arguments that rebuild this model (plain data, JSON-ready; STYLE.md 4)."""
        return {
            "vocab_size": self.vocab_size,
            "denoising_type": self.denoising_type,
            "text_encoder": self.text_encoder.cfg.to_dict(),
            "vae": self.vae.cfg.to_dict(),
            "denoiser": self.denoiser_config.to_dict(),
            "latent_scale": self.latent_scale,
            "latent_shift": self.latent_shift,
        }

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def latent_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the denoiser's own."""
        cfg = self.denoiser_config
        return self.vae.downsample_factor * getattr(cfg, "downsample_factor", getattr(cfg, "patch_size", 1))

    # ---- conditioning and latents -----------------------------------------------------------------

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens: (B, T) long -> states (B, T, D), mask (B, T) bool (True = real token), pooled (B, D)."""
        mask = tokens != self.text_encoder.cfg.pad_token_id
        states, pooled = self.text_encoder(tokens, mask)
        return states, mask, pooled

    def _trim_padding(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, L): without the trailing columns that are padding in every row (L >= 2: BOS, EOS),
        as the data loaders trim training batches (``data.tokenizer.trim_padding``).

        Exact up to float rounding: padding is masked as a key in the text encoder and in every
        cross-attention, so the real tokens' states, the pooled EOS state and the denoiser's output do not
        depend on it; but each padding column costs a text-encoder token and a cross-attention key at every
        sampling step (a caption of the built-in data is ~12 tokens of 32: the DiT's guided forward of
        evaluate's batch 7% faster trimmed)."""
        return trim_padding(tokens, self.text_encoder.cfg.pad_token_id)

    def null_tokens(self, batch: int, length: int) -> torch.Tensor:
        """(batch, length) long: the tokenization of "" (``[BOS, EOS, PAD, ...]``, docs/INTERFACES.md), the
        unconditional input of classifier-free guidance and of caption dropout."""
        tokens = torch.full((batch, length), self.text_encoder.cfg.pad_token_id, dtype=torch.long, device=self.device)
        tokens[:, 0], tokens[:, 1] = BOS_ID, EOS_ID
        return tokens

    def encode_images(
        self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) diffusion-space latents ``(z - shift) * scale``,
        z sampled from the posterior (``sample=False``: its mean)."""
        posterior = self.vae.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.latent_shift) * self.latent_scale

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) diffusion-space latents -> (B, 3, h*f, w*f) images clamped to [-1, 1]."""
        return self.vae.decode(z / self.latent_scale + self.latent_shift).clamp(-1.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> decode(encode(x).mean), (B, 3, H, W) clamped to [-1, 1].

        Through the same ``decode_latents`` as :meth:`generate`: the best a sample could look if the denoiser
        returned the real image's latent exactly (evaluate's ``judge_vae_*`` ceiling)."""
        return self.decode_latents(self.encode_images(x, sample=False))

    def forward(self, noisy_latents: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The training forward: x_t (B, C, h, w), t (B,), tokens (B, T) -> raw prediction (B, C', h, w)
        of the scheduler's ``prediction_type`` (C' = 2C for a DiT with ``learn_sigma``)."""
        states, mask, pooled = self.encode_text(tokens)
        return self.denoiser(noisy_latents, t, context=states, context_mask=mask, pooled=pooled)

    # ---- sampling ---------------------------------------------------------------------------------

    def _check_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        H, W = image_side_pair(image_size)
        f = self.latent_multiple
        if H % f or W % f or H <= 0 or W <= 0:
            raise ValueError(
                f"image_size {H}x{W} is not a positive multiple of {f} (the VAE's downsampling factor "
                f"{self.vae.downsample_factor} times the denoiser's)"
            )
        return H, W

    def _check_sampling_args(self, tokens: Any, scheduler: Any, steps: Any, guidance: Any) -> None:
        """Arguments of :meth:`generate` that would otherwise fail deep inside torch (or give NaN images),
        checked first with a message naming them. Raises ValueError or TypeError."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
            what = f"a {tokens.dim()}-D {tokens.dtype} tensor" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise TypeError(f"text_tokens: expected a (B, T) integer tensor (diffusion.data.tokenizer.encode), got {what}")
        vocab = self.text_encoder.cfg.vocab_size
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise ValueError(f"text_tokens: ids must be in [0, {vocab}) (this model's vocabulary), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]: tokens of another tokenizer?")
        if not hasattr(scheduler, "num_timesteps"):
            raise TypeError(f"scheduler: expected the DDPMScheduler the model was trained with, got {type(scheduler).__name__}")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"num_inference_steps: expected an integer >= 1, got {steps!r}")
        if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance) \
                or guidance < 0:
            raise ValueError(f"guidance_scale: expected a finite number >= 0, got {guidance!r}")

    @staticmethod
    def _img2img_schedule(
        scheduler: Any, steps: int, init_latents: torch.Tensor | None, strength: Any, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """The timesteps :meth:`generate` runs (all `steps` of the "trailing" schedule for text to image), with
        `init_latents` and `strength` checked against the latent `shape` (B, C, h, w) first. Raises ValueError."""
        if init_latents is None:
            if strength != 1.0:
                raise ValueError(f"strength: {strength!r} needs init_latents (image to image); text to image starts "
                                 "from pure noise, strength 1")
            return img2img_timesteps(scheduler, steps, 1.0)
        if not isinstance(init_latents, torch.Tensor) or tuple(init_latents.shape) != shape \
                or not init_latents.is_floating_point():
            what = f"a {init_latents.dtype} tensor of shape {tuple(init_latents.shape)}" \
                if isinstance(init_latents, torch.Tensor) else type(init_latents).__name__
            raise ValueError(f"init_latents: expected a float tensor of shape {shape} (one latent per caption, "
                             f"encode_images of the image size), got {what}")
        return img2img_timesteps(scheduler, steps, strength)

    def _check_generate_args(
        self, tokens: Any, scheduler: Any, steps: Any, guidance: Any, image_size: Any, sampler: Any,
        init_latents: torch.Tensor | None, strength: Any, mask: torch.Tensor | None,
    ) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor | None]:
        """The arguments of :meth:`generate`, checked before any work (in this order, so the first bad one is
        named): returns the latent shape (B, C, h, w), the timesteps to run, and the `mask` on the model's device,
        (B or 1, 1, h, w) bool (None without one). Raises ValueError or TypeError."""
        H, W = self._check_size(image_size)
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of: {', '.join(SAMPLERS)}")
        self._check_sampling_args(tokens, scheduler, steps, guidance)
        f = self.vae.downsample_factor
        shape = (tokens.shape[0], self.vae.cfg.latent_dim, H // f, W // f)  # (B, C, h, w)
        timesteps = self._img2img_schedule(scheduler, steps, init_latents, strength, shape)
        if mask is not None:
            if init_latents is None:
                raise ValueError("mask: needs init_latents (inpainting keeps the input's latents where the mask is 0)")
            mask = inpainting.check_mask(mask, shape).to(self.device)  # (B or 1, 1, h, w) bool
        return shape, timesteps, mask

    def _start(
        self, shape: tuple[int, ...], generator: torch.Generator | None, scheduler: Any, timesteps: torch.Tensor,
        init_latents: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Where sampling starts, x at timesteps[0]; the input's latents (None for text to image); the noise drawn.

        x_T, or SDEdit's noise: the same draws in the same order, so that at strength 1 with a zero-terminal-SNR
        schedule (alpha-bar_{T-1} = 0, add_noise returns the noise itself) image to image is text to image."""
        eps = _randn(shape, generator, self.device)
        if init_latents is None:
            return eps, None, eps
        # x_t0 ~ q(x_t0 | x_0), Ho et al. 2020 eq. 4 (SDEdit sec. 3)
        x_known = init_latents.to(self.device, eps.dtype)
        t_0 = timesteps[:1].expand(shape[0]).to(self.device)  # (B,)
        return scheduler.add_noise(x_known, eps, t_0), x_known, eps

    def _model_fn(
        self, tokens: torch.Tensor, uncond_tokens: torch.Tensor | None, guidance_scale: float, guidance_rescale: float
    ) -> ModelFn:
        """The ModelFn the samplers call: conditional, or classifier-free guided against the null caption."""
        C = self.vae.cfg.latent_dim

        def net(x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
            # Keep the C predicted channels (a DiT with learn_sigma adds C variance channels no sampler uses).
            return self.denoiser(x, t, **cond)[:, :C]

        if guidance_scale == 1.0:  # guidance 1 is the conditional model: skip the unconditional half
            states, mask, pooled = self.encode_text(self._trim_padding(tokens))
            return lambda x, t: net(x, t, context=states, context_mask=mask, pooled=pooled)
        if uncond_tokens is None:  # one null caption, broadcast over the batch by the guidance
            uncond_tokens = self.null_tokens(1, tokens.shape[1])
        uncond_tokens = uncond_tokens.to(tokens.device)
        if uncond_tokens.shape[1:] != tokens.shape[1:] or uncond_tokens.shape[0] not in (1, tokens.shape[0]):
            raise ValueError(
                f"uncond_tokens of shape {tuple(uncond_tokens.shape)} do not match the tokens' {tuple(tokens.shape)}"
            )
        length = self._trim_padding(torch.cat([tokens, uncond_tokens])).shape[1]
        tokens, uncond_tokens = tokens[:, :length], uncond_tokens[:, :length]
        states, mask, pooled = self.encode_text(tokens)
        cond = {"context": states, "context_mask": mask, "pooled": pooled}
        u_states, u_mask, u_pooled = self.encode_text(uncond_tokens)
        uncond = {"context": u_states, "context_mask": u_mask, "pooled": u_pooled}
        return classifier_free_guidance(net, cond, uncond, guidance_scale, rescale=guidance_rescale)

    def _sample_latents(
        self, sampler: str, model_fn: ModelFn, shape: tuple[int, ...], scheduler: Any, timesteps: torch.Tensor,
        init_latents: torch.Tensor | None, mask: torch.Tensor | None, generator: torch.Generator | None, eta: float,
        callback: StepCallback | None,
    ) -> torch.Tensor:
        """The sampling loop of :meth:`generate`, its arguments checked: x_0 (B, C, h, w) in diffusion space,
        `sampler` run over `timesteps` from x_T (or from `init_latents` noised to timesteps[0]), and for
        inpainting the input's latents kept outside the `mask` at every step and in the result."""
        x, x_known, eps = self._start(shape, generator, scheduler, timesteps, init_latents)
        if mask is not None:  # the network sees the known region noised with the same eps at every step
            model_fn = inpainting.blend_known(model_fn, mask, x_known, eps, scheduler)
            callback = inpainting.blend_callback(callback, mask, x_known, eps, scheduler, timesteps.tolist())
        # The text is the same at every step: its cross-attention keys and values are projected once.
        with reuse_text_keys_values(self.denoiser):
            x_0 = run_sampler(sampler, model_fn, x, scheduler, timesteps,
                              generator=generator, eta=eta, callback=callback)
        if mask is not None:
            x_0 = inpainting.blend_result(x_0, mask, x_known)
        return x_0

    @torch.no_grad()
    def generate(
        self,
        text_tokens: torch.Tensor,
        scheduler: nn.Module,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        image_size: int | tuple[int, int] = (256, 256),
        sampler: str = "ddim",
        generator: torch.Generator | None = None,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        uncond_tokens: torch.Tensor | None = None,
        callback: StepCallback | None = None,
        init_latents: torch.Tensor | None = None,
        strength: float = 1.0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text to images, or (with `init_latents`) images and text to images (SDEdit, Meng et al. 2022), or
        (with a `mask` too) inpainting (Blended Latent Diffusion, Avrahami et al. 2023; ``diffusion.inpainting``).

        Args:
            text_tokens: (B, T) long, tokenized captions (``[BOS] ... [EOS] [PAD]*``).
            scheduler: the :class:`~diffusion.scheduler.DDPMScheduler` the denoiser was trained with.
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance scale s = 1 + w, w the weight of Ho & Salimans 2022 eq. 6
                (1: no guidance, one forward per step; 0: the unconditional model).
            image_size: (H, W) or a side; multiples of :attr:`latent_multiple`.
            sampler: a key of ``diffusion.samplers.SAMPLERS`` ("ddpm", "ddim", "dpmpp", "euler", "euler_a", "heun").
            generator: seeds x_T and any sampler noise; the same seed gives the same images.
            eta: DDIM stochasticity (0: deterministic).
            guidance_rescale: Lin et al. 2023 sec. 3.4 rescaling of the guided prediction (0: off).
            uncond_tokens: (B, T) or (1, T) negative prompt; default the null caption (as in training).
            callback: ``callback(i, t, x, x0)`` after each step (diffusion.samplers.StepCallback).
            init_latents: (B, C, H/f, W/f) diffusion-space latents of input images (``encode_images``; the
                posterior mean keeps the generator's draws those of text to image) for image to image: noised
                to the first of the last int(num_inference_steps * strength) timesteps of the schedule, from
                which the sampler runs those steps (diffusers' ``StableDiffusionImg2ImgPipeline``).
            strength: in (0, 1], with `init_latents` only: how much of the schedule runs, i.e. how much of the
                input is noised away; low keeps the input, 1 all but forgets it (all of it with a
                zero-terminal-SNR schedule; ``timesteps.img2img_timesteps``).
            mask: with `init_latents` only, (B, 1, h, w) or (1, 1, h, w) at the latent resolution, 0s and 1s (or
                bool): 1 = regenerate, 0 = keep. Before every step the network sees the latents outside the mask
                replaced by `init_latents` noised to that step's timestep (with x_T's draws), and the result is
                `init_latents` exactly there (before decoding): per-step latent blending, why and how in
                ``diffusion.inpainting``. The `callback` sees the blended state.
        Returns:
            (B, 3, H, W) float images in [0, 1].
        """
        shape, timesteps, mask = self._check_generate_args(text_tokens, scheduler, num_inference_steps, guidance_scale,
                                                           image_size, sampler, init_latents, strength, mask)
        was_training = self.training
        self.eval()
        try:
            model_fn = self._model_fn(text_tokens.to(self.device), uncond_tokens, guidance_scale, guidance_rescale)
            x_0 = self._sample_latents(sampler, model_fn, shape, scheduler, timesteps, init_latents, mask,
                                       generator, eta, callback)
            return (self.decode_latents(x_0) + 1.0) / 2.0  # [-1, 1] -> [0, 1]
        finally:
            self.train(was_training)

    # ---- persistence ------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` (what builds the model) and ``model.pt`` (its state dict) to ``directory``."""
        return save_module(self, self.config, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> LatentDiffusionModel:
        """Rebuild a model saved by :meth:`save_pretrained`. Weights are loaded with ``weights_only=True``
        (they may come from anyone; pitfall 14). A custom denoiser must be registered first."""
        model = cls(**read_config(directory))
        load_weights(model, directory, map_location)
        return model.to(map_location)
