"""Reverse-process samplers as small pure functions (STYLE.md 5); classifier-free guidance is in
:mod:`diffusion.guidance`.

Every sampler takes a :class:`ModelFn` returning the network's raw output, and maps it through
``scheduler.to_x0_eps`` (STYLE.md 6): the U-Net and the DiT, and eps-, v- and x0-prediction, share all of them.

Notation, as in :mod:`diffusion.scheduler`: ``ab[t]`` is alpha-bar_t; ``t`` the current timestep and ``s``
the next one in the (descending) list of timesteps, i.e. the one the step goes to; after the last listed
timestep the step goes to "t = -1", where alpha-bar = 1 (clean data).

Timesteps (which ones a sampler visits: :mod:`diffusion.timesteps`). Every sampler steps from each listed
timestep to the *next listed* one, so the network is always evaluated at the noise level x is at; after the
last, to clean data.

Precision: the update arithmetic runs in x's dtype (tables are read in that dtype). Keep x in float32 (or
float64) and put mixed precision inside `model_fn` (autocast); the raw output is cast to x's dtype.
Randomness comes only from the `generator` argument (STYLE.md 9); no host syncs inside the loops (the
timesteps are read once as Python ints). The helpers that check and read these before each loop are
:mod:`diffusion.sampler_inputs`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from diffusion.sampler_inputs import (
    alpha_bars,
    randn_like,
    require_full_precision,
    timestep_list,
)
from diffusion.scheduler import DDPMScheduler
from diffusion.timesteps import Spacing, make_timesteps


class ModelFn(Protocol):
    """A denoiser as the samplers see it: x_t (B, C, H, W) and t (B,) long -> the raw network output
    (B, C, H, W) of the scheduler's prediction type. Bind text conditioning (or CFG) in a closure."""

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor: ...


class StepCallback(Protocol):
    """Called after every step with its index, its timestep, the new x and the x_0 predicted at t."""

    def __call__(self, i: int, t: int, x: Tensor, x0: Tensor) -> None: ...


# --------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------


def ddpm_posterior(x0: Tensor, x_t: Tensor, ab_t: Tensor, ab_s: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_s | x_t, x_0), Ho et al. 2020 eq. 6-7, for s < t not necessarily t - 1.

    With alpha_t = ab_t / ab_s and beta_t = 1 - alpha_t (the step from s to t, so strided subsets work):
    mean = sqrt(ab_s) beta_t / (1 - ab_t) x_0 + sqrt(alpha_t) (1 - ab_s) / (1 - ab_t) x_t   (eq. 7)
    var  = (1 - ab_s) / (1 - ab_t) beta_t   ("fixed_small", beta-tilde of eq. 7; clamped at 1e-20 as diffusers)
    """
    alpha_t = ab_t / ab_s
    beta_t = 1 - alpha_t
    mean = (ab_s.sqrt() * beta_t / (1 - ab_t)) * x0 + (alpha_t.sqrt() * (1 - ab_s) / (1 - ab_t)) * x_t
    var = ((1 - ab_s) / (1 - ab_t) * beta_t).clamp(min=1e-20)
    return mean, var


def sample_ddpm(
    model_fn: ModelFn,
    x: Tensor,
    scheduler: DDPMScheduler,
    timesteps: Tensor | list[int],
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020 Algorithm 2): x_s ~ q(x_s | x_t, x_0 = predicted x_0), eq. 6-7.

    x: (B, C, H, W) noise at timesteps[0]. `timesteps` may be the full chain T-1..0 or a strided subset;
    each step uses alpha-bar of the next listed timestep (diffusers' ``previous_timestep``). Noise is drawn
    from `generator` at every step with t > 0, in the same order as diffusers' ``DDPMScheduler.step``
    (at the last listed step the variance is 0, clamped to 1e-20, so that draw only keeps the order).
    """
    B = x.shape[0]
    for i, (t, ab_t, ab_s) in enumerate(alpha_bars(scheduler, x, timestep_list(scheduler, timesteps))):
        t_batch = torch.full((B,), t, dtype=torch.long, device=x.device)
        x0, _ = scheduler.to_x0_eps(model_fn(x, t_batch), x, t_batch)
        mean, var = ddpm_posterior(x0, x, ab_t, ab_s)
        x = mean + var.sqrt() * randn_like(x, generator) if t > 0 else mean
        if callback is not None:
            callback(i, t, x, x0)
    return x


