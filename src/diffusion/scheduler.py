"""The forward (noising) process of a discrete-time diffusion model: noise schedules and training targets.

Notation (STYLE.md 7). Variable names on the left, the symbols of Ho et al. 2020 ("Denoising Diffusion
Probabilistic Models", DDPM) on the right; ``t`` indexes the table, 0 <= t < T.

=============================  ==============================  ============================================
name                           symbol                          meaning
=============================  ==============================  ============================================
``num_timesteps``              T                               length of the discrete chain
``betas[t]``                   beta_t                          variance of step t of the forward process
``alphas[t]``                  alpha_t = 1 - beta_t
``alphas_cumprod[t]``          alpha-bar_t = prod_{s<=t} alpha_s   signal power at t (eq. 4)
``sqrt_alphas_cumprod[t]``     sqrt(alpha-bar_t)               "alpha_t" of Kingma et al. 2021 / DPM-Solver
``sqrt_one_minus_..[t]``       sqrt(1 - alpha-bar_t)           "sigma_t" of Kingma et al. 2021 / DPM-Solver
``snr(t)``                     alpha-bar_t / (1 - alpha-bar_t) signal-to-noise ratio (Kingma et al. 2021)
``x0`` / ``x_t`` / ``noise``   x_0 / x_t / epsilon             data, noised data, standard Gaussian noise
``v``                          v = sqrt(a-bar) eps - sqrt(1 - a-bar) x_0   velocity (Salimans & Ho 2022)
=============================  ==============================  ============================================

Schedules are named after diffusers (pitfall 6), because names differ between code bases:

- ``"linear"``: beta linear in t from ``beta_start`` to ``beta_end`` (Ho et al. 2020; diffusers "linear").
- ``"scaled_linear"``: sqrt(beta) linear in t, then squared. This is what the latent-diffusion (LDM) repo
  calls "linear" and Stable Diffusion uses (with 0.00085, 0.012).
- ``"cosine"``: Nichol & Dhariwal 2021 ("Improved DDPM") eq. 17 with s = 0.008, betas capped at 0.999
  (their sec. 3.2); diffusers calls it "squaredcos_cap_v2". ``beta_start``/``beta_end`` are unused.

``rescale_zero_terminal_snr=True`` applies Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample
Steps are Flawed") Algorithm 1, so that alpha-bar_{T-1} = 0 and the last training step is pure noise. It
needs ``prediction_type`` "v_prediction" (their sec. 3.2): with epsilon prediction x_0 cannot be recovered
from x_{T-1} = epsilon and samplers that start at T-1 divide by zero, as diffusers' do.

Adding a schedule is subclassing: override :meth:`DDPMScheduler.make_betas`, which returns float64 betas
of length T. Everything else (rescaling, tables, add_noise, the samplers) follows::

    class CustomScheduler(DDPMScheduler):
        '''An "exp" schedule, alpha-bar(s) = exp(-12 s), s in [0, 1]: a constant beta, 1 - exp(-12 / T).'''

        def make_betas(self) -> torch.Tensor:
            s = torch.arange(self.config.num_timesteps + 1, dtype=torch.float64) / self.config.num_timesteps
            alpha_bar = torch.exp(-12.0 * s)
            return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)

A subclass that needs its own arguments sets them on ``self`` before calling ``super().__init__``, since
``make_betas`` runs inside it.

Precision (STYLE.md 8): tables are computed once in float64 and stored as float32 buffers, which move with
``.to(device)`` and ``.to(dtype)``. Lookups return values in the dtype of the input tensor; a float64 input
always reads the float64 master tables (so parity tests in float64 are exact), whatever the buffers' dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion.config import Config, ConfigError, param

BetaSchedule = Literal["linear", "scaled_linear", "cosine"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]

#: Names of the derived tables, in the order they are computed; each is a (T,) buffer.
TABLES = ("betas", "alphas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig(Config):
    """The noise schedule and what the network predicts (`DDPMScheduler`)."""

    num_timesteps: int = param(1000, "T, the number of discrete diffusion steps used in training", ge=2)
    beta_schedule: BetaSchedule = param(
        "linear",
        "'linear' (Ho et al. 2020), 'scaled_linear' (LDM's 'linear', Stable Diffusion) or 'cosine' "
        "(Nichol & Dhariwal 2021; diffusers 'squaredcos_cap_v2'). Names follow diffusers.",
    )
    beta_start: float = param(1e-4, "beta_0 of the linear and scaled_linear schedules", gt=0.0, lt=1.0)
    beta_end: float = param(2e-2, "beta_{T-1} of the linear and scaled_linear schedules", gt=0.0, lt=1.0)
    prediction_type: PredictionType = param(
        "epsilon", "what the network predicts: 'epsilon' (noise), 'v_prediction' (velocity) or 'sample' (x_0)"
    )
    rescale_zero_terminal_snr: bool = param(
        False, "rescale betas so alpha-bar_{T-1} = 0 (Lin et al. 2023, Algorithm 1); use with v_prediction"
    )

    def __post_init__(self) -> None:
        if self.beta_end < self.beta_start:
            raise ConfigError(f"beta_end: expected a value >= beta_start ({self.beta_start}), got {self.beta_end}")
        if self.rescale_zero_terminal_snr and self.prediction_type == "epsilon":
            # alpha-bar_{T-1} = 0: x_0 = (x_t - sqrt(1 - alpha-bar) eps) / sqrt(alpha-bar) divides by zero at the
            # noisiest step, and eps carries no information about x_0 there (Lin et al. 2023, sec. 3.2).
            raise ConfigError(
                "rescale_zero_terminal_snr: needs prediction_type 'v_prediction' or 'sample'; with 'epsilon' the "
                "last timestep (alpha-bar = 0) has no x_0 (sampling gives NaN, Min-SNR weights NaN)"
            )


# --------------------------------------------------------------------------------------------------
# Beta schedules, all float64 (STYLE.md 8). A registry, not an if/elif chain (STYLE.md 3).
# --------------------------------------------------------------------------------------------------


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Ho et al. 2020 sec. 4: beta_t linear from beta_start to beta_end (diffusers "linear")."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """sqrt(beta_t) linear, then squared: LDM's "linear", diffusers "scaled_linear"."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int, beta_start: float = 0.0, beta_end: float = 0.0, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021 eq. 17: alpha-bar(s) = f(s) / f(0), f(s) = cos^2(pi/2 (s + 0.008) / 1.008),
    s = t/T, and beta_t = 1 - alpha-bar((t+1)/T) / alpha-bar(t/T) (f(0) cancels), capped at 0.999 (their sec. 3.2) to avoid the
    singularity at s = 1. diffusers "squaredcos_cap_v2". The beta arguments are unused."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


