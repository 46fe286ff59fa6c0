"""LatentDiffusionModel at tiny sizes: the seed's usage, sampling, guidance, the registry, save/load."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from diffusion.config import Config, ConfigError, param
from diffusion.data.tokenizer import null_tokens, trim_padding
from diffusion.models import DENOISERS, LatentDiffusionModel, UNetConfig, register_denoiser
from diffusion.samplers import SAMPLERS
from diffusion.scheduler import DDPMScheduler

TEXT = {"max_length": 16, "width": 32, "depth": 1, "num_heads": 2}
VAE = {"base_channels": 8, "channel_mult": (1, 2, 2), "num_res_blocks": 1, "norm_groups": 4}  # factor 4
TINY = {
    "unet": {"base_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_levels": (1,),
             "num_heads": 2, "norm_groups": 4},
    "dit": {"input_size": 8, "patch_size": 2, "hidden_size": 32, "depth": 1, "num_heads": 2},
}


def make(denoising_type: str = "unet", seed: int = 0, **kw) -> LatentDiffusionModel:
    torch.manual_seed(seed)
    model = LatentDiffusionModel(vocab_size=100, denoising_type=denoising_type, text_encoder=TEXT, vae=VAE,
                                 denoiser=TINY.get(denoising_type), **kw)
    # The denoisers start with zero output layers (they predict 0); perturb every weight so that the text,
    # the guidance and the weights matter in these tests.
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tokens(batch: int = 2, length: int = 16) -> torch.Tensor:
    out = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        out[b, : 4 + b] = torch.tensor([2, *range(10 + b, 12 + 2 * b), 3])
    return out


def generate(model, toks=None, seed=0, **kw):
    kw = {"num_inference_steps": 3, "guidance_scale": 7.5, "image_size": (32, 32), **kw}
    return model.generate(text_tokens=tokens() if toks is None else toks, scheduler=DDPMScheduler(num_timesteps=1000),
                          generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("denoising_type", ["unet", "dit"])
def test_seed_usage(denoising_type):
    model = LatentDiffusionModel(vocab_size=100, denoising_type=denoising_type, text_encoder=TEXT, vae=VAE,
                                 denoiser=TINY[denoising_type])
    images = model.generate(text_tokens=tokens(), scheduler=DDPMScheduler(num_timesteps=1000),
                            num_inference_steps=3, guidance_scale=7.5, image_size=(32, 32))
    assert images.shape == (2, 3, 32, 32)
    assert images.min() >= 0 and images.max() <= 1 and torch.isfinite(images).all()


@pytest.mark.parametrize("denoising_type", ["unet", "dit"])
def test_deterministic_with_seeded_generator(denoising_type):
    model = make(denoising_type)
    a, b, c = generate(model, sampler="ddpm"), generate(model, sampler="ddpm"), generate(model, sampler="ddpm", seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp", "euler", "heun"])
def test_deterministic_samplers_draw_the_same_images_in_any_batching(sampler):
    """x_T is drawn image by image: three images from one generator are the same in one batch as in two. With
    3x6x6 latents (108 values, not a multiple of torch's 16-value CPU block) one draw of (3, 3, 6, 6) differs from
    a draw of (2, 3, 6, 6) then (1, 3, 6, 6)."""
    torch.manual_seed(0)
    model = LatentDiffusionModel(vocab_size=100, denoising_type="dit", text_encoder=TEXT, vae={**VAE, "latent_dim": 3},
                                 denoiser={**TINY["dit"], "input_size": 6}).eval()
    toks = tokens(3)
    kw = {"scheduler": DDPMScheduler(num_timesteps=1000), "num_inference_steps": 3, "guidance_scale": 2.0,
          "image_size": (24, 24), "sampler": sampler}
    together = model.generate(text_tokens=toks, generator=torch.Generator().manual_seed(0), **kw)
    g = torch.Generator().manual_seed(0)
    apart = torch.cat([model.generate(text_tokens=toks[:2], generator=g, **kw),
                       model.generate(text_tokens=toks[2:], generator=g, **kw)])
    torch.testing.assert_close(together, apart, rtol=0, atol=1e-5)  # batched kernels may round differently


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_each_sampler(sampler):
    images = generate(make(), sampler=sampler, eta=0.5 if sampler == "ddim" else 0.0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_the_sampler_and_eta_decide_the_images():
    """Same model and seed: each sampler gives other images, and DDIM's eta changes its path (so neither option
    can be ignored by generate). Except two pairs, the same updates written in the VE form (diffusion.samplers):
    euler is DDIM with eta = 0, and euler_a DDPM's posterior drawing the same noise; they agree to rounding."""
    model = make()
    images = {s: generate(model, sampler=s) for s in sorted(SAMPLERS)}
    names = sorted(images)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if (a, b) in (("ddim", "euler"), ("ddpm", "euler_a")):
                torch.testing.assert_close(images[a], images[b], rtol=0, atol=1e-4)
            else:
                assert (images[a] - images[b]).abs().max() > 1e-3, (a, b)
    assert not torch.equal(generate(model, sampler="ddim", eta=0.5), images["ddim"])


