"""Tiny-config tests of the KL autoencoder (diffusion.models.vae)."""

import pytest
import torch

from diffusion.config import ConfigError
from diffusion.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig


def tiny(channel_mult=(1, 2, 2), **kw) -> AutoencoderKL:
    torch.manual_seed(0)
    cfg = VAEConfig(base_channels=8, channel_mult=channel_mult, num_res_blocks=1, norm_groups=4, **kw)
    return AutoencoderKL(cfg)


@pytest.mark.parametrize("channel_mult, factor", [((1, 2, 2), 4), ((1, 2, 2, 2), 8)])
def test_round_trip_shapes(channel_mult, factor):
    vae = tiny(channel_mult)
    assert vae.downsample_factor == factor
    x = torch.rand(2, 3, 32, 16) * 2 - 1
    posterior = vae.encode(x)
    assert posterior.mean.shape == (2, 4, 32 // factor, 16 // factor)
    assert posterior.logvar.shape == posterior.mean.shape
    recon, post = vae(x)
    assert recon.shape == x.shape
    assert vae.decode(posterior.mode()).shape == x.shape


def test_size_not_divisible_refused():
    vae = tiny()
    with pytest.raises(ValueError, match=r"30x32.*4"):
        vae.encode(torch.zeros(1, 3, 30, 32))


def test_kl_zero_for_standard_normal_and_positive_otherwise():
    zeros = torch.zeros(2, 4, 3, 3)
    assert torch.equal(DiagonalGaussian(zeros, zeros).kl(), torch.zeros(2))
    kl = DiagonalGaussian(zeros + 0.5, zeros - 1.0).kl()
    assert kl.shape == (2,) and (kl > 0).all()
    # Closed form for one dim: 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2), summed over 36 dims.
    expected = 36 * 0.5 * (0.25 + torch.exp(torch.tensor(-1.0)) - 1 + 1)
    torch.testing.assert_close(kl, expected.expand(2))
    # bf16 moments (autocast): summed in float32, so only the inputs' rounding remains (a bf16 sum of
    # 4096 terms would be off by about its last place, ~1 in 256).
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 4, 32, 32, generator=g)
    half = DiagonalGaussian(mean.bfloat16(), logvar.bfloat16()).kl()
    exact = DiagonalGaussian(mean.bfloat16().float(), logvar.bfloat16().float()).kl()
    assert half.dtype == torch.float32 and torch.equal(half, exact)


def test_logvar_is_clamped():
    g = DiagonalGaussian(torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 100.0), clamp=(-30.0, 20.0))
    assert g.logvar.item() == 20.0 and torch.isfinite(g.std).all()


def test_sample_reproducible_with_generator():
    vae = tiny().eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    post = vae.encode(x)
    a = post.sample(torch.Generator().manual_seed(3))
    b = post.sample(torch.Generator().manual_seed(3))
    c = post.sample(torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    r1, _ = vae(x, generator=torch.Generator().manual_seed(3))
    r2, _ = vae(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(r1, r2)
    assert torch.equal(post.mode(), post.mean)


@pytest.mark.parametrize("kw", [{}, {"mid_attention": False, "quant_conv": False}, {"gradient_checkpointing": True}])
def test_gradient_reaches_every_parameter(kw):
    vae = tiny(**kw).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, post = vae(x, generator=torch.Generator().manual_seed(0))
    # Squared error (not a plain sum, whose gradient through the final GroupNorm is degenerate) plus KL.
    ((recon - x).pow(2).mean() + post.kl().mean()).backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_same_gradients(monkeypatch):
    import diffusion.models.vae as vae_module

    calls = []
    real = vae_module.checkpoint
    monkeypatch.setattr(vae_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    grads = []
    for flag in (False, True):
        vae = tiny(gradient_checkpointing=flag).train()
        recon, _ = vae(x, sample_posterior=False)
        recon.pow(2).sum().backward()
        grads.append(vae.encoder.conv_in.weight.grad)
        assert bool(calls) == flag  # the flag really routes the blocks through checkpoint
    torch.testing.assert_close(grads[0], grads[1])



def test_cpu_channels_last_path_gives_the_nchw_results(monkeypatch):
    """On a CPU the towers run in NHWC (vae._cpu_channels_last): the same posterior, image and gradients as in
    NCHW up to float rounding, and the outputs come back in the NCHW layout the callers index."""
    import diffusion.models.vae as vae_module

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    runs = []
    for layout in ("nhwc", "nchw"):
        if layout == "nchw":
            monkeypatch.setattr(vae_module, "_cpu_channels_last", lambda t: t)
        vae = tiny().train()
        inner = []  # the layout inside the towers
        for conv in (vae.encoder.conv_in, vae.decoder.conv_in):
            conv.register_forward_hook(lambda m, i, o: inner.append(o.is_contiguous(memory_format=torch.channels_last)))
        posterior = vae.encode(x)
        recon = vae.decode(posterior.mode())
        recon.pow(2).sum().backward()
        assert inner == [layout == "nhwc"] * 2
        assert recon.is_contiguous() and posterior.mean.stride()[1:] == (16, 4, 1)  # NCHW, (B, 2C, h, w) chunked
        runs.append((posterior.mean, posterior.logvar, recon, [p.grad for p in vae.parameters()]))
    (m1, v1, r1, g1), (m2, v2, r2, g2) = runs
    for a, b in [(m1, m2), (v1, v2), (r1, r2)]:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g2):  # sums over every pixel: rounding grows
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"base_channels": 8, "norm_groups": 3}, "norm_groups"),
        ({"channel_mult": []}, "channel_mult"),
        ({"channel_mult": [1, 0]}, "channel_mult"),
        ({"logvar_clamp": [5.0, -5.0]}, "logvar_clamp"),
        ({"logvar_clamp": [-5.0]}, "logvar_clamp"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"num_res_blocks": "two"}, "num_res_blocks"),
        ({"latent_channels": 4}, "latent_channels"),
    ],
)
def test_bad_config_names_key(data, key):
    with pytest.raises(ConfigError, match=key):
        VAEConfig.from_dict(data, "train_vae.model")


def test_logvar_init_starts_the_posterior_narrow():
    """logvar_init sets the log-variance output's bias: the untrained posterior is nearly a point, while the
    default init gives a posterior about as wide as the prior."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    small = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    narrow = AutoencoderKL(VAEConfig(**small, logvar_init=-8.0)).encode(x)
    wide = AutoencoderKL(VAEConfig(**small)).encode(x)
    assert narrow.logvar.mean().item() < -6.0
    assert abs(wide.logvar.mean().item()) < 2.0
    without_quant = AutoencoderKL(VAEConfig(**small, quant_conv=False, logvar_init=-8.0)).encode(x)
    assert without_quant.logvar.mean().item() < -6.0


def test_posterior_sample_has_the_posteriors_mean_and_std():
    """z = mean + std * eps: a sample drawn with the variance for the std (or the log-variance) passed the
    reproducibility test, and the latent statistics test draws its expected value the same way."""
    import math

    from diffusion.models.vae import DiagonalGaussian

    mean = torch.full((2, 4, 64, 64), 0.5)
    z = DiagonalGaussian(mean, torch.full_like(mean, math.log(0.25))).sample(torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 0.5) < 0.01 and abs(z.std().item() - 0.5) < 0.01  # std 0.5, not var 0.25