def sample_ddim(
    model_fn: ModelFn,
    x: Tensor,
    scheduler: DDPMScheduler,
    timesteps: Tensor | list[int],
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), eq. 12 with sigma from eq. 16:

    sigma_t = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s)                           (eq. 16)
    x_s = sqrt(ab_s) x0_pred + sqrt(1 - ab_s - sigma_t^2) eps_pred + sigma_t z,  z ~ N(0, I)     (eq. 12)

    eta = 0 is deterministic (no noise is drawn); eta = 1 is DDPM's posterior. The last step uses
    alpha-bar_s = 1 (diffusers ``set_alpha_to_one=True``), so it returns the predicted x_0.
    """
    if eta < 0:
        raise ValueError(f"eta: expected a value >= 0, got {eta}")
    B = x.shape[0]
    for i, (t, ab_t, ab_s) in enumerate(alpha_bars(scheduler, x, timestep_list(scheduler, timesteps))):
        t_batch = torch.full((B,), t, dtype=torch.long, device=x.device)
        x0, eps = scheduler.to_x0_eps(model_fn(x, t_batch), x, t_batch)
        sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).sqrt()  # eq. 16
        # eq. 12 without the noise; the clamp only guards eta > 1 (outside the paper's range) from NaN
        x = ab_s.sqrt() * x0 + (1 - ab_s - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x = x + sigma * randn_like(x, generator)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def sample_dpmpp_2m(
    model_fn: ModelFn,
    x: Tensor,
    scheduler: DDPMScheduler,
    timesteps: Tensor | list[int],
    *,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): multistep, data prediction.

    With alpha = sqrt(ab), sigma = sqrt(1 - ab), lambda = log(alpha / sigma), h = lambda_s - lambda_t:
    first step, first order (= DDIM):  x_s = (sigma_s / sigma_t) x - alpha_s (e^{-h} - 1) x0_t
    later steps, r = h_prev / h:        D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev, and the same update with D.
    Final step: to sigma = 0 (diffusers ``final_sigmas_type="zero"``), where the first-order update is
    exactly x0_t. diffusers' ``lower_order_final`` (for < 15 steps) also makes only this last step first
    order when solver_order = 2, so it needs nothing more here. A zero alpha-bar (zero terminal SNR) is
    replaced by 2**-24, as diffusers does, so that lambda stays finite.
    """
    ts = timestep_list(scheduler, timesteps)
    require_full_precision(x)
    ab = scheduler.table("alphas_cumprod", x)
    ab = torch.where(ab > 0, ab, torch.full_like(ab, 2.0**-24))
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    lam = alpha.log() - sigma.log()
    B, x0_prev, h_prev = x.shape[0], None, None
    for i, (t, s) in enumerate(zip(ts, ts[1:] + [-1])):
        t_batch = torch.full((B,), t, dtype=torch.long, device=x.device)
        x0, _ = scheduler.convert_output(model_fn(x, t_batch), x, alpha[t], sigma[t])
        if s < 0:
            x = x0  # sigma_s = 0, alpha_s = 1, h = inf: the first-order update reduces to x0
        else:
            h = lam[s] - lam[t]
            d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * (h / (2 * h_prev))  # D0 + D1 / 2
            x = (sigma[s] / sigma[t]) * x - alpha[s] * torch.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, t, x, x0)
    return x


# --------------------------------------------------------------------------------------------------
# Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models"): Euler, Euler
# ancestral and Heun, in the variance-exploding form
# --------------------------------------------------------------------------------------------------