def test_unknown_sampler_refused():
    with pytest.raises(ValueError, match="ddim"):
        generate(make(), sampler="lms")


def test_guidance_batches_and_null_caption():
    model = make()
    batches = []
    model.denoiser.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    generate(model, guidance_scale=1.0)
    assert batches == [2, 2, 2]  # guidance 1: the conditional model only
    batches.clear()
    guided = generate(model)
    assert batches == [4, 4, 4]  # one batched forward of cond and uncond per step
    explicit = generate(model, uncond_tokens=model.null_tokens(2, 16))
    torch.testing.assert_close(guided, explicit)  # the default unconditional input is the null caption
    other = generate(model, uncond_tokens=tokens()[1:])
    assert not torch.allclose(guided, other)


def test_null_tokens():
    assert make().null_tokens(2, 5).tolist() == [[2, 3, 0, 0, 0]] * 2


@pytest.mark.parametrize("size", [(30, 32), (32, 36), 20])
def test_bad_size_refused_before_work(size, monkeypatch):
    model = make()  # VAE factor 4 times U-Net factor 2 = 8
    calls = []
    monkeypatch.setattr(model.text_encoder, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=r"\d+x\d+.*8"):
        generate(model, image_size=size)
    assert calls == []


def test_unknown_denoising_type():
    with pytest.raises(ValueError, match="unet.*dit"):
        LatentDiffusionModel(vocab_size=100, denoising_type="transformer")


def test_widths_set_consistently_and_contradictions_refused():
    model = make("dit")
    assert model.denoiser_config.context_dim == TEXT["width"]
    assert model.denoiser_config.in_channels == model.vae.cfg.latent_dim
    assert model.text_encoder.cfg.vocab_size == 100
    # A config instance whose fields are at their defaults is filled in, not refused.
    built = LatentDiffusionModel(100, "unet", TEXT, VAE, UNetConfig(**TINY["unet"]))
    assert built.denoiser_config.context_dim == 32
    for kw, key in [
        ({"denoiser": {**TINY["unet"], "context_dim": 64}}, "denoiser.context_dim"),
        ({"denoiser": UNetConfig(**TINY["unet"], in_channels=3)}, "denoiser.in_channels"),
        ({"text_encoder": {**TEXT, "vocab_size": 50}}, "text_encoder.vocab_size"),
        ({"vae": {**VAE, "norm_groups": 3}}, "vae.norm_groups"),
    ]:
        args = {"text_encoder": TEXT, "vae": VAE, "denoiser": TINY["unet"], **kw}
        with pytest.raises(ConfigError, match=key):
            LatentDiffusionModel(100, "unet", **args)


def test_latents_scaling_and_training_forward():
    model = make(latent_scale=2.0, latent_shift=0.5)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = model.encode_images(x, sample=False)
    assert z.shape == (2, 4, 8, 8)
    torch.testing.assert_close(z, (model.vae.encode(x).mean - 0.5) * 2.0)
    torch.testing.assert_close(model.decode_latents(z), model.vae.decode(z / 2.0 + 0.5).clamp(-1, 1))
    out = model(z, torch.tensor([10, 500]), tokens())
    assert out.shape == z.shape
    states, mask, pooled = model.encode_text(tokens())
    assert states.shape == (2, 16, 32) and pooled.shape == (2, 32) and mask.sum().item() == 4 + 5


@pytest.mark.parametrize("denoising_type", ["unet", "dit"])
def test_trimmed_padding_gives_the_same_prediction(denoising_type):
    """Loaders drop the padding columns every caption of a batch shares (trim_padding): the text states of
    the real tokens, the pooled EOS state and so the denoiser's prediction do not change."""
    model = make(denoising_type)
    full = tokens()  # (2, 16), the longest caption 5 tokens
    trimmed = trim_padding(full)
    assert trimmed.shape == (2, 5) and torch.equal(trimmed, full[:, :5])
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    torch.testing.assert_close(model(z, t, trimmed), model(z, t, full), atol=1e-5, rtol=1e-5)
    assert trim_padding(null_tokens(16, 3)).shape == (3, 2)  # [BOS, EOS]: never shorter


@pytest.mark.parametrize("denoising_type", ["unet", "dit"])
def test_save_load_round_trip(denoising_type, tmp_path):
    model = make(denoising_type, latent_scale=0.7)
    model.save_pretrained(tmp_path)
    loaded = LatentDiffusionModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert torch.equal(generate(model), generate(loaded))


@dataclass(frozen=True)
class TinyConfig(Config):
    in_channels: int = param(4, "latent channels")
    context_dim: int = param(256, "text width")


class TinyDenoiser(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cfg.in_channels, cfg.in_channels, 3, padding=1)
        self.text = nn.Linear(cfg.context_dim, cfg.in_channels)

    def forward(self, x, t, context, context_mask=None, pooled=None):
        return self.conv(x) + self.text(pooled)[:, :, None, None]


