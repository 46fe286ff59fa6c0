"""What every sampler of :mod:`diffusion.samplers` reads and checks before its loop: the timesteps as Python ints
(read once, so the loop makes no host syncs), x's precision, the noise schedule's alpha-bar at each step in x's
dtype, and fresh noise drawn from the sampler's `generator` (STYLE.md 9).

Notation as in :mod:`diffusion.samplers`: ``t`` a listed timestep, ``s`` the next one, "t = -1" clean data.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from diffusion.scheduler import DDPMScheduler


def timestep_list(scheduler: DDPMScheduler, timesteps: Tensor | list[int]) -> list[int]:
    """The timesteps as Python ints (read once, before the loop), checked to be descending and in [0, T)."""
    ts = timesteps.tolist() if isinstance(timesteps, Tensor) else [int(t) for t in timesteps]
    T = scheduler.num_timesteps
    if not ts or any(not 0 <= t < T for t in ts) or any(a <= b for a, b in itertools.pairwise(ts)):
        raise ValueError(f"timesteps: expected a non-empty, strictly descending list in [0, {T}), got {ts}")
    return ts


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn from `generator` on its own device (as diffusers'
    ``randn_tensor`` does, so a CPU generator gives the same numbers on any accelerator)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def require_full_precision(x: Tensor) -> None:
    """The rule of :mod:`diffusion.samplers`' docstring, enforced: the update arithmetic runs in x's dtype, so x must
    be float32 or float64. bfloat16 rounds alpha-bar_t to 1 for small t (1 - alpha-bar = 0, a division by zero);
    float16 keeps 3 digits. Mixed precision belongs inside model_fn."""
    if x.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"x: expected float32 or float64 latents, got {x.dtype}; the update arithmetic runs in "
                         "x's dtype (use autocast inside model_fn for a half-precision network)")


def alpha_bars(scheduler: DDPMScheduler, x: Tensor, ts: list[int]) -> list[tuple[int, Tensor, Tensor]]:
    """For each step: (t, alpha-bar_t, alpha-bar_s) as 0-d tensors on x's device; alpha-bar_{-1} = 1.

    Setting alpha-bar = 1 after the last step is diffusers' ``set_alpha_to_one=True`` (DDIM) and
    ``self.one`` (DDPM): the last step lands on clean data and returns the predicted x_0 exactly.
    """
    require_full_precision(x)
    ab = scheduler.table("alphas_cumprod", x)
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return [(t, ab[t], ab[s] if s >= 0 else one) for t, s in zip(ts, ts[1:] + [-1])]