def _ve_schedule(scheduler: DDPMScheduler, x: Tensor) -> tuple[Tensor, Tensor]:
    """Our schedule in the variance-exploding (VE) form of Karras et al. 2022 (sec. 2, with sigma(t) = t and
    s(t) = 1, "the choice made in DDIM", sec. 3): dividing x_t = alpha x_0 + sqrt(1 - ab) eps by alpha gives

        x~ = x_t / alpha = x_0 + sigma eps,   alpha = sqrt(ab),   sigma = sqrt((1 - ab) / ab)

    Returns (alpha, sigma), each (T + 1,) in x's dtype on x's device. Entry T is the step after the last listed
    timestep, clean data (alpha = 1, sigma = 0): the samplers read it as index s = -1, Python's last element.
    A zero alpha-bar (zero terminal SNR, Lin et al. 2023) would make sigma_{T-1} infinite: like diffusers' Euler
    schedulers (``rescale_betas_zero_snr``), it is replaced by 2**-24, so sigma_{T-1} = sqrt(2**24 - 1) ~ 4096.
    """
    require_full_precision(x)
    ab = scheduler.table("alphas_cumprod", x)
    ab = torch.where(ab > 0, ab, torch.full_like(ab, 2.0**-24))
    ab = torch.cat([ab, ab.new_ones(1)])  # (T + 1,)
    return ab.sqrt(), ((1 - ab) / ab).sqrt()


