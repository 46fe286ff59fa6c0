"""Inpainting by latent blending (Blended Latent Diffusion, Avrahami et al. 2023): the network's input blended is
per-step blending, the kept region's latents are the input's, an all-ones mask is image to image, the mask read and
reduced to the latent grid, the pipeline's ``mask_image=`` and ``cli.py sample --mask``.

The tiny model and its folder come from tests/test_sample.py (random weights), as in tests/test_img2img.py.
"""

import warnings

import numpy as np
import pytest
import torch
from conftest import broken_model_dir, run_cli
from PIL import Image
from test_img2img import gradient_image, init_latents
from test_sample import PROMPTS, SIDE, schedule_not_default, tiny_parts

from diffusion.data.tokenizer import encode
from diffusion.inpainting import latent_mask
from diffusion.input_images import read_masks, to_model_input, to_pixel_mask
from diffusion.model_spec import SampleOptionError
from diffusion.models.diffusion_model import _randn
from diffusion.models.layers import reuse_text_keys_values
from diffusion.pipeline_model import TextToImagePipeline, images_to_grid
from diffusion.samplers import run_sampler
from diffusion.scheduler import DDPMScheduler
from diffusion.timesteps import img2img_timesteps

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


@pytest.mark.parametrize("schedule", ["linear", "zero_snr_v"])
def test_the_variance_exploding_samplers_inpaint_as_their_ddim_twins(parts, monkeypatch, schedule):
    """euler and euler_a keep their state as x / sqrt(alpha-bar), so the in-place reference above cannot reach it;
    but they are DDIM with eta 0 and 1 written in that form (samplers.sample_euler), and blending the network's
    input is the same for any sampler whose update is elementwise: their inpainted latents are DDIM's, to
    rounding. heun evaluates the network between listed timesteps (the module docstring's second limit): it still
    keeps the input exactly outside the mask."""
    scheduler, mask, x_known = schedulers()[schedule], latent_masks(), init_latents()
    kw = {"init_latents": x_known, "strength": STRENGTH, "mask": mask}
    for sampler, twin, eta in (("euler", "ddim", 0.0), ("euler_a", "ddim", 1.0)):
        ours = decoded_latents(parts, monkeypatch, scheduler, sampler=sampler, **kw)
        theirs = decoded_latents(parts, monkeypatch, scheduler, sampler=twin, eta=eta, **kw)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4, msg=sampler)
    heun = decoded_latents(parts, monkeypatch, scheduler, sampler="heun", **kw)
    keep = mask.expand_as(heun) == 0
    assert torch.equal(heun[keep], x_known[keep]) and torch.isfinite(heun).all()


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


# ---- the mask image -------------------------------------------------------------------------------------