BETA_SCHEDULES: dict[str, Callable[[int, float, float], Tensor]] = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
}


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023 Algorithm 1: shift sqrt(alpha-bar) so its last value is 0 and scale it so its first
    value is unchanged, then convert back to betas. The last beta becomes 1 (alpha-bar_{T-1} = 0 exactly)."""
    alphas_bar_sqrt = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))  # step 1-2: shift, scale
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])  # step 3: undo the cumprod
    return 1 - alphas


# --------------------------------------------------------------------------------------------------
# The scheduler
# --------------------------------------------------------------------------------------------------


class DDPMScheduler(nn.Module):
    """Noise schedule tables plus the forward process q(x_t | x_0) and the prediction-type adapter.

    Args (also the fields of :class:`SchedulerConfig`; invalid values raise ``ConfigError``, a ValueError):
        num_timesteps: T.
        beta_schedule: "linear" | "scaled_linear" | "cosine" (names as in diffusers; see the module doc).
        beta_start, beta_end: end points of the linear schedules.
        prediction_type: "epsilon" | "v_prediction" | "sample", what the network outputs.
        rescale_zero_terminal_snr: Lin et al. 2023 Algorithm 1.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: BetaSchedule = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 2e-2,
        prediction_type: PredictionType = "epsilon",
        rescale_zero_terminal_snr: bool = False,
    ) -> None:
        super().__init__()
        self.config = SchedulerConfig.from_dict(
            dict(num_timesteps=num_timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
                 beta_end=beta_end, prediction_type=prediction_type,
                 rescale_zero_terminal_snr=rescale_zero_terminal_snr)
        )
        betas = self._final_betas()
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        # Float64 masters (CPU, not buffers: `.half()` must not degrade them), float32 buffers that move.
        self._master: dict[str, Tensor] = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        }
        self._master_on: dict[torch.device, dict[str, Tensor]] = {}
        for name in TABLES:
            # Non-persistent: derived from the config, so checkpoints need not (and must not) carry them.
            self.register_buffer(name, self._master[name].to(torch.float32), persistent=False)

    @classmethod
    def from_config(cls, cfg: SchedulerConfig) -> DDPMScheduler:
        """Build from a validated :class:`SchedulerConfig` (e.g. a params.yaml section)."""
        return cls(**dataclasses.asdict(cfg))

    # ---- extension point ------------------------------------------------------------------------

    def make_betas(self) -> Tensor:
        """The (T,) float64 betas of this schedule, before any zero-terminal-SNR rescaling.

        Override in a subclass to add a schedule (see the module docstring). Runs inside ``__init__``;
        ``self.config`` is set.
        """
        c = self.config
        return BETA_SCHEDULES[c.beta_schedule](c.num_timesteps, c.beta_start, c.beta_end)

    def _final_betas(self) -> Tensor:
        """`make_betas`, validated (shape (T,), every beta in (0, 1]), then rescaled if configured."""
        betas = self.make_betas()
        T = self.config.num_timesteps
        if not isinstance(betas, Tensor) or betas.shape != (T,):
            got = tuple(betas.shape) if isinstance(betas, Tensor) else type(betas).__name__
            raise ValueError(f"{type(self).__name__}.make_betas: expected a tensor of shape ({T},), got {got}")
        betas = betas.to(torch.float64)
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(f"{type(self).__name__}.make_betas: every beta must lie in (0, 1]")
        return rescale_zero_terminal_snr(betas) if self.config.rescale_zero_terminal_snr else betas

    # ---- table access -----------------------------------------------------------------------------

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    def tables(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """Fresh copies of all (T,) tables (names in :data:`TABLES`) from the float64 masters, in `dtype`."""
        return {k: v.to(device=device, dtype=dtype, copy=True) for k, v in self._master.items()}

    def table(self, name: str, like: Tensor) -> Tensor:
        """The (T,) table `name` on `like`'s device in `like`'s dtype (float64 inputs read the masters).

        Read-only: the result may be the scheduler's own (cached) tensor.
        """
        if like.dtype == torch.float64:
            cache = self._master_on.get(like.device)
            if cache is None:  # one host-to-device copy per device, then cached
                cache = self._master_on[like.device] = self.tables(torch.float64, like.device)
            return cache[name]
        return getattr(self, name).to(device=like.device, dtype=like.dtype)

    def _at(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """table[t] for a (B,) long `t`, shaped (B, 1, ..., 1) to broadcast against `like` (no host sync)."""
        values = self.table(name, like)[t.to(like.device)]  # (B,)
        return values.view(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)

    # ---- forward process and targets --------------------------------------------------------------

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps: a sample of q(x_t | x_0), Ho et al. 2020 eq. 4.

        x0, noise: (B, C, H, W); t: (B,) long. Returns (B, C, H, W) in x0's dtype.
        """
        return self._at("sqrt_alphas_cumprod", t, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def get_velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(alpha-bar_t) eps - sqrt(1 - alpha-bar_t) x_0 (Salimans & Ho 2022, sec. 4 and appendix D)."""
        return self._at("sqrt_alphas_cumprod", t, x0) * noise - self._at("sqrt_one_minus_alphas_cumprod", t, x0) * x0

    def get_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The regression target of the network for this scheduler's `prediction_type`."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.get_velocity(x0, noise, t)
        return x0

    def snr(self, t: Tensor) -> Tensor:
        """SNR(t) = alpha-bar_t / (1 - alpha-bar_t) (Kingma et al. 2021 eq. 2), (B,) float32.

        Used by loss weighting; Min-SNR (Hang et al. 2023) divides by snr for epsilon and by snr + 1 for v
        targets (pitfall 9). Infinite never (alpha-bar < 1); zero at T-1 with zero terminal SNR.
        """
        ab = self.alphas_cumprod.to(t.device)[t]
        return ab / (1 - ab)

    # ---- the single adapter between network output and samplers (STYLE.md 6) ----------------------

    def to_x0_eps(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Map a raw network output to (predicted x_0, predicted eps), in x_t's dtype.

        model_output, x_t: (B, C, H, W); t: (B,) long. Every sampler goes through this, so U-Net and DiT and
        all three prediction types share the samplers.
        """
        alpha = self._at("sqrt_alphas_cumprod", t, x_t)
        sigma = self._at("sqrt_one_minus_alphas_cumprod", t, x_t)
        return self.convert_output(model_output, x_t, alpha, sigma)

    def convert_output(self, model_output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """`to_x0_eps` with explicit alpha = sqrt(alpha-bar_t), sigma = sqrt(1 - alpha-bar_t) (broadcastable).

        From x_t = alpha x_0 + sigma eps (eq. 4) and v = alpha eps - sigma x_0, with alpha^2 + sigma^2 = 1:
        epsilon: x_0 = (x_t - sigma eps) / alpha          (Ho et al. 2020 eq. 15)
        v:       x_0 = alpha x_t - sigma v,  eps = alpha v + sigma x_t   (Salimans & Ho 2022 sec. 4)
        sample:  eps = (x_t - alpha x_0) / sigma
        """
        model_output = model_output.to(x_t.dtype)
        if self.prediction_type == "epsilon":
            return (x_t - sigma * model_output) / alpha, model_output
        if self.prediction_type == "v_prediction":
            return alpha * x_t - sigma * model_output, alpha * model_output + sigma * x_t
        return model_output, (x_t - alpha * model_output) / sigma

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.config).items())
