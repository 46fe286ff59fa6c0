"""Inpainting by latent blending: regenerate the masked region of an image, keep the rest.

Blended Latent Diffusion (Avrahami et al. 2023, "Blended Latent Diffusion", Algorithm 1), RePaint's known-region
step without its resampling (Lugmayr et al. 2022, "RePaint", eq. 8), and diffusers' ``StableDiffusionInpaintPipeline``
with a 4-channel (not inpainting-trained) U-Net: the denoiser never saw a mask in training; after every step the
latents outside the mask are replaced by the input's latents noised to the timestep the state is now at,

    x_s <- m * x_s + (1 - m) * known_s,   known_s = sqrt(ab_s) x_known + sqrt(1 - ab_s) eps     (Alg. 1; eq. 8)

so the masked region is denoised in the context of the (noised) image around it, and after the last step, where
ab = 1, the region outside the mask is the input's latents exactly.

Notation:

    m        (B or 1, 1, h, w) latent mask: 1 = regenerate, 0 = keep (0 and 1 only, see below)
    x_known  (B, C, h, w) the input's latents (``init_latents``)
    eps      (B, C, h, w) the noise the sampler started from, x_t0 = sqrt(ab_t0) x_known + sqrt(1 - ab_t0) eps,
             fixed for the whole run (as diffusers does); known_t is x_known noised with it to t (Ho et al. 2020
             eq. 4, ``scheduler.add_noise``)

How it runs here, without touching the samplers: not the sampler's state is blended after every step, but the
network's input before every step (:func:`blend_known`), model_fn(m * x_t + (1 - m) * known_t, t), and the
sampler's result once, m * x_0 + (1 - m) * x_known (:func:`blend_result`). Why that is per-step blending: let y_t
be the per-step-blended state and x_t the sampler's own. Both start at x_t0 (= known_t0). If m * x_t = m * y_t,
the network's inputs are the same tensor, m * x_t + (1 - m) * known_t = y_t, so its outputs are too. The update of
every sampler here (ddpm, ddim, dpmpp, euler, euler_a) is elementwise in x: x_s at an element is a function of x_t there, of the
network's output there (through the elementwise ``to_x0_eps``), of earlier x_0 predictions there (DPM-Solver++'s
history, from the same outputs) and of fresh noise there (the same draws in the same order: they do not depend on
x). So inside the mask x_s equals y_s before y's blend, which leaves the inside as it is: m * x_s = m * y_s.
Outside the mask x drifts on its own (the network never sees it), and the final blend puts x_known there, where
y ends too (known at ab = 1). The convolutions and attention that mix elements act only inside the network,
whose input is the same tensor in both. tests/test_inpaint.py checks it, step by step and bit for bit, for ddpm,
ddim and dpmpp, and euler and euler_a against their DDIM twins (their state, x / sqrt(ab), is out of a callback's
reach). Two limits:

- The mask must be 0/1. With 0 < m < 1 per-step blending hands the sampler a state that is partly known_t even
  inside the mask, y_t = m x + (1 - m) known_t, where input blending's sampler keeps its own x_t: their next
  updates differ. So soft masks are refused.
- A sampler that evaluates the network between listed timesteps (Heun's second evaluation, Karras et al. 2022
  Alg. 1) gets the known region blended in at that evaluation too, which blending after each whole step does
  not do: a slightly different (no less consistent) algorithm, not the same images.

The fixed eps (diffusers; Blended Latent Diffusion and RePaint draw fresh noise at every step): known_t with
one eps is the path deterministic DDIM (eta = 0) would take from x_t0 if the denoiser predicted x_known exactly,
so the kept region moves along the trajectory the sampler itself follows; and no generator draw is added, so an
all-ones mask gives image to image's images bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion.samplers import ModelFn, StepCallback
from diffusion.scheduler import DDPMScheduler


def check_mask(mask: object, shape: tuple[int, ...]) -> Tensor:
    """`mask` as a bool tensor (True = regenerate), checked against the latent `shape` (B, C, h, w): a tensor of
    shape (B, 1, h, w) or (1, 1, h, w) (one mask for the whole batch) holding only 0 and 1 (or a bool tensor).
    Raises ValueError naming `mask` (the module docstring says why a soft mask is refused)."""
    B, _, h, w = shape
    if not isinstance(mask, Tensor) or mask.dim() != 4 or tuple(mask.shape[1:]) != (1, h, w) \
            or mask.shape[0] not in (1, B):
        what = f"a tensor of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask: expected a tensor of shape ({B}, 1, {h}, {w}) or (1, 1, {h}, {w}) at the latent "
                         f"resolution (1: regenerate, 0: keep), got {what}")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask: expected 0s and 1s only (1: regenerate, 0: keep); a soft mask is not per-step "
                         "blending (diffusion.inpainting): threshold it first")
    return mask.bool()


def known_at(scheduler: DDPMScheduler, x_known: Tensor, eps: Tensor, t: int) -> Tensor:
    """known_t = sqrt(ab_t) x_known + sqrt(1 - ab_t) eps (Ho et al. 2020 eq. 4); x_known itself for t = -1,
    after the last step (ab = 1)."""
    if t < 0:
        return x_known
    return scheduler.add_noise(x_known, eps, torch.full((x_known.shape[0],), t, device=x_known.device))


def blend_known(model_fn: ModelFn, mask: Tensor, x_known: Tensor, eps: Tensor, scheduler: DDPMScheduler) -> ModelFn:
    """`model_fn` seeing m * x_t + (1 - m) * known_t instead of x_t (the module docstring: per-step blending).

    mask: (B or 1, 1, h, w) bool (:func:`check_mask`); x_known, eps: (B, C, h, w) on x's device and dtype.
    ``torch.where`` is that sum for a 0/1 mask, and exact whatever the values on the other side.
    """
    def blended(x_t: Tensor, t: Tensor) -> Tensor:
        known = scheduler.add_noise(x_known, eps, t)  # (B, C, h, w) at the timestep the network is evaluated at
        return model_fn(torch.where(mask, x_t, known), t)

    return blended


def blend_result(x_0: Tensor, mask: Tensor, x_known: Tensor) -> Tensor:
    """m * x_0 + (1 - m) * x_known: the sampler's result inside the mask, the input's latents, exactly, outside."""
    return torch.where(mask, x_0, x_known)


def blend_callback(
    callback: StepCallback | None, mask: Tensor, x_known: Tensor, eps: Tensor, scheduler: DDPMScheduler,
    timesteps: list[int],
) -> StepCallback | None:
    """`callback` shown the per-step-blended state: after step i (to the next listed timestep s, or to clean data
    after the last), m * x + (1 - m) * known_s and m * x0 + (1 - m) * x_known, what per-step blending holds; the
    last call's x is the result :func:`blend_result` returns. None stays None."""
    if callback is None:
        return None
    next_t = [*timesteps[1:], -1]

    def blended(i: int, t: int, x: Tensor, x0: Tensor) -> None:
        callback(i, t, torch.where(mask, x, known_at(scheduler, x_known, eps, next_t[i])),
                 torch.where(mask, x0, x_known))

    return blended


def latent_mask(pixel_mask: Tensor, factor: int) -> Tensor:
    """(K, 1, H, W) 0/1 pixel mask -> (K, 1, H/f, W/f): a latent cell is regenerated if any of the f x f pixels it
    covers is masked (a max-pool over each block). Not a nearest or mean downsampling: a cell that mixes kept and
    masked pixels must be free to change, else the kept latent decodes to the old content over the masked pixels
    in it, and the new region ends in a seam of the old image."""
    return torch.nn.functional.max_pool2d(pixel_mask, kernel_size=factor, stride=factor)  # (K, 1, H/f, W/f)