def test_registered_custom_denoiser(tmp_path):
    register_denoiser("tiny", TinyConfig, TinyDenoiser)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_denoiser("tiny", TinyConfig, TinyDenoiser)
        model = LatentDiffusionModel(vocab_size=100, denoising_type="tiny", text_encoder=TEXT, vae=VAE)
        assert model.denoiser_config == TinyConfig(in_channels=4, context_dim=32)
        images = generate(model)
        assert images.shape == (2, 3, 32, 32)
        model.save_pretrained(tmp_path)
        assert torch.equal(generate(LatentDiffusionModel.from_pretrained(tmp_path)), images)
    finally:
        DENOISERS.pop("tiny", None)
    assert "tiny" not in DENOISERS


def test_register_refuses_config_without_the_set_fields():
    @dataclass(frozen=True)
    class NoContext(Config):
        in_channels: int = param(4, "latent channels")

    with pytest.raises(TypeError, match="context_dim"):
        register_denoiser("bad", NoContext, TinyDenoiser)
    assert "bad" not in DENOISERS


@pytest.mark.parametrize("denoising_type", ["unet", "dit"])
def test_generate_projects_the_text_once_per_run(denoising_type, monkeypatch):
    """generate() reuses each cross-attention's text keys and values over the steps (layers.reuse_text_keys_values)
    and draws exactly the images it draws without that reuse."""
    from contextlib import nullcontext

    from diffusion.models import diffusion_model
    from diffusion.models.layers import Attention

    model = make(denoising_type)
    cross = [m for m in model.denoiser.modules() if isinstance(m, Attention) and m.is_cross]
    calls = []
    for m in cross:
        m.to_kv.register_forward_hook(lambda *_: calls.append(1))
    reused = generate(model, num_inference_steps=4)
    assert len(calls) == len(cross)  # 4 guided steps, one projection of the (cond + uncond) text each
    monkeypatch.setattr(diffusion_model, "reuse_text_keys_values", lambda _: nullcontext())
    calls.clear()
    plain = generate(model, num_inference_steps=4)
    assert len(calls) == 4 * len(cross)
    assert torch.equal(reused, plain)


@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_generate_drops_padding_columns_and_draws_the_same_images(guidance_scale, monkeypatch):
    """The columns that are padding in every caption (and in the null caption) are not encoded: the text
    encoder sees the longest caption's length, and the images equal those drawn from the full padded tokens."""
    model = make("dit")
    seen = []
    model.text_encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    toks = tokens()  # rows of 4 and 5 real tokens, padded to 16
    trimmed = generate(model, toks, guidance_scale=guidance_scale)
    assert seen and set(seen) == {5}
    monkeypatch.setattr(LatentDiffusionModel, "_trim_padding", lambda self, t: t)
    seen.clear()
    padded = generate(model, toks, guidance_scale=guidance_scale)
    assert set(seen) == {16}
    torch.testing.assert_close(trimmed, padded, rtol=0, atol=1e-5)
    # A negative prompt longer than every caption sets the length.
    seen.clear()
    monkeypatch.undo()
    neg = toks.clone()
    neg[:, :8] = torch.tensor([2, 20, 21, 22, 23, 24, 25, 3])
    generate(model, toks, uncond_tokens=neg, guidance_scale=7.5)
    assert set(seen) == {8}


def test_generate_maps_the_decoders_range_to_the_unit_interval(monkeypatch):
    """The decoder gives [-1, 1] and generate (x + 1) / 2: a clamp to [0, 1] passed every range check."""
    model = make()

    def decode(z):  # -1, 0 and 1 in the three channels
        out = torch.zeros(z.shape[0], 3, z.shape[2] * 4, z.shape[3] * 4)
        out[:, 0], out[:, 2] = -1.0, 1.0
        return out

    monkeypatch.setattr(model, "decode_latents", decode)
    images = generate(model)
    assert images[:, 0].eq(0).all() and images[:, 1].eq(0.5).all() and images[:, 2].eq(1).all()


@pytest.mark.parametrize("denoising_type", ["unet", "dit"])
def test_guidance_scale_zero_is_the_unconditional_model(denoising_type):
    """s = 0 in eps_u + s (eps_c - eps_u) leaves the null caption's prediction: the images of a run that is
    given the null caption as its prompt, unguided. Swapping the two predictions would give the prompt's."""
    model = make(denoising_type)
    toks = tokens()
    unconditional = generate(model, toks, guidance_scale=0.0)
    null_prompt = generate(model, model.null_tokens(*toks.shape), guidance_scale=1.0)
    prompted = generate(model, toks, guidance_scale=1.0)
    torch.testing.assert_close(unconditional, null_prompt, atol=1e-5, rtol=0)
    assert (unconditional - prompted).abs().max() > 1e-3  # the text matters here, so the test can fail
