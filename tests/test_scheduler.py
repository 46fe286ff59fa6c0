"""DDPMScheduler: schedules, zero terminal SNR, forward process and targets, checked against diffusers.

Parity is measured in float64 against diffusers on identical inputs (STYLE.md 15c). diffusers builds its
tables in float32, so the tables are compared at 1e-5; the formulas are then compared with diffusers
running on our float64 tables (`use_our_tables`), which isolates the math from float32 rounding.
"""

import math

import diffusers  # a dev dependency: missing, these tests fail loudly (importorskip skipped all of them)
import pytest
import torch

from diffusion.config import ConfigError
from diffusion.scheduler import (
    TABLES,
    DDPMScheduler,
    SchedulerConfig,
    rescale_zero_terminal_snr,
)

T = 1000
SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
EDGE_T = [0, 1, 250, 500, 998, 999]


def make_pair(schedule="linear", prediction_type="epsilon", zero_snr=False, **kw):
    """Our scheduler and diffusers' DDPMScheduler with the same settings (clip_sample off: pitfall 6)."""
    beta = dict(beta_start=0.00085, beta_end=0.012) if schedule == "scaled_linear" else {}
    ours = DDPMScheduler(beta_schedule=schedule, prediction_type=prediction_type,
                         rescale_zero_terminal_snr=zero_snr, **beta, **kw)
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=SCHEDULES[schedule], clip_sample=False,
                                  prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr, **beta)
    return ours, ref


def use_our_tables(ref, ours):
    """Run diffusers on our float64 tables (its own are float32), so only the formulas are compared."""
    tb = ours.tables(torch.float64)
    ref.betas, ref.alphas, ref.alphas_cumprod = tb["betas"], tb["alphas"], tb["alphas_cumprod"]
    for name in ("one", "final_alpha_cumprod"):
        if hasattr(ref, name):
            setattr(ref, name, torch.tensor(1.0, dtype=torch.float64))
    return ref


def data(b=len(EDGE_T), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, 8, 8, generator=g, dtype=dtype)
    noise = torch.randn(b, 4, 8, 8, generator=g, dtype=dtype)
    return x0, noise


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---- schedules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_tables_match_diffusers(schedule, zero_snr):
    ours, ref = make_pair(schedule, "v_prediction", zero_snr)
    tb = ours.tables(torch.float64)
    assert maxdiff(tb["betas"], ref.betas) <= 1e-5
    assert maxdiff(tb["alphas_cumprod"], ref.alphas_cumprod) <= 1e-5
    # diffusers' float32 tables are the float64 ones rounded: much closer than the tolerance
    assert maxdiff(tb["alphas_cumprod"], ref.alphas_cumprod) <= 1e-6
    assert torch.allclose(tb["sqrt_alphas_cumprod"] ** 2 + tb["sqrt_one_minus_alphas_cumprod"] ** 2,
                          torch.ones(T, dtype=torch.float64), atol=1e-12)


def test_zero_terminal_snr_algorithm_matches_diffusers_in_float64():
    from diffusers.schedulers.scheduling_ddpm import (
        rescale_zero_terminal_snr as ref_rescale,
    )

    for schedule in SCHEDULES:
        betas = DDPMScheduler(beta_schedule=schedule).tables()["betas"]
        assert maxdiff(rescale_zero_terminal_snr(betas), ref_rescale(betas.clone())) <= 1e-12


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_zero_terminal_snr_properties(schedule):
    """Lin et al. 2023 Algorithm 1: alpha-bar_{T-1} = 0 exactly and alpha-bar_0 unchanged."""
    plain = DDPMScheduler(beta_schedule=schedule).tables()["alphas_cumprod"]
    zsnr = DDPMScheduler(beta_schedule=schedule, prediction_type="v_prediction",
                         rescale_zero_terminal_snr=True).tables()["alphas_cumprod"]
    assert zsnr[-1] == 0 and plain[-1] > 0
    assert abs(zsnr[0] - plain[0]) < 1e-12
    assert (zsnr[1:] < zsnr[:-1]).all()


def test_schedule_names_follow_diffusers():
    """pitfall 6: LDM's "linear" (sqrt-linear) is "scaled_linear" here; cosine is Nichol & Dhariwal eq. 17."""
    sl = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).tables()["betas"]
    assert sl[0] == pytest.approx(0.00085) and sl[-1] == pytest.approx(0.012)
    assert sl[T // 2] < (0.00085 + 0.012) / 2  # convex, not linear
    ab = DDPMScheduler(beta_schedule="cosine").tables()["alphas_cumprod"]
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    assert ab[499].item() == pytest.approx(f(500 / T) / f(0), rel=1e-9)


# ---- forward process and targets -----------------------------------------------------------------


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_add_noise_and_velocity_match_diffusers(schedule, zero_snr):
    ours, ref = make_pair(schedule, "v_prediction", zero_snr)
    x0, noise = data()
    t = torch.tensor(EDGE_T)
    # float32 buffers against diffusers' own float32 tables
    x32, n32 = x0.float(), noise.float()
    assert maxdiff(ours.add_noise(x32, n32, t), ref.add_noise(x32, n32, t)) <= 1e-4
    assert maxdiff(ours.get_velocity(x32, n32, t), ref.get_velocity(x32, n32, t)) <= 1e-4
    # float64: the formulas, on identical tables
    use_our_tables(ref, ours)
    assert maxdiff(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t)) <= 1e-12
    assert maxdiff(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t)) <= 1e-12
    assert ours.add_noise(x0, noise, t).dtype == torch.float64