def test_a_single_masked_pixel_marks_its_latent_cell():
    pixels = np.zeros((SIDE, SIDE), np.uint8)
    pixels[5, 9] = 128  # the threshold: white from 128 up
    pixels[13, 2] = 127  # just under it: kept
    pixel_mask = to_pixel_mask([Image.fromarray(pixels)], (SIDE, SIDE))
    assert pixel_mask.shape == (1, 1, SIDE, SIDE) and pixel_mask.sum() == 1 and pixel_mask[0, 0, 5, 9] == 1
    cells = latent_mask(pixel_mask, 4)  # the tiny VAE's factor
    expected = torch.zeros(1, 1, SIDE // 4, SIDE // 4)
    expected[0, 0, 5 // 4, 9 // 4] = 1
    assert torch.equal(cells, expected)
    # A mask of another size is resized to the sampling size first (Lanczos, then the threshold).
    big = np.zeros((2 * SIDE, 2 * SIDE), np.uint8)
    big[: SIDE, : SIDE] = 255  # the top-left quarter
    resized = latent_mask(to_pixel_mask([Image.fromarray(big)], (SIDE, SIDE)), 4)
    assert resized[0, 0, :2, :2].eq(1).all() and resized.sum() == 4


def test_masks_are_read_as_grayscale_from_images_or_paths(tmp_path):
    rgb = Image.new("RGB", (SIDE, SIDE), (255, 255, 255))
    rgb.save(tmp_path / "white.png")
    masks = read_masks([rgb, tmp_path / "white.png"], 2)
    assert [m.mode for m in masks] == ["L", "L"]
    assert to_pixel_mask(masks, (SIDE, SIDE)).eq(1).all()


# ---- the pipeline ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(parts) -> TextToImagePipeline:
    model, tok = parts
    return TextToImagePipeline.from_components(model, tok, DDPMScheduler(num_timesteps=1000), image_size=SIDE)


def corner_mask(side: int, corner: int) -> Image.Image:
    """White (regenerate) in the top-left `corner` x `corner` pixels of a `side` square."""
    pixels = np.zeros((side, side), np.uint8)
    pixels[:corner, :corner] = 255
    return Image.fromarray(pixels)


def per_cell_decoder(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, 3, 4h, 4w): each 4 x 4 pixel block a function of its own latent cell only."""
    return torch.nn.functional.interpolate(z[:, :3], scale_factor=4, mode="nearest").tanh()


def test_pipeline_keeps_the_round_trip_outside_the_mask_cell_for_cell(pipe, monkeypatch):
    """Outside the mask the output is the decoder's image of the input's own latents, the VAE round trip; inside,
    new pixels, cell for cell where the mask's white pixels are (not transposed, not shifted).

    Through a decoder whose pixels see only their own latent cell: a real decoder's receptive field, and its
    GroupNorm's statistics over the whole image, carry the new latents past the mask's edge, so with it the kept
    pixels equal the round trip only approximately, best away from the mask. The tiny test VAE, with random weights,
    does not show even that: its decoder is no image model, and the random denoiser's latents are far from the
    input's (measured: 4 to 7 latent cells from the mask, pixels 6 to 75 levels off the round trip on average)."""
    monkeypatch.setattr(pipe.model.vae, "decode", per_cell_decoder)
    side = 32  # 8 x 8 latent cells
    image = gradient_image(side, side)
    pixels = np.zeros((side, side), np.uint8)
    pixels[5, 21] = 255  # one white pixel: latent cell (1, 5)
    pixels[16:24, 0:3] = 200  # a 8 x 3 strip: cells (4, 0) and (5, 0)
    opts = {"steps": 10, "seed": 3, "progress": False, "image_size": side, "strength": 1.0}
    out = pipe.generate(PROMPTS[:1], image=image, mask_image=Image.fromarray(pixels), **opts)[0]  # (H, W, 3)
    x = to_model_input([image], (side, side))
    round_trip = ((pipe.model.reconstruct(x) + 1) * 127.5).round()[0].permute(1, 2, 0).byte().numpy()  # (H, W, 3)
    changed = (out != round_trip).any(-1).reshape(8, 4, 8, 4).any(axis=(1, 3))  # (8, 8): a cell with a new pixel
    expected = np.zeros((8, 8), bool)
    expected[1, 5] = expected[4, 0] = expected[5, 0] = True
    assert np.array_equal(changed, expected), changed.astype(int)


def test_pipeline_all_white_is_image_to_image_and_masks_per_prompt(pipe, tmp_path):
    image, n = gradient_image(), 2
    opts = {"steps": 4, "seed": 3, "progress": False, "num_images_per_prompt": n, "strength": 0.75}
    white = Image.new("L", (SIDE, SIDE), 255)
    assert np.array_equal(pipe.generate(PROMPTS, image=image, mask_image=white, **opts),
                          pipe.generate(PROMPTS, image=image, **opts))
    corner = corner_mask(SIDE, 4)
    corner.save(tmp_path / "corner.png")
    shared = pipe.generate(PROMPTS, image=image, mask_image=corner, **opts)
    for same in ([corner], tmp_path / "corner.png", [corner, str(tmp_path / "corner.png")], corner.convert("RGB")):
        assert np.array_equal(pipe.generate(PROMPTS, image=image, mask_image=same, **opts), shared)
    # Prompt-major with num_images_per_prompt: prompt 1's images (the last n) are inpainted with its own mask.
    per_prompt = pipe.generate(PROMPTS, image=image, mask_image=[corner, white], **opts)
    assert np.array_equal(per_prompt[:n], shared[:n]) and not np.array_equal(per_prompt[n:], shared[n:])
    # batch_size splits the masks with the images: the same images (dpmpp draws only x_T).
    assert np.array_equal(pipe.generate(PROMPTS, image=image, mask_image=[corner, white], batch_size=3, **opts),
                          per_prompt)


def test_pipeline_warns_about_a_mask_with_nothing_to_regenerate(pipe):
    """An all-black mask (one drawn the wrong way round) keeps the whole image: said, not silent."""
    from diffusion.pipeline_model import PromptWarning

    opts = {"steps": 2, "progress": False, "strength": 0.75, "image": gradient_image()}
    with pytest.warns(PromptWarning, match=r"^mask 2 has no white pixel \(>= 128 of 255\) at 16x16"):
        pipe.generate(PROMPTS, mask_image=[corner_mask(SIDE, 4), Image.new("L", (SIDE, SIDE), 0)], **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptWarning)
        pipe.generate(PROMPTS, mask_image=corner_mask(SIDE, 4), **opts)


def test_pipeline_refuses_bad_masks_naming_them(pipe, tmp_path):
    image = gradient_image()
    (tmp_path / "notes.png").write_text("not a mask")
    opts = {"steps": 4, "progress": False}
    for kw, words in (
        ({"mask_image": corner_mask(SIDE, 4)}, "needs an image= to inpaint"),
        ({"image": image, "mask_image": tmp_path / "nowhere.png"}, f"{tmp_path / 'nowhere.png'}: no such file"),
        ({"image": image, "mask_image": tmp_path / "notes.png"}, f"{tmp_path / 'notes.png'}: cannot read it as an"),
        ({"image": image, "mask_image": [corner_mask(SIDE, 4)] * 3}, "a list of 1 or 2 of them"),
        ({"image": image, "mask_image": 0.5}, "expected a PIL image, a path"),
    ):
        with pytest.raises(SampleOptionError) as err:
            pipe.generate(PROMPTS, **opts, **kw)
        assert err.value.option == "mask_image" and words in str(err.value), str(err.value)


# ---- the command line -----------------------------------------------------------------------------------



def test_cli_sample_mask_writes_the_pipelines_png(model_dir, tmp_path, env):
    gradient_image(24, 20).save(tmp_path / "in.png")
    corner_mask(SIDE, 6).save(tmp_path / "mask.png")
    proc = run_cli(["sample", PROMPTS[0], "--model", str(model_dir), "--steps", "4", "--seed", "3", "--device", "cpu",
                    "--num-images", "2", "--image", "in.png", "--mask", "mask.png", "--strength", "0.6",
                    "--out", "out.png"], tmp_path, env)
    assert "from in.png at strength 0.6: 2 steps run, regenerating the white of mask.png" in proc.stdout
    pipe = TextToImagePipeline.from_pretrained(model_dir, device="cpu")
    opts = {"steps": 4, "seed": 3, "num_images_per_prompt": 2, "image": tmp_path / "in.png", "strength": 0.6,
            "progress": False}
    again = pipe.generate(PROMPTS[:1], mask_image=tmp_path / "mask.png", **opts)
    images_to_grid(again, 1).save(tmp_path / "again.png")
    assert (tmp_path / "out.png").read_bytes() == (tmp_path / "again.png").read_bytes()
    assert not np.array_equal(again, pipe.generate(PROMPTS[:1], **opts))  # the mask was used
    # A mask with nothing to regenerate is said on the command line too (the CLI warns before generating).
    Image.new("L", (SIDE, SIDE), 0).save(tmp_path / "black.png")
    proc = run_cli(["sample", PROMPTS[0], "--model", str(model_dir), "--steps", "2", "--device", "cpu", "--image",
                    "in.png", "--mask", "black.png", "--out", "black-out.png"], tmp_path, env)
    assert f"warning: the mask has no white pixel (>= 128 of 255) at {SIDE}x{SIDE}" in proc.stderr, proc.stderr


def test_cli_sample_bad_mask_fails_before_loading(model_dir, tmp_path, env):
    # Garbage weights (as tests/test_img2img.py): had the model been loaded first, it would fail about model.pt.
    broken = broken_model_dir(model_dir, tmp_path)
    gradient_image().save(tmp_path / "in.png")
    (tmp_path / "notes.png").write_text("not a mask")
    base = ["sample", PROMPTS[0], "--model", str(broken), "--steps", "10"]
    for args, code, words in ((["--mask", "in.png"], 2, "--mask in.png: needs --image"),
                              (["--image", "in.png", "--mask", "nowhere.png"], 1, "--mask nowhere.png: no such file"),
                              (["--image", "in.png", "--mask", "notes.png"], 1, "--mask notes.png: cannot read it")):
        proc = run_cli([*base, *args], tmp_path, env, check=False)
        assert proc.returncode == code and words in proc.stderr and "model.pt" not in proc.stderr, proc.stderr
    assert not (tmp_path / "samples.png").exists()
