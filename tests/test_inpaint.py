"""Inpainting by latent blending (Blended Latent Diffusion, Avrahami et al. 2023): the network's input blended is
per-step blending, the kept region's latents are the input's, an all-ones mask is image to image.

The tiny model comes from tests/test_sample.py (random weights), as in tests/test_img2img.py.
"""

import numpy as np
import pytest
import torch
from test_img2img import init_latents
from test_sample import PROMPTS, SIDE, schedule_not_default, tiny_parts

from diffusion.data.tokenizer import encode
from diffusion.models.diffusion_model import _randn
from diffusion.models.layers import reuse_text_keys_values
from diffusion.samplers import img2img_timesteps, run_sampler
from diffusion.scheduler import DDPMScheduler

LATENT = (4, SIDE // 4, SIDE // 4)  # (C, h, w) of a SIDE image: the tiny VAE's factor is 4
STEPS, STRENGTH = 10, 0.7

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: two OpenMP threads on 2 busy cores crawl


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def latent_masks() -> torch.Tensor:
    """(2, 1, h, w): image 0 regenerates its left half, image 1 a 2x2 block in its lower right."""
    m = torch.zeros(len(PROMPTS), 1, *LATENT[1:])
    m[0, :, :, : LATENT[2] // 2] = 1
    m[1, :, 2:, 2:] = 1
    return m


def schedulers() -> dict[str, DDPMScheduler]:
    return {"linear": DDPMScheduler(num_timesteps=1000), "zero_snr_v": schedule_not_default()}


def generate(parts, scheduler, **kw) -> torch.Tensor:
    """LatentDiffusionModel.generate of the tiny `parts`: two prompts, STEPS steps, guidance 3, seed 0."""
    model, tok = parts
    args = {"text_tokens": encode(tok, PROMPTS), "scheduler": scheduler, "num_inference_steps": STEPS,
            "guidance_scale": 3.0, "image_size": SIDE, "generator": torch.Generator().manual_seed(0)}
    return model.generate(**{**args, **kw})


def decoded_latents(parts, monkeypatch, scheduler, **kw) -> torch.Tensor:
    """The latents generate hands to the decoder (its final x_0, after any blend)."""
    model = parts[0]
    seen, decode = [], model.decode_latents
    monkeypatch.setattr(model, "decode_latents", lambda z: seen.append(z.clone()) or decode(z))
    generate(parts, scheduler, **kw)
    monkeypatch.undo()
    return seen[0]


def per_step_blending(parts, scheduler, sampler, mask, x_known, eta=0.0):
    """The reference: Blended Latent Diffusion's Alg. 1 as diffusers' StableDiffusionInpaintPipeline runs it with a
    4-channel U-Net, x_s <- m * x_s + (1 - m) * add_noise(x_known, eps, s) after every step (x_known itself after the
    last), s the timestep the step went to. The blend is written into the sampler's own state, in place, from the
    step callback, so the sampler's unchanged code takes the blended state into its next step (and DPM-Solver++
    its x0 history from the blended input, as diffusers' does). Returns the result and the state after each step."""
    model, tok = parts
    generator = torch.Generator().manual_seed(0)
    eps = _randn((len(PROMPTS), *LATENT), generator, torch.device("cpu"))  # generate's draws, in its order
    ts = img2img_timesteps(scheduler, STEPS, STRENGTH).tolist()
    states = []

    def blend(i, t, x, x0):
        s = ts[i + 1] if i + 1 < len(ts) else None
        known = x_known if s is None else scheduler.add_noise(x_known, eps, torch.full((len(x),), s))
        x.copy_(mask * x + (1 - mask) * known)  # the paper's arithmetic form, not generate's torch.where
        states.append(x.clone())

    model_fn = model._model_fn(encode(tok, PROMPTS), None, 3.0, 0.0)
    x = scheduler.add_noise(x_known, eps, torch.full((len(PROMPTS),), ts[0]))
    with torch.no_grad(), reuse_text_keys_values(model.denoiser):
        out = run_sampler(sampler, model_fn, x, scheduler, torch.tensor(ts), generator=generator, eta=eta,
                          callback=blend)
    return out, states


# ---- the library -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "zero_snr_v"])
@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("dpmpp", 0.0)])
def test_blending_the_networks_input_is_blending_after_every_step(parts, monkeypatch, sampler, eta, schedule):
    """diffusion.inpainting's claim: the same state after every step (generate's callback shows the blended
    state), the same latents decoded, bit for bit, for deterministic samplers (ddim, dpmpp) and stochastic ones
    (ddpm, ddim with eta > 0: the same draws in the same order)."""
    scheduler, mask, x_known = schedulers()[schedule], latent_masks(), init_latents()
    ref, ref_states = per_step_blending(parts, scheduler, sampler, mask, x_known, eta)
    states = []
    final = decoded_latents(parts, monkeypatch, scheduler, sampler=sampler, eta=eta, init_latents=x_known,
                            strength=STRENGTH, mask=mask, callback=lambda i, t, x, x0: states.append(x))
    assert len(states) == len(ref_states) == int(STEPS * STRENGTH)
    for i, (ours, theirs) in enumerate(zip(states, ref_states)):
        assert torch.equal(ours, theirs), (i, (ours - theirs).abs().max())
    keep = mask.expand_as(ref) == 0
    assert torch.equal(final, ref) and torch.equal(states[-1], ref) and torch.equal(ref[keep], x_known[keep])
    # Not vacuous: the kept region's context changes the regenerated one (image to image's differs there).
    sdedit = []
    generate(parts, scheduler, sampler=sampler, eta=eta, init_latents=x_known, strength=STRENGTH,
             callback=lambda i, t, x, x0: sdedit.append(x))
    assert not torch.allclose(sdedit[-1][~keep], ref[~keep], atol=1e-3)