def test_add_noise_broadcasts_per_sample():
    s = DDPMScheduler()
    x0, noise = data(2)
    t = torch.tensor([0, 999])
    ab = s.tables()["alphas_cumprod"]
    out = s.add_noise(x0, noise, t)
    for i in range(2):
        want = ab[t[i]].sqrt() * x0[i] + (1 - ab[t[i]]).sqrt() * noise[i]
        assert maxdiff(out[i], want) <= 1e-12


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_target_and_adapter_round_trip(pred):
    """to_x0_eps inverts get_target: the one adapter serves eps, v and x0 networks (STYLE.md 6)."""
    s = DDPMScheduler(prediction_type=pred)
    x0, noise = data()
    t = torch.tensor(EDGE_T)
    x_t = s.add_noise(x0, noise, t)
    target = s.get_target(x0, noise, t)
    want = {"epsilon": noise, "v_prediction": s.get_velocity(x0, noise, t), "sample": x0}[pred]
    assert torch.equal(target, want)
    x0_hat, eps_hat = s.to_x0_eps(target, x_t, t)
    assert maxdiff(x0_hat, x0) <= 1e-9 and maxdiff(eps_hat, noise) <= 1e-9


def test_snr():
    s = DDPMScheduler()
    t = torch.tensor([0, 500, 999])
    ab = s.alphas_cumprod[t]
    assert torch.allclose(s.snr(t), ab / (1 - ab))
    assert (s.snr(t)[1:] < s.snr(t)[:-1]).all()
    z = DDPMScheduler(prediction_type="v_prediction", rescale_zero_terminal_snr=True)
    assert z.snr(torch.tensor([999])).item() == 0.0


# ---- buffers, dtypes, devices -----------------------------------------------------------------------


def test_buffers_are_float32_nonpersistent_and_move():
    s = DDPMScheduler()
    assert {n for n, _ in s.named_buffers()} == set(TABLES)
    assert all(b.dtype == torch.float32 for b in s.buffers())
    assert s.state_dict() == {}  # derived from the config, never stored in a checkpoint
    s.to(torch.float64)
    assert all(b.dtype == torch.float64 for b in s.buffers())
    s.to("meta")
    assert all(b.device.type == "meta" for b in s.buffers())


def test_float64_inputs_read_the_float64_masters_whatever_the_buffers():
    s = DDPMScheduler().to(torch.bfloat16)  # e.g. moved along with a bf16 model
    x0, noise = data()
    t = torch.tensor(EDGE_T)
    ab = s.tables()["alphas_cumprod"][t].view(-1, 1, 1, 1)
    assert maxdiff(s.add_noise(x0, noise, t), ab.sqrt() * x0 + (1 - ab).sqrt() * noise) <= 1e-14
    assert s.add_noise(x0.float(), noise.float(), t).dtype == torch.float32
    s.tables()["alphas_cumprod"][0] = 0.0  # tables() hands out copies: the masters are untouched
    assert s.tables()["alphas_cumprod"][0] > 0


# ---- config, validation, subclassing ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"beta_schedule": "squaredcos_cap_v2"}, ["beta_schedule", "'linear'", "'scaled_linear'", "'cosine'"]),
        ({"prediction_type": "flow"}, ["prediction_type", "'epsilon'", "'v_prediction'", "'sample'"]),
        ({"num_timesteps": 1}, ["num_timesteps", ">= 2"]),
        ({"beta_start": 0.02, "beta_end": 0.01}, ["beta_end", "beta_start"]),
        # alpha-bar_{T-1} = 0 leaves eps-prediction no x_0 at the last step (NaN samples, NaN Min-SNR weights)
        ({"rescale_zero_terminal_snr": True}, ["rescale_zero_terminal_snr", "'v_prediction'", "'epsilon'"]),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(kw, words):
    with pytest.raises(ValueError) as e:
        DDPMScheduler(**kw)
    assert isinstance(e.value, ConfigError)
    for w in words:
        assert w in str(e.value)


def test_from_config():
    cfg = SchedulerConfig.from_dict({"beta_schedule": "cosine", "prediction_type": "v_prediction"}, "scheduler")
    s = DDPMScheduler.from_config(cfg)
    assert s.config == cfg and s.prediction_type == "v_prediction"
    with pytest.raises(ConfigError, match="scheduler.beta_schedule"):
        SchedulerConfig.from_dict({"beta_schedule": "quadratic"}, "scheduler")
    assert set(SchedulerConfig.help()) == set(cfg.to_dict())


class CustomScheduler(DDPMScheduler):
    """Kingma et al. 2021's "exp" schedule, the module docstring's example of adding a schedule."""

    def make_betas(self) -> torch.Tensor:
        s = torch.arange(self.config.num_timesteps + 1, dtype=torch.float64) / self.config.num_timesteps
        alpha_bar = torch.exp(-12.0 * s)
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


def test_custom_schedule_by_subclassing():
    s = CustomScheduler(num_timesteps=100)
    ab = s.tables()["alphas_cumprod"]
    assert maxdiff(ab, torch.exp(-12.0 * torch.arange(1, 101, dtype=torch.float64) / 100)) <= 1e-12
    x0, noise = data(2)
    t = torch.tensor([0, 99])
    out = s.add_noise(x0, noise, t)
    assert maxdiff(out[1], ab[99].sqrt() * x0[1] + (1 - ab[99]).sqrt() * noise[1]) <= 1e-12
    assert s.alphas_cumprod.dtype == torch.float32


def test_custom_schedule_is_validated():
    class Bad(DDPMScheduler):
        def make_betas(self):
            return torch.zeros(3, dtype=torch.float64)

    with pytest.raises(ValueError, match="make_betas"):
        Bad(num_timesteps=10)
