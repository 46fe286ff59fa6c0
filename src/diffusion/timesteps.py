"""Which timesteps a sampler visits: the spacings of a few-step schedule, and the tail image to image runs.

:func:`make_timesteps` reproduces diffusers' ``DDIMScheduler.set_timesteps`` (``steps_offset=0``). The samplers
(:mod:`diffusion.samplers`) step from each listed timestep to the *next listed* one. diffusers' DDPM and
DPM-Solver do the same; diffusers' DDIM instead steps to ``t - T // num_steps``, which differs from the next
listed timestep for "linspace" and for step counts that do not divide T (an off-by-one of the kind pitfall 7
warns about). Where T // num_steps is the gap ("leading" and "trailing" with num_steps dividing T) the two agree
exactly. Image to image (SDEdit) runs the tail of that list, :func:`img2img_timesteps`, from the input's
latents noised to its first timestep.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from diffusion.scheduler import DDPMScheduler

Spacing = Literal["leading", "trailing", "linspace"]
SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")


def make_timesteps(scheduler: DDPMScheduler, num_steps: int, spacing: Spacing = "trailing") -> Tensor:
    """`num_steps` descending timesteps (CPU LongTensor), exactly as diffusers' ``DDIMScheduler.set_timesteps``
    with ``steps_offset=0`` (Lin et al. 2023 Table 2 names the spacings).

    - "leading":  k * (T // n) for k = n-1..0. Never reaches T-1: with T = 1000, n = 50 it starts at 980,
      so the first step sees a sample that is not pure noise (pitfall 7; Stable Diffusion's
      ``steps_offset=1`` shifts this to 981..1).
    - "trailing": round(T - k * T / n) - 1 for k = 0..n-1. Starts at T-1 (pure noise with zero-terminal-SNR)
      and ends near T/n - 1; the recommended spacing (Lin et al. 2023 sec. 3.3).
    - "linspace": round(linspace(0, T-1, n)), reversed. Starts at T-1 and ends at 0.

    The off-by-one to watch (pitfall 7): "T-1", not T, is the noisiest index; and with n = 1 both "leading"
    and "linspace" give [0], a single step from pure noise evaluated as if nearly clean. Use "trailing".
    """
    T = scheduler.num_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps: expected an integer in [1, {T}] (T of the scheduler), got {num_steps!r}")
    num_steps = int(num_steps)
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1].astype(np.int64)
    elif spacing == "trailing":
        # diffusers' form, cut to n values: arange's float steps can overshoot and keep an (n+1)-th value
        # ~1e-13 that would round to timestep -1 (n = 61 of T = 1000; diffusers 0.42 keeps it).
        ts = (np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1)[:num_steps]
    else:
        raise ValueError(f"spacing: expected one of {', '.join(map(repr, SPACINGS))}, got {spacing!r}")
    return torch.from_numpy(ts.copy())


def check_strength(strength: float) -> float:
    """`strength` if it is a number in (0, 1]; else ValueError naming it."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength: expected a number in (0, 1] (1: the whole schedule), got {strength!r}")
    return strength


def img2img_steps(num_steps: int, strength: float) -> int:
    """How many of `num_steps` steps image-to-image runs at `strength`: int(num_steps * strength), as diffusers'
    ``StableDiffusionImg2ImgPipeline.get_timesteps`` (truncated, so 0.29 of 100 steps runs 28: the float 0.29 is
    just under). Raises ValueError naming `strength` outside (0, 1], or so small that no step would run."""
    run = min(int(num_steps * check_strength(strength)), num_steps)
    if run < 1:
        # The smallest 3-decimal strength that runs a step: 1/3 rounded to 0.333 would run int(0.999) = 0 again.
        least = math.ceil(1000 / num_steps) / 1000
        raise ValueError(f"strength: {strength} of {num_steps} steps runs int({num_steps} * {strength}) = 0 steps; "
                         f"give a strength of at least {least:g}, or more steps")
    return run


def img2img_timesteps(
    scheduler: DDPMScheduler, num_steps: int, strength: float, spacing: Spacing = "trailing"
) -> Tensor:
    """The last :func:`img2img_steps` of the `num_steps` timesteps of :func:`make_timesteps`: image to image.

    SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential
    Equations", sec. 3): noise the input's latents x_0 to an intermediate time t_0 with q(x_t0 | x_0) (Ho et al.
    2020 eq. 4, ``scheduler.add_noise``) and run the reverse process from there. Here t_0 is the first returned
    timestep, ``make_timesteps(...)[num_steps - run]``, as diffusers' img2img pipeline picks it. `strength`
    (SDEdit's t_0 in [0, 1]) trades fidelity to the input for fidelity to the prompt: near 0 little noise is
    added and the output stays close to the input (realism and prompt count for little); at 1 the input is
    noised to timesteps[0], T-1 with "trailing" spacing, where sqrt(alpha-bar_{T-1}) of it remains: 0.068 with
    Stable Diffusion's schedule, none with a zero-terminal-SNR one (Lin et al. 2023), where it is text to image.
    """
    timesteps = make_timesteps(scheduler, num_steps, spacing)
    return timesteps[num_steps - img2img_steps(num_steps, strength):]