def _denoise(model_fn: ModelFn, scheduler: DDPMScheduler, x: Tensor, t: int, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Karras et al.'s denoiser D(x~; sigma_t): the x_0 predicted at timestep t from the VE state x~ (B, C, H, W).

    The network sees alpha_t x~ = x~ / sqrt(1 + sigma_t^2) (diffusers' ``scale_model_input``): the VP x_t it
    was trained on, whose noise is sqrt(1 - ab_t) = alpha_t sigma_t.
    """
    x_t = alpha[t] * x
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    x0, _ = scheduler.convert_output(model_fn(x_t, t_batch), x_t, alpha[t], alpha[t] * sigma[t])
    return x0


def sample_euler(
    model_fn: ModelFn,
    x: Tensor,
    scheduler: DDPMScheduler,
    timesteps: Tensor | list[int],
    *,
    callback: StepCallback | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022 Algorithm 1 without its correction,
    lines 6-8, as their sec. 2 describes Euler; = Algorithm 2 with S_churn = 0 and no correction; diffusers'
    ``EulerDiscreteScheduler``, k-diffusion's ``sample_euler``).

    In the VE form (:func:`_ve_schedule`) the ODE is dx~/dsigma = (x~ - D(x~; sigma)) / sigma (Karras eq. 4 with
    sigma(t) = t, s(t) = 1), D the predicted x_0. One Euler step per listed timestep, to sigma = 0 after the last:

        d = (x~_t - x0_t) / sigma_t,   x~_s = x~_t + (sigma_s - sigma_t) d       (Algorithm 1 lines 4-5)

    x (B, C, H, W) comes in, and goes to the callback, in the VP form x_t = alpha x~ of the other samplers.

    This is DDIM with eta = 0, exactly: d = (x~_t - x0_t) / sigma_t is the predicted eps, so x~_s = x0_t +
    sigma_s eps_t, and times alpha_s, x_s = sqrt(ab_s) x0_t + sqrt(1 - ab_s) eps_t, DDIM's eq. 12. Song et al.
    2021 write DDIM this way, as an Euler step (sec. 4.3, eq. 13, of the ODE eq. 14); Karras et al. (sec. 3)
    note that DDIM makes their choice sigma(t) = t, s(t) = 1. On the same timesteps the two differ only by
    rounding (and at zero terminal SNR by the 2**-24, which DDIM does not need).

    Timesteps are ours (:func:`make_timesteps`), integers. diffusers' Euler and Heun schedulers agree for
    "leading" and "trailing"; for "linspace" they keep fractional timesteps (and interpolate sigma), which
    networks taking integer timesteps cannot be evaluated at.
    """
    ts = timestep_list(scheduler, timesteps)
    alpha, sigma = _ve_schedule(scheduler, x)
    x = x / alpha[ts[0]]  # x~ (B, C, H, W)
    for i, (t, s) in enumerate(zip(ts, ts[1:] + [-1])):
        x0 = _denoise(model_fn, scheduler, x, t, alpha, sigma)
        x = x + (sigma[s] - sigma[t]) * ((x - x0) / sigma[t])
        if callback is not None:
            callback(i, t, alpha[s] * x, x0)
    return x  # sigma = 0, alpha = 1: x~ is x


def sample_euler_ancestral(
    model_fn: ModelFn,
    x: Tensor,
    scheduler: DDPMScheduler,
    timesteps: Tensor | list[int],
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Euler ancestral (diffusers' ``EulerAncestralDiscreteScheduler``; k-diffusion's ``sample_euler_ancestral``
    with eta = 1): an Euler step to below the next noise level, then fresh noise back up to it.

    In the VE form (:func:`_ve_schedule`), from sigma_t to sigma_s:

        sigma_up = sqrt(sigma_s^2 (sigma_t^2 - sigma_s^2) / sigma_t^2),   sigma_down = sqrt(sigma_s^2 - sigma_up^2)
        x~_s = x~_t + (sigma_down - sigma_t) (x~_t - x0_t) / sigma_t + sigma_up z,   z ~ N(0, I)

    so that the noise levels add up, sigma_down^2 + sigma_up^2 = sigma_s^2. The last step (sigma_s = 0) adds none.

    This is DDIM with eta = 1, DDPM's posterior (Song et al. 2021 eq. 12 and 16, :func:`sample_ddim`): alpha_s
    sigma_up is eq. 16's noise scale at eta = 1 (DDIM's own "sigma_t", another sigma than this one), and alpha_s
    sigma_down = sqrt(1 - ab_s - that^2) is eq. 12's eps coefficient. With the same generator the two give the
    same samples, up to rounding.
    Noise is drawn from `generator` at every step, the last included, as diffusers does (that draw only keeps
    the order; k-diffusion skips it).
    """
    ts = timestep_list(scheduler, timesteps)
    alpha, sigma = _ve_schedule(scheduler, x)
    x = x / alpha[ts[0]]  # x~ (B, C, H, W)
    for i, (t, s) in enumerate(zip(ts, ts[1:] + [-1])):
        x0 = _denoise(model_fn, scheduler, x, t, alpha, sigma)
        # The formulas above, rearranged: sigma_down = sigma_s^2 / sigma_t (sigma_down / sigma_s = sigma_s /
        # sigma_t), sigma_up = sigma_s sqrt(1 - (sigma_s / sigma_t)^2). Equal, without the cancellation in
        # sigma_s^2 - sigma_up^2, which in float32 rounds to 0 when sigma_s << sigma_t (zero terminal SNR's 4096).
        r = sigma[s] / sigma[t]
        sigma_down, sigma_up = sigma[s] * r, sigma[s] * (1 - r**2).sqrt()
        x = x + (sigma_down - sigma[t]) * ((x - x0) / sigma[t])
        x = x + sigma_up * randn_like(x, generator)
        if callback is not None:
            callback(i, t, alpha[s] * x, x0)
    return x


def sample_heun(
    model_fn: ModelFn,
    x: Tensor,
    scheduler: DDPMScheduler,
    timesteps: Tensor | list[int],
    *,
    callback: StepCallback | None = None,
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022 Algorithm 1, deterministic: Algorithm 2 with S_churn = 0;
    diffusers' ``HeunDiscreteScheduler``, k-diffusion's ``sample_heun``): the Euler step of :func:`sample_euler`
    as a predictor, corrected with the average of the slopes at both ends (the trapezoidal rule), in the VE form
    (:func:`_ve_schedule`):

        d  = (x~_t - x0_t) / sigma_t,                 x~'_s = x~_t + (sigma_s - sigma_t) d              (lines 4-5)
        d' = (x~'_s - D(x~'_s; sigma_s)) / sigma_s,   x~_s = x~_t + (sigma_s - sigma_t) (d + d') / 2    (lines 6-8)

    The last step, to sigma = 0, is the Euler step alone (d' would divide by 0). So n steps cost 2n - 1
    network evaluations, for a local error O(h^3) against Euler's O(h^2) (Karras et al. sec. 3).

    The second evaluation is at the next listed timestep s, exactly: sigma_s is the level x~'_s is at.
    diffusers does the same on integer timesteps (its timesteps read t0, t1, t1, t2, t2, ...); it maps sigma
    back to a fractional timestep only for schedules given as sigmas (Karras et al. eq. 5), which networks
    evaluated at integer timesteps, as ours are, cannot take.
    """
    ts = timestep_list(scheduler, timesteps)
    alpha, sigma = _ve_schedule(scheduler, x)
    x = x / alpha[ts[0]]  # x~ (B, C, H, W)
    for i, (t, s) in enumerate(zip(ts, ts[1:] + [-1])):
        x0 = _denoise(model_fn, scheduler, x, t, alpha, sigma)
        d = (x - x0) / sigma[t]
        x_next = x + (sigma[s] - sigma[t]) * d  # the Euler predictor
        if s >= 0:  # sigma_s > 0: correct with the slope at s
            d_next = (x_next - _denoise(model_fn, scheduler, x_next, s, alpha, sigma)) / sigma[s]
            x_next = x + (sigma[s] - sigma[t]) * ((d + d_next) / 2)
        x = x_next
        if callback is not None:
            callback(i, t, alpha[s] * x, x0)
    return x


#: Sampler registry (STYLE.md 3); its keys are the choices of the CLI and the config
#: (``diffusion.eval_configs.SamplerName``, which a test keeps equal to them).
SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp": sample_dpmpp_2m,
    "euler": sample_euler, "euler_a": sample_euler_ancestral, "heun": sample_heun,
}


def run_sampler(
    name: str,
    model_fn: ModelFn,
    x: Tensor,
    scheduler: DDPMScheduler,
    timesteps: Tensor | list[int],
    *,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """Run sampler `name` over the descending `timesteps` from x (B, C, H, W) at timesteps[0]; return x_0.
    `eta` is used by "ddim", `generator` by "ddpm", "euler_a" and by "ddim" with eta > 0; "dpmpp", "euler" and
    "heun" are deterministic."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {', '.join(map(repr, SAMPLERS))}, got {name!r}")
    kwargs: dict = {"callback": callback}
    if name in ("ddpm", "ddim", "euler_a"):
        kwargs["generator"] = generator
    if name == "ddim":
        kwargs["eta"] = eta
    return SAMPLERS[name](model_fn, x, scheduler, timesteps, **kwargs)


def sample(
    name: str,
    model_fn: ModelFn,
    x: Tensor,
    scheduler: DDPMScheduler,
    num_steps: int,
    *,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    spacing: Spacing = "trailing",
    callback: StepCallback | None = None,
) -> Tensor:
    """Run sampler `name` for `num_steps` steps from x = x_T (B, C, H, W) and return x_0.

    "trailing" is the default: its first step is at T-1, the timestep whose alpha-bar matches the
    pure-noise input, for every num_steps ("leading" never starts there; "linspace" does from num_steps 2),
    and its steps are evenly spaced up to that end (Lin et al. 2023 sec. 3.3). "ddpm" with num_steps ==
    num_timesteps is the full ancestral chain (every spacing gives T-1..0 then). `eta` is used by "ddim",
    `generator` by "ddpm", "euler_a" and by "ddim" with eta > 0; "dpmpp", "euler" and "heun" are
    deterministic ("heun" evaluates the network 2 * num_steps - 1 times). Image to image runs the tail of the
    same schedule: ``timesteps.img2img_timesteps`` with :func:`run_sampler`.
    """
    timesteps = make_timesteps(scheduler, num_steps, spacing)
    return run_sampler(name, model_fn, x, scheduler, timesteps, generator=generator, eta=eta, callback=callback)