def test_blending_matches_ddim_written_out_by_hand(parts):
    """The same for DDIM (eta 0) without the samplers' code: Song et al. 2021 eq. 12, then the blend."""
    model, tok = parts
    scheduler, m, x_known = schedulers()["linear"], latent_masks(), init_latents()
    eps = _randn((len(PROMPTS), *LATENT), torch.Generator().manual_seed(0), torch.device("cpu"))
    ts = img2img_timesteps(scheduler, STEPS, STRENGTH).tolist()
    model_fn = model._model_fn(encode(tok, PROMPTS), None, 3.0, 0.0)
    ab = scheduler.alphas_cumprod  # (T,) float32

    def known(t):
        return scheduler.add_noise(x_known, eps, torch.full((len(PROMPTS),), t))

    x = known(ts[0])
    with torch.no_grad():
        for t, s in zip(ts, [*ts[1:], None]):
            t_batch = torch.full((len(PROMPTS),), t)
            x0, e = scheduler.to_x0_eps(model_fn(x, t_batch), x, t_batch)
            ab_s = ab[s] if s is not None else torch.tensor(1.0)
            x = ab_s.sqrt() * x0 + (1 - ab_s).sqrt() * e  # eq. 12, sigma = 0
            x = m * x + (1 - m) * (known(s) if s is not None else x_known)
    ours = []
    generate(parts, scheduler, sampler="ddim", init_latents=x_known, strength=STRENGTH, mask=m,
             callback=lambda i, t, x, x0: ours.append(x))
    torch.testing.assert_close(ours[-1], x, atol=1e-5, rtol=1e-5)


def test_outside_the_mask_the_latents_are_the_inputs_exactly(parts, monkeypatch):
    scheduler, mask, x_known = schedulers()["linear"], latent_masks(), init_latents()
    for sampler in ("ddim", "ddpm", "dpmpp"):
        z = decoded_latents(parts, monkeypatch, scheduler, sampler=sampler, init_latents=x_known, strength=STRENGTH,
                            mask=mask)
        keep = mask.expand_as(z) == 0
        assert torch.equal(z[keep], x_known[keep]), sampler
        assert not torch.allclose(z[~keep], x_known[~keep], atol=0.1), sampler  # regenerated inside


def test_all_ones_is_image_to_image_and_all_zeros_returns_the_input(parts, monkeypatch):
    scheduler, x_known = schedulers()["linear"], init_latents()
    for sampler in ("ddim", "ddpm", "dpmpp"):
        sdedit = generate(parts, scheduler, sampler=sampler, init_latents=x_known, strength=STRENGTH)
        ones = torch.ones(len(PROMPTS), 1, *LATENT[1:])
        assert torch.equal(generate(parts, scheduler, sampler=sampler, init_latents=x_known, strength=STRENGTH,
                                    mask=ones), sdedit), sampler
        # One (1, 1, h, w) mask for the batch, bool or float: the same as one per image.
        for same in (ones[:1], ones.bool(), ones[:1].bool()):
            assert torch.equal(generate(parts, scheduler, sampler=sampler, init_latents=x_known, strength=STRENGTH,
                                        mask=same), sdedit), sampler
    zeros = torch.zeros(1, 1, *LATENT[1:])
    z = decoded_latents(parts, monkeypatch, scheduler, init_latents=x_known, strength=STRENGTH, mask=zeros)
    assert torch.equal(z, x_known)
    model = parts[0]
    images = generate(parts, scheduler, init_latents=x_known, strength=STRENGTH, mask=zeros)
    with torch.no_grad():
        assert torch.equal(images, (model.decode_latents(x_known) + 1) / 2)


def test_the_library_refuses_bad_masks_naming_them(parts):
    scheduler, x_known = schedulers()["linear"], init_latents()
    with pytest.raises(ValueError, match="^mask: needs init_latents"):
        generate(parts, scheduler, mask=torch.ones(2, 1, *LATENT[1:]))
    h, w = LATENT[1:]
    for bad in (torch.ones(2, 4, h, w), torch.ones(3, 1, h, w), torch.ones(2, 1, h * 4, w * 4), torch.ones(1, h, w),
                np.ones((2, 1, h, w)), [[1.0]]):
        with pytest.raises(ValueError, match=rf"^mask: expected a tensor of shape \(2, 1, {h}, {w}\) or \(1, 1,"):
            generate(parts, scheduler, init_latents=x_known, strength=0.5, mask=bad)
    with pytest.raises(ValueError, match="^mask: expected 0s and 1s only"):
        generate(parts, scheduler, init_latents=x_known, strength=0.5, mask=torch.full((1, 1, h, w), 0.5))
