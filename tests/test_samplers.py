"""Samplers and guidance: timesteps, DDPM, DDIM, DPM-Solver++(2M), Euler, Euler ancestral and Heun against
diffusers; CFG; exactness.

Parity in float64 on identical inputs (STYLE.md 15c). For DDPM and DDIM, diffusers runs on our float64
tables (the tables themselves are compared in test_scheduler.py), so the step math is compared exactly.
diffusers' DPM-Solver casts sigmas and the sample to float32 internally, so it is compared at 1e-6. Its
Euler schedulers round the sample to float32 in each step: their whole chains are compared at 1e-6, and each
step exactly from a sample that float32 holds; its Heun scheduler does not, and is compared exactly.
"""

from fractions import Fraction
from typing import get_args

import diffusers  # a dev dependency: missing, these tests fail loudly (importorskip skipped all of them)
import pytest
import torch
from test_scheduler import CustomScheduler, use_our_tables

from diffusion.eval_configs import SamplerName
from diffusion.guidance import classifier_free_guidance
from diffusion.samplers import (
    SAMPLERS,
    ddpm_posterior,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from diffusion.scheduler import DDPMScheduler
from diffusion.timesteps import make_timesteps

T = 1000
SHAPE = (2, 4, 4, 4)


def toy_model(scheduler, c=0.5):
    """A fixed, nonlinear stand-in for a network: the raw output of the scheduler's prediction type that
    corresponds to x0_hat = c + 0.1 sin(x) cos(t / T), bounded whatever t, so values stay O(1)."""
    ab = scheduler.tables(torch.float64)["alphas_cumprod"]

    def model_fn(x, t):
        a = ab[t].sqrt().view(-1, 1, 1, 1).to(x.dtype)
        s = (1 - ab[t]).sqrt().view(-1, 1, 1, 1).to(x.dtype)
        x0 = c + 0.1 * torch.sin(x) * torch.cos(t.view(-1, 1, 1, 1).to(x.dtype) / T)
        eps = (x - a * x0) / s
        return {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[scheduler.prediction_type]

    return model_fn


def noise(seed=0, dtype=torch.float64):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def tb(t, like):
    return torch.full((like.shape[0],), int(t), dtype=torch.long)


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def ref_ddim(ours, pred="epsilon", **kw):
    ref = diffusers.DDIMScheduler(num_train_timesteps=T, clip_sample=False, prediction_type=pred, **kw)
    return use_our_tables(ref, ours)


# ---- timesteps (pitfall 7) -------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 50, 999, 1000])
def test_make_timesteps_match_diffusers(spacing, n):
    ref = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
    ref.set_timesteps(n)
    ts = make_timesteps(DDPMScheduler(), n, spacing)
    assert ts.dtype == torch.long and ts.tolist() == ref.timesteps.tolist()
    assert len(ts) == n and (ts[:-1] > ts[1:]).all()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_make_timesteps_every_step_count_gives_n_distinct_valid_steps(spacing):
    """For every n in 1..T: n strictly descending timesteps in [0, T). diffusers' trailing form keeps an (n+1)-th
    timestep -1 for 62 values of n at T = 1000 (n = 61: ..., 32, 15, -1), from np.arange's float overshoot."""
    s = DDPMScheduler()
    for n in range(1, T + 1):
        ts = make_timesteps(s, n, spacing)
        assert len(ts) == n and ts.min() >= 0 and ts.max() < T, (spacing, n)
        assert (ts[:-1] > ts[1:]).all(), (spacing, n)
    assert make_timesteps(s, 61, "trailing")[-3:].tolist() == [48, 32, 15]


@pytest.mark.parametrize(
    "spacing, n, first, last",
    [
        ("leading", 10, 900, 0), ("leading", 50, 980, 0), ("leading", 1, 0, 0), ("leading", 1000, 999, 0),
        ("trailing", 10, 999, 99), ("trailing", 50, 999, 19), ("trailing", 1, 999, 999), ("trailing", 3, 999, 332),
        ("linspace", 10, 999, 0), ("linspace", 50, 999, 0), ("linspace", 1, 0, 0), ("linspace", 2, 999, 0),
    ],
)
def test_first_and_last_timesteps(spacing, n, first, last):
    """The off-by-one (diffusers #2585, latent-diffusion #136): only trailing/linspace start at T-1."""
    ts = make_timesteps(DDPMScheduler(), n, spacing)
    assert (ts[0].item(), ts[-1].item()) == (first, last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_latents_are_rejected(dtype):
    """In bfloat16, alpha-bar_t rounds to 1 for small t and the update divides by 1 - alpha-bar = 0 (NaN)."""
    s = DDPMScheduler()
    with pytest.raises(ValueError, match="float32"):
        sample_ddim(toy_model(s), noise().to(dtype), s, make_timesteps(s, 5))


def test_make_timesteps_rejects_bad_arguments():
    s = DDPMScheduler(num_timesteps=20)
    for n in (0, 21):
        with pytest.raises(ValueError, match=r"num_steps.*\[1, 20\]"):
            make_timesteps(s, n)
    with pytest.raises(ValueError, match="'leading', 'trailing', 'linspace'"):
        make_timesteps(s, 5, "uniform")
    with pytest.raises(ValueError, match="descending"):
        sample_ddim(toy_model(s), noise(), s, [3, 5])


# ---- DDPM ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("t, s", [(999, 998), (500, 480), (37, 0), (1, 0), (99, -1), (0, -1)])
def test_ddpm_step_matches_diffusers(pred, t, s):
    ours = DDPMScheduler(prediction_type=pred)
    ref = use_our_tables(diffusers.DDPMScheduler(clip_sample=False, prediction_type=pred), ours)
    ref.set_timesteps(timesteps=[t, s] if s >= 0 else [t])  # previous_timestep is then s
    x, model = noise(1), toy_model(ours)
    out = model(x, tb(t, x))
    got = ref.step(out, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
    z = noise(7) if t > 0 else torch.zeros(SHAPE, dtype=torch.float64)
    var_ref = ref._get_variance(t)
    mean_ref = got - var_ref.sqrt() * z  # diffusers' noise is drawn from the same seeded generator
    ab = ours.tables()["alphas_cumprod"]
    x0, _ = ours.to_x0_eps(out, x, tb(t, x))
    mean, var = ddpm_posterior(x0, x, ab[t], ab[s] if s >= 0 else torch.tensor(1.0, dtype=torch.float64))
    assert maxdiff(mean, mean_ref) <= 1e-10 and maxdiff(var, var_ref) <= 1e-15
    steps = []
    sample_ddpm(model, x, ours, [t, s] if s >= 0 else [t], generator=torch.Generator().manual_seed(7),
                callback=lambda i, t_, x_, x0_: steps.append(x_))
    assert maxdiff(steps[0], got) <= 1e-10


@pytest.mark.parametrize("pred, timesteps", [("epsilon", "full"), ("v_prediction", "trailing50")])
def test_ddpm_loop_matches_diffusers(pred, timesteps):
    ours = DDPMScheduler(prediction_type=pred)
    ts = make_timesteps(ours, T if timesteps == "full" else 50, "trailing")
    ref = use_our_tables(diffusers.DDPMScheduler(clip_sample=False, prediction_type=pred), ours)
    ref.set_timesteps(timesteps=ts.tolist())
    model, x = toy_model(ours), noise(1)
    g = torch.Generator().manual_seed(3)
    for t in ref.timesteps:
        x = ref.step(model(x, tb(t, x)), t, x, generator=g).prev_sample
    got = sample_ddpm(model, noise(1), ours, ts, generator=torch.Generator().manual_seed(3))
    assert maxdiff(got, x) <= 1e-9


# ---- DDIM ---------------------------------------------------------------------------------------------


def ref_ddim_step(ref, out, t, s, x, eta, z):
    """One diffusers DDIM step from t to s. diffusers steps to t - T // num_inference_steps; an exact
    Fraction for num_inference_steps makes that our s (the next listed timestep; -1 after the last)."""
    ref.num_inference_steps = Fraction(T, t - s if s >= 0 else t + 1)
    return ref.step(out, t, x, eta=eta, variance_noise=z if eta > 0 else None).prev_sample


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_steps_match_diffusers(spacing, eta, zero_snr):
    ours = DDPMScheduler(prediction_type="v_prediction", rescale_zero_terminal_snr=zero_snr)
    ref, model = ref_ddim(ours, "v_prediction"), toy_model(ours)
    ts = make_timesteps(ours, 7, spacing).tolist()
    x, xs, g = noise(2), [], torch.Generator().manual_seed(5)
    sample_ddim(model, x, ours, ts, eta=eta, generator=g, callback=lambda i, t, x_, x0: xs.append(x_))
    g = torch.Generator().manual_seed(5)
    for i, (t, s) in enumerate(zip(ts, ts[1:] + [-1])):
        z = torch.randn(SHAPE, generator=g, dtype=torch.float64) if eta > 0 else None
        want = ref_ddim_step(ref, model(x, tb(t, x)), t, s, x, eta, z)
        assert maxdiff(xs[i], want) <= 1e-10, (i, t, s)
        x = want


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing, n, eta", [("leading", 10, 0.0), ("trailing", 50, 0.0), ("trailing", 10, 1.0)])
def test_ddim_loop_matches_diffusers(pred, spacing, n, eta):
    """Where n divides T, diffusers' own timesteps and previous-step rule give the same chain as ours."""
    ours = DDPMScheduler(prediction_type=pred)
    ref = ref_ddim(ours, pred, timestep_spacing=spacing)
    ref.set_timesteps(n)
    model, x = toy_model(ours), noise(1)
    g = torch.Generator().manual_seed(9)
    for t in ref.timesteps:
        x = ref.step(model(x, tb(t, x)), t, x, eta=eta, generator=g if eta > 0 else None).prev_sample
    got = sample("ddim", model, noise(1), ours, n, eta=eta, spacing=spacing, generator=torch.Generator().manual_seed(9))
    assert maxdiff(got, x) <= 1e-10


def test_ddim_float32_loop_against_diffusers_own_tables():
    ours = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, timestep_spacing="trailing")
    ref.set_timesteps(20)
    model, x = toy_model(ours), noise(1, torch.float32)
    for t in ref.timesteps:
        x = ref.step(model(x, tb(t, x)), t, x).prev_sample
    got = sample("ddim", model, noise(1, torch.float32), ours, 20)
    assert got.dtype == torch.float32 and maxdiff(got, x) <= 1e-4


def test_ddim_eta0_is_deterministic_and_draws_no_noise():
    s = DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    a = sample("ddim", toy_model(s), noise(), s, 10, generator=g)
    assert torch.equal(g.get_state(), state)
    assert torch.equal(a, sample("ddim", toy_model(s), noise(), s, 10))


# ---- DPM-Solver++(2M) -------------------------------------------------------------------------------


def dpm_on_our_tables(ref, ours, timesteps):
    """Set diffusers' DPM-Solver to `timesteps` and give it our float64 tables (its own sigmas are float32).
    Like its __init__, replace a zero terminal alpha-bar by 2**-24 (rescale_betas_zero_snr)."""
    ref.set_timesteps(timesteps=timesteps.tolist())
    ab = ours.tables(torch.float64)["alphas_cumprod"]
    if ref.config.rescale_betas_zero_snr:
        ab[-1] = 2.0**-24
    ref.alphas_cumprod = ab
    ref.sigmas = torch.cat([((1 - ab) / ab).sqrt()[timesteps], torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize(
    "n, spacing, pred, schedule, zero_snr",
    [
        (10, "trailing", "epsilon", "linear", False),
        (20, "trailing", "epsilon", "scaled_linear", False),
        (10, "linspace", "v_prediction", "cosine", False),
        (20, "leading", "sample", "linear", False),
        (20, "trailing", "v_prediction", "scaled_linear", True),
        (1, "trailing", "v_prediction", "linear", False),
    ],
)
def test_dpmpp_2m_loop_matches_diffusers(n, spacing, pred, schedule, zero_snr):
    beta = dict(beta_start=0.00085, beta_end=0.012) if schedule == "scaled_linear" else {}
    ours = DDPMScheduler(beta_schedule=schedule, prediction_type=pred, rescale_zero_terminal_snr=zero_snr, **beta)
    ref = diffusers.DPMSolverMultistepScheduler(
        beta_schedule={"cosine": "squaredcos_cap_v2"}.get(schedule, schedule), algorithm_type="dpmsolver++",
        solver_order=2, prediction_type=pred, rescale_betas_zero_snr=zero_snr, timestep_spacing=spacing, **beta)
    ts = make_timesteps(ours, n, spacing)
    if spacing == "trailing":  # DPM-Solver's own "trailing" equals DDIM's; its leading/linspace do not
        ref.set_timesteps(n)
        assert ref.timesteps.tolist() == ts.tolist()
    dpm_on_our_tables(ref, ours, ts)
    model, x = toy_model(ours), noise(4)
    for t in ref.timesteps:
        x = ref.step(model(x, tb(t, x)), t, x).prev_sample
    got = sample_dpmpp_2m(model, noise(4), ours, ts)
    assert maxdiff(got, x) <= 1e-6  # not exact: diffusers casts the sample to float32 in every step


def test_dpmpp_float32_loop_against_diffusers_own_tables():
    ours = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ref = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                timestep_spacing="trailing")
    ref.set_timesteps(20)
    model, x = toy_model(ours), noise(4, torch.float32)
    for t in ref.timesteps:
        x = ref.step(model(x, tb(t, x)), t, x).prev_sample
    got = sample("dpmpp", model, noise(4, torch.float32), ours, 20)
    assert got.dtype == torch.float32 and maxdiff(got, x) <= 1e-4


# ---- Euler, Euler ancestral, Heun (Karras et al. 2022) -------------------------------------------------

KARRAS = {"euler": diffusers.EulerDiscreteScheduler, "euler_a": diffusers.EulerAncestralDiscreteScheduler,
          "heun": diffusers.HeunDiscreteScheduler}


def karras_ref(name, ours, ts):
    """diffusers' scheduler for sampler `name`, set to our timesteps `ts` and our float64 sigmas sqrt((1 - ab) / ab)
    (its own are float32), a zero terminal alpha-bar replaced by 2**-24 as its __init__ does. Returns it and
    alpha = sqrt(ab) (T,), which converts our VP samples to its VE ones: x~ = x / alpha."""
    ref = KARRAS[name](num_train_timesteps=T, prediction_type=ours.prediction_type)
    ab = ours.tables(torch.float64)["alphas_cumprod"]
    ab[ab == 0] = 2.0**-24
    sigmas = torch.cat([((1 - ab) / ab).sqrt()[ts], torch.zeros(1, dtype=torch.float64)])
    if name == "euler_a":  # its set_timesteps takes no list of timesteps
        ref.set_timesteps(len(ts))
        ref.timesteps = ts.to(torch.float32)
    else:
        ref.set_timesteps(timesteps=ts.tolist())
    if name == "heun":  # every sigma but the first and the last twice, as its set_timesteps lays them out
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    ref.sigmas = sigmas
    return ref, ab.sqrt()


def step_outputs(sampler, *args, **kw):
    """Run `sampler` and return the x after each of its steps (what its callback sees)."""
    xs = []
    sampler(*args, callback=lambda i, t, x, x0: xs.append(x), **kw)
    return xs


def karras_ref_step(ref, model, x_ve, t, generator=None):
    """One diffusers step from the VE sample x~ at its timestep t; the network sees x~ / sqrt(sigma^2 + 1)."""
    out = model(ref.scale_model_input(x_ve, t), tb(t, x_ve))
    return ref.step(out, t, x_ve, **({"generator": generator} if generator is not None else {})).prev_sample


@pytest.mark.parametrize(
    "name, pred, spacing, zero_snr",
    [
        ("euler", "epsilon", "trailing", False), ("euler", "v_prediction", "linspace", False),
        ("euler", "sample", "leading", False), ("euler", "v_prediction", "trailing", True),
        ("euler_a", "epsilon", "trailing", False), ("euler_a", "v_prediction", "leading", False),
        ("euler_a", "v_prediction", "trailing", True),  # diffusers' Euler ancestral has no "sample" prediction
        ("heun", "epsilon", "trailing", False), ("heun", "v_prediction", "linspace", False),
        ("heun", "sample", "leading", False), ("heun", "v_prediction", "trailing", True),
    ],
)
def test_karras_loops_match_diffusers(name, pred, spacing, zero_snr):
    """Whole chains. diffusers' Euler schedulers round the sample to float32 in every step (Heun's does not),
    so those are compared at 1e-6, Heun at 1e-10; the steps themselves are compared exactly below."""
    ours = DDPMScheduler(prediction_type=pred, rescale_zero_terminal_snr=zero_snr)
    model, ts = toy_model(ours), make_timesteps(ours, 10, spacing)
    ref, alpha = karras_ref(name, ours, ts)
    x_ve, g = noise(4) / alpha[ts[0]], torch.Generator().manual_seed(6)
    for t in ref.timesteps:
        x_ve = karras_ref_step(ref, model, x_ve, t, g if name == "euler_a" else None)
    kw = {"generator": torch.Generator().manual_seed(6)} if name == "euler_a" else {}
    got = SAMPLERS[name](model, noise(4), ours, ts, **kw)
    assert maxdiff(got, x_ve) <= (1e-10 if name == "heun" else 1e-6)


@pytest.mark.parametrize("name, pred, zero_snr", [
    ("euler", "epsilon", False), ("euler", "sample", True), ("euler_a", "epsilon", False),
])
def test_euler_steps_match_diffusers_exactly(name, pred, zero_snr):
    """From a sample that float32 holds exactly (what diffusers' step reads), each of our steps is diffusers'
    step to float64 rounding; euler_a's noise comes from the same seed, drawn in the same order and shape.
    Not v-prediction: there diffusers computes x~ / (sigma^2 + 1) in float32 too (a 0-d float64 sigma does not
    promote a float32 tensor), a difference of ~1e-9 per step that the loops above stay within."""
    ours = DDPMScheduler(prediction_type=pred, rescale_zero_terminal_snr=zero_snr)
    model, ts = toy_model(ours), make_timesteps(ours, 7)
    ref, alpha = karras_ref(name, ours, ts)
    alpha = torch.cat([alpha, torch.ones(1, dtype=torch.float64)])  # alpha[-1] = 1: after the last step
    x_ve, tl = noise(2) / alpha[ts[0]], ts.tolist()
    for i, (t, s) in enumerate(zip(tl, tl[1:] + [-1])):
        x_ve = x_ve.float().double()
        seed = {"generator": torch.Generator().manual_seed(i)} if name == "euler_a" else {}
        ours_first = step_outputs(SAMPLERS[name], model, alpha[t] * x_ve, ours, tl[i:], **seed)[0]  # ours from t on
        g = torch.Generator().manual_seed(i) if name == "euler_a" else None
        want = karras_ref_step(ref, model, x_ve, ref.timesteps[i], g)
        assert maxdiff(ours_first, alpha[s] * want) <= 1e-10, (i, t, s)
        x_ve = want


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_euler_is_ddim_eta0_and_euler_ancestral_is_ddim_eta1(spacing, pred):
    """Song et al. 2021 sec. 4.3 eq. 13: DDIM's step is an Euler step of the VE ODE; and Euler ancestral's
    sigma_up, sigma_down are DDIM's eq. 16 noise at eta = 1 and its eps coefficient. Step by step, to rounding:
    float64's 1e-16, magnified by 1 / alpha in x~ = x / alpha, where the cosine schedule has alpha_{T-1} = 5e-5."""
    ours = DDPMScheduler(beta_schedule="cosine", prediction_type=pred)
    model, ts = toy_model(ours), make_timesteps(ours, 10, spacing)

    def steps(sampler, **kw):
        return torch.stack(step_outputs(sampler, model, noise(3), ours, ts, **kw))

    assert maxdiff(steps(sample_euler), steps(sample_ddim)) <= 1e-11
    euler_a = steps(sample_euler_ancestral, generator=torch.Generator().manual_seed(8))
    assert maxdiff(euler_a, steps(sample_ddim, eta=1.0, generator=torch.Generator().manual_seed(8))) <= 1e-11


@pytest.mark.parametrize("n", [1, 2, 10])
def test_heun_evaluates_the_network_where_diffusers_does(n):
    """2n - 1 evaluations: at each listed timestep, then again at the next one for the correction, except
    after the last (to sigma = 0, a plain Euler step). diffusers' timesteps t0, t1, t1, t2, t2, ... say the same."""
    ours = DDPMScheduler(prediction_type="v_prediction")
    ts, seen = make_timesteps(ours, n), []
    model = toy_model(ours)
    sample_heun(lambda x, t: seen.append(t[0].item()) or model(x, t), noise(), ours, ts)
    ref, _ = karras_ref("heun", ours, ts)
    assert len(seen) == 2 * n - 1 and seen == ref.timesteps.tolist()


def test_heun_is_second_order_and_euler_first():
    """Gaussian data x_0 ~ N(mu, s^2): the exact denoiser is D(x~; sigma) = mu + (x~ - mu) s^2 / (s^2 + sigma^2),
    and the exact ODE solution x~(sigma) = mu + (x~(sigma_T) - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma_T^2)).
    Halving the step (t = 999 down to 99 in 9, 18, 36 steps) halves Euler's error and quarters Heun's
    (Karras et al. sec. 3: local errors O(h^2) and O(h^3)). Measured at t = 99, before the last jump to sigma = 0."""
    ours = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="sample")
    ab, mu, s2 = ours.tables()["alphas_cumprod"], 0.3, 0.25

    def exact(x, t):
        sigma2 = ((1 - ab[t]) / ab[t]).view(-1, 1, 1, 1)
        return mu + (x / ab[t].sqrt().view(-1, 1, 1, 1) - mu) * s2 / (s2 + sigma2)

    sig2 = (1 - ab) / ab
    want = (mu + (noise() / ab[999].sqrt() - mu) * ((s2 + sig2[99]) / (s2 + sig2[999])).sqrt()) * ab[99].sqrt()
    errors = {}
    for name in ("euler", "heun"):
        for n in (9, 18, 36):
            xs = step_outputs(SAMPLERS[name], exact, noise(), ours, torch.linspace(999, 99, n + 1).round().long())
            errors[name, n] = maxdiff(xs[n - 1], want)  # x at t = 99
    for n in (9, 18):
        assert 1.8 < errors["euler", n] / errors["euler", 2 * n] < 2.2
        assert 3.6 < errors["heun", n] / errors["heun", 2 * n] < 4.6
        assert errors["heun", n] < errors["euler", n] / 3


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun"])
def test_karras_float32_loop_against_diffusers_own_tables(name):
    """diffusers' own float32 sigmas and trailing timesteps (the same as ours), our float32 latents."""
    beta = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    ours = DDPMScheduler(**beta)
    ref = KARRAS[name](timestep_spacing="trailing", **beta)
    ref.set_timesteps(20)
    model, ts = toy_model(ours), make_timesteps(ours, 20)
    assert ref.timesteps.unique_consecutive().tolist() == ts.tolist()
    x_ve = noise(4, torch.float32) / ours.tables(torch.float32)["alphas_cumprod"][999].sqrt()
    g = torch.Generator().manual_seed(2)
    for t in ref.timesteps:
        x_ve = karras_ref_step(ref, model, x_ve, t, g if name == "euler_a" else None)
    kw = {"generator": torch.Generator().manual_seed(2)} if name == "euler_a" else {}
    got = sample(name, model, noise(4, torch.float32), ours, 20, **kw)
    assert got.dtype == torch.float32 and maxdiff(got, x_ve) <= 1e-4


# ---- every sampler, every prediction type ------------------------------------------------------------


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_exact_denoiser_recovers_the_data(name, pred):
    """With data concentrated on one point c, the exact denoiser's x0 is c at every t, so every sampler
    must return c (the last step lands on alpha-bar = 1)."""
    s = DDPMScheduler(num_timesteps=50, prediction_type=pred)
    ab = s.tables()["alphas_cumprod"]

    def exact(x, t):
        a, sig = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
        eps = (x - a * 0.3) / sig
        return {"epsilon": eps, "v_prediction": a * eps - sig * 0.3, "sample": torch.full_like(x, 0.3)}[pred]

    out = sample(name, exact, noise(), s, 7, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert maxdiff(out, torch.full(SHAPE, 0.3, dtype=torch.float64)) <= 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_zero_terminal_snr_first_step_is_finite(name, dtype):
    """With alpha-bar_{T-1} = 0 the VE sigma of the first step is infinite (and DPM-Solver's lambda); the
    samplers that need it finite use 2**-24, as diffusers does. The first step from pure noise stays finite."""
    s = DDPMScheduler(prediction_type="v_prediction", rescale_zero_terminal_snr=True)
    assert s.tables()["alphas_cumprod"][-1] == 0
    steps = []
    out = sample(name, toy_model(s), noise(dtype=dtype), s, 10, eta=1.0, generator=torch.Generator().manual_seed(0),
                 callback=lambda i, t, x, x0: steps.append((t, x, x0)))
    t, x, x0 = steps[0]
    assert t == T - 1 and torch.isfinite(x).all() and torch.isfinite(x0).all() and torch.isfinite(out).all()
    assert maxdiff(out, torch.full(SHAPE, 0.5)) < 0.2  # near toy_model's x0 = 0.5 + 0.1 sin(x) cos(t / T)


def test_sampler_names_are_the_registry():
    """The configs' Literal (in a module that does not import torch) names exactly the registered samplers."""
    assert get_args(SamplerName) == tuple(SAMPLERS)


def test_sample_registry_and_full_ddpm_chain():
    s = DDPMScheduler(num_timesteps=20)
    with pytest.raises(ValueError, match="'ddpm', 'ddim', 'dpmpp', 'euler', 'euler_a', 'heun'"):
        sample("lms", toy_model(s), noise(), s, 10)
    seen = []
    sample("ddpm", toy_model(s), noise(), s, 20, generator=torch.Generator().manual_seed(0),
           callback=lambda i, t, x, x0: seen.append(t))
    assert seen == list(range(19, -1, -1))


def test_custom_scheduler_with_a_sampler():
    s = CustomScheduler(num_timesteps=100, prediction_type="v_prediction")
    out = sample("dpmpp", toy_model(s, c=0.2), noise(), s, 10)
    assert torch.isfinite(out).all() and maxdiff(out, torch.full(SHAPE, 0.2, dtype=torch.float64)) < 0.2


# ---- classifier-free guidance ------------------------------------------------------------------------


class CountingNet:
    """net(x, t, context, mask) whose output differs between cond and uncond on every channel."""

    def __init__(self):
        self.calls, self.batches = 0, []

    def __call__(self, x, t, context=None, mask=None):
        self.calls += 1
        self.batches.append(x.shape[0])
        assert mask is None
        return x * context.view(-1, 1, 1, 1) + 0.01 * t.view(-1, 1, 1, 1)


def test_cfg_is_one_batched_forward_guiding_every_channel():
    net, x, t = CountingNet(), noise(), torch.tensor([10, 20])
    c, u = torch.tensor([2.0, 3.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)  # uncond broadcast
    fn = classifier_free_guidance(net, {"context": c, "mask": None}, {"context": u, "mask": None}, scale=4.0)
    out = fn(x, t)
    assert net.calls == 1 and net.batches == [4]
    oc, ou = CountingNet()(x, t, c), CountingNet()(x, t, u.expand(2))
    want = ou + 4.0 * (oc - ou)
    for ch in range(SHAPE[1]):  # pitfall 5: all channels, not [:, :3]
        assert maxdiff(out[:, ch], want[:, ch]) <= 1e-12


def test_cfg_scale_one_is_the_conditional_model_alone():
    net, x, t = CountingNet(), noise(), torch.tensor([10, 20])
    c = torch.tensor([2.0, 3.0], dtype=torch.float64)
    fn = classifier_free_guidance(net, {"context": c, "mask": None}, {"context": c * 0, "mask": None}, scale=1.0)
    assert torch.equal(fn(x, t), CountingNet()(x, t, c)) and net.batches == [2]


def test_cfg_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        rescale_noise_cfg,
    )

    net, x, t = CountingNet(), noise(), torch.tensor([10, 20])
    c, u = torch.tensor([2.0, 3.0], dtype=torch.float64), torch.tensor([0.5, 0.1], dtype=torch.float64)
    plain = classifier_free_guidance(net, {"context": c}, {"context": u}, 7.5)(x, t)
    for r in (0.0, 0.7, 1.0):
        got = classifier_free_guidance(net, {"context": c}, {"context": u}, 7.5, rescale=r)(x, t)
        assert maxdiff(got, rescale_noise_cfg(plain, net(x, t, c), guidance_rescale=r)) <= 1e-12
    full = classifier_free_guidance(net, {"context": c}, {"context": u}, 7.5, rescale=1.0)(x, t)
    assert torch.allclose(full.std(dim=(1, 2, 3)), net(x, t, c).std(dim=(1, 2, 3)))  # eq. 15: std restored


def test_cfg_rejects_mismatched_conditions():
    net = CountingNet()
    with pytest.raises(ValueError, match="same keys"):
        classifier_free_guidance(net, {"context": torch.ones(1)}, {}, 3.0)
    with pytest.raises(ValueError, match="both be None"):
        classifier_free_guidance(net, {"context": torch.ones(1)}, {"context": None}, 3.0)
