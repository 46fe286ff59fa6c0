"""Image to image (SDEdit, Meng et al. 2022): the schedule's tail against diffusers, the noised start, strength 1
as text to image, the pipeline's ``image=``/``strength=`` and ``cli.py sample --image``.

The tiny model and its folder come from tests/test_sample.py (random weights; its VAE round trip is not an image's,
so closeness to the input is measured on latents, and on pixels against the VAE's own reconstruction).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import broken_model_dir, run_cli
from PIL import Image
from test_sample import PROMPTS, SIDE, schedule_not_default, tiny_parts

from diffusion.data.tokenizer import encode
from diffusion.input_images import to_model_input
from diffusion.model_spec import ModelSpec, SampleOptionError
from diffusion.models.diffusion_model import _randn
from diffusion.pipeline_model import PromptWarning, TextToImagePipeline, images_to_grid
from diffusion.scheduler import DDPMScheduler
from diffusion.timesteps import img2img_timesteps, make_timesteps

LATENT = (4, SIDE // 4, SIDE // 4)  # (C, h, w) of a SIDE image: the tiny VAE's factor is 4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: two OpenMP threads on 2 busy cores crawl


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def generate(parts, scheduler, **kw) -> torch.Tensor:
    """LatentDiffusionModel.generate of the tiny `parts` (model, tokenizer): two prompts, 10 steps, seed 0."""
    model, tok = parts
    args = {"text_tokens": encode(tok, PROMPTS), "scheduler": scheduler, "num_inference_steps": 10,
            "guidance_scale": 3.0, "image_size": SIDE, "generator": torch.Generator().manual_seed(0)}
    return model.generate(**{**args, **kw})


def init_latents(seed: int = 1) -> torch.Tensor:
    return torch.randn(len(PROMPTS), *LATENT, generator=torch.Generator().manual_seed(seed))  # (B, C, h, w)


# ---- the schedule and the library -----------------------------------------------------------------------


def test_img2img_timesteps_match_diffusers():
    """diffusers' StableDiffusionImg2ImgPipeline.get_timesteps on its DDIM schedule ("trailing", as ours)."""
    import diffusers
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
        StableDiffusionImg2ImgPipeline,
    )

    ours = DDPMScheduler(num_timesteps=1000)
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing", steps_offset=0)
    for n, strength in ((50, 0.8), (50, 1.0), (20, 0.3), (7, 0.5), (100, 0.29), (10, 0.1), (1, 1.0)):
        ref.set_timesteps(n)
        expected, count = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=ref), n, strength,
                                                                        "cpu")
        got = img2img_timesteps(ours, n, strength)
        assert got.tolist() == expected.tolist() and len(got) == count, (n, strength)
        assert got.tolist() == make_timesteps(ours, n)[n - count:].tolist()  # the tail of text to image's
    assert len(img2img_timesteps(ours, 100, 0.29)) == 28  # int() truncates 28.999...: diffusers' count, kept


@pytest.mark.parametrize(("steps", "strength", "runs"), [(10, 1.0, 10), (10, 0.5, 5), (10, 0.25, 2), (4, 0.8, 3),
                                                          (7, 0.3, 2), (3, 0.34, 1)])
def test_steps_run_and_first_timestep(parts, steps, strength, runs):
    scheduler = DDPMScheduler(num_timesteps=1000)
    seen = []
    generate(parts, scheduler, num_inference_steps=steps, init_latents=init_latents(), strength=strength,
             callback=lambda i, t, x, x0: seen.append((i, t)))
    full = make_timesteps(scheduler, steps).tolist()
    assert [i for i, _ in seen] == list(range(runs))  # the denoiser ran `runs` steps, numbered from 0
    assert [t for _, t in seen] == full[steps - runs:]  # the schedule's last `runs` timesteps
    assert seen[0][1] == full[steps - runs] and (runs == steps or seen[0][1] < 999)


def test_the_sampler_starts_from_the_input_noised_to_the_first_timestep(parts, monkeypatch):
    """x_t0 = sqrt(alpha-bar_t0) x_0 + sqrt(1 - alpha-bar_t0) eps, eps the generator's first draws (text to image's
    x_T), t0 the first timestep run (Ho et al. 2020 eq. 4; diffusers' prepare_latents)."""
    import diffusion.models.diffusion_model as dm

    scheduler = DDPMScheduler(num_timesteps=1000)
    started = {}

    def record(name, model_fn, x, scheduler, timesteps, **kw):
        started.update(x=x.clone(), timesteps=timesteps.tolist())
        return x

    monkeypatch.setattr(dm, "run_sampler", record)
    x0 = init_latents()
    generate(parts, scheduler, init_latents=x0, strength=0.5)
    assert started["timesteps"] == make_timesteps(scheduler, 10)[5:].tolist()
    eps = _randn((len(PROMPTS), *LATENT), torch.Generator().manual_seed(0), torch.device("cpu"))
    t0 = torch.full((len(PROMPTS),), started["timesteps"][0])
    assert torch.equal(started["x"], scheduler.add_noise(x0, eps, t0))
    assert not torch.equal(started["x"], eps)  # the input is in it: alpha-bar_t0 > 0


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp"])
def test_strength_one_with_zero_terminal_snr_is_text_to_image(parts, sampler):
    """alpha-bar_{T-1} = 0: add_noise at T-1 returns the noise itself, the draws are x_T's, the timesteps the same;
    so bit for bit the same images (ddpm also draws at every step, in the same order)."""
    zero_snr = schedule_not_default()
    assert zero_snr.alphas_cumprod[-1] == 0
    t2i = generate(parts, zero_snr, sampler=sampler)
    assert torch.equal(generate(parts, zero_snr, sampler=sampler, init_latents=init_latents(), strength=1.0), t2i)
    # Where alpha-bar_{T-1} > 0 (a linear schedule keeps 4e-5 of the signal), the input shows through: not equal.
    linear = DDPMScheduler(num_timesteps=1000)
    assert not torch.equal(generate(parts, linear, sampler=sampler, init_latents=3 * init_latents(), strength=1.0),
                           generate(parts, linear, sampler=sampler))


def test_low_strength_stays_closer_to_the_input_latents(parts):
    """SDEdit's trade-off: the less of the schedule runs, the nearer the result to the input. Measured on the
    latents the sampler returns (the last step's x, before decoding), whose distance grows with strength."""
    def final_latents(**kw) -> torch.Tensor:
        steps = []
        generate(parts, schedule_not_default(), callback=lambda i, t, x, x_0: steps.append(x), **kw)
        return steps[-1]  # the last step's x: the sampler's x_0

    x0 = init_latents()
    for sampler in ("ddim", "ddpm", "dpmpp"):
        dist = [(final_latents(sampler=sampler, init_latents=x0, strength=s) - x0).pow(2).mean().sqrt().item()
                for s in (0.1, 0.25, 0.5, 1.0)]
        assert dist == sorted(dist) and dist[0] < 0.25 * dist[-1], (sampler, dist)


def test_the_library_refuses_bad_strength_and_latents(parts):
    scheduler = DDPMScheduler(num_timesteps=1000)
    for strength in (0.0, -0.5, 1.5, float("nan"), True, "0.5", 0.05):  # 0.05 of 10 steps runs none
        with pytest.raises(ValueError, match="^strength: "):
            generate(parts, scheduler, init_latents=init_latents(), strength=strength)
    with pytest.raises(ValueError, match=r"strength: 0.5 needs init_latents"):
        generate(parts, scheduler, strength=0.5)
    for bad in (init_latents()[:1], torch.zeros(2, 4, 8, 8), init_latents().long(), init_latents().numpy()):
        with pytest.raises(ValueError, match=r"init_latents: expected a float tensor of shape \(2, 4, 4, 4\)"):
            generate(parts, scheduler, init_latents=bad, strength=0.5)
    assert generate(parts, scheduler, init_latents=init_latents(), strength=0.1).shape == (2, 3, SIDE, SIDE)


# ---- the pipeline ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero_snr_pipe(parts) -> TextToImagePipeline:
    """alpha-bar_{T-1} = 0 (Lin et al. 2023), v-prediction: at strength 1 the input is noised away entirely."""
    model, tok = parts
    return TextToImagePipeline.from_components(model, tok, schedule_not_default(), image_size=SIDE)


def gradient_image(width: int = SIDE, height: int = SIDE) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 127 // (width + height)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def test_pipeline_strength_one_is_text_to_image_and_low_strength_stays_near_the_image(zero_snr_pipe):
    pipe, image = zero_snr_pipe, gradient_image(24, 20)  # another size and shape: resized to SIDE x SIDE
    opts = {"steps": 10, "seed": 3, "progress": False, "num_images_per_prompt": 2}
    t2i = pipe.generate(PROMPTS, **opts)
    assert np.array_equal(pipe.generate(PROMPTS, image=image, strength=1.0, **opts), t2i)
    # Against the VAE's reconstruction of the input (the limit of strength -> 0; the random VAE's round trip is
    # far from the input itself): mean absolute difference in levels.
    x = to_model_input([image], (SIDE, SIDE))
    reconstruction = ((pipe.model.reconstruct(x) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()  # (1, H, W, 3)
    low, half = (pipe.generate(PROMPTS, image=image, strength=s, **opts) for s in (0.1, 0.5))
    dist = [np.abs(a.astype(float) - reconstruction).mean() for a in (low, half, t2i)]
    assert dist[0] < dist[1] < dist[2] and dist[0] < 0.75 * dist[2], dist


def test_pipeline_images_for_every_prompt_or_one_per_prompt(zero_snr_pipe, tmp_path):
    pipe, n = zero_snr_pipe, 2
    a, b = gradient_image(), gradient_image().transpose(Image.Transpose.ROTATE_90)
    opts = {"steps": 4, "seed": 3, "progress": False, "num_images_per_prompt": n, "strength": 0.5}
    shared = pipe.generate(PROMPTS, image=a, **opts)
    a.save(tmp_path / "a.png")
    for same in ([a], [a, a], tmp_path / "a.png", str(tmp_path / "a.png"), a.convert("RGBA"), [a, tmp_path / "a.png"]):
        assert np.array_equal(pipe.generate(PROMPTS, image=same, **opts), shared)
    # Prompt-major with num_images_per_prompt: prompt 1's images (the last n) come from its own image.
    per_prompt = pipe.generate(PROMPTS, image=[a, b], **opts)
    assert np.array_equal(per_prompt[:n], shared[:n]) and not np.array_equal(per_prompt[n:], shared[n:])
    # Grey: an "L" image is converted to RGB, not refused.
    assert pipe.generate(PROMPTS[:1], image=a.convert("L"), **opts).shape == (n, SIDE, SIDE, 3)


def test_images_come_upright_and_16_bit_images_are_scaled(tmp_path):
    """A JPEG whose EXIF says "rotate 90 degrees" comes as a viewer shows it (diffusers' load_image does the same),
    from its path or opened; a 16-bit grey PNG is scaled to 8 bits (Pillow's convert would clip it to white)."""
    from diffusion.input_images import read_images, read_masks

    upright = gradient_image(16, 8)  # wider than high
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 8 wide, 16 high, as a camera stores a portrait
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 clockwise to display
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    for value in (tmp_path / "photo.jpg", Image.open(tmp_path / "photo.jpg")):
        (read,) = read_images(value, 1)
        assert read.size == upright.size  # (16, 8): turned upright, not the stored (8, 16)
        assert np.abs(np.asarray(read, float) - np.asarray(upright, float)).mean() < 8  # JPEG's loss only
    levels = (np.arange(64, dtype=np.uint16) * 1024).reshape(8, 8)  # 0 .. 64512 of 65535
    Image.fromarray(levels).save(tmp_path / "deep.png")  # mode I;16
    (grey,) = read_masks(tmp_path / "deep.png", 1)
    assert np.array_equal(np.asarray(grey), np.round(levels.astype(float) * 255 / 65535).astype(np.uint8))


def test_pipeline_refuses_bad_images_and_strengths_naming_them(zero_snr_pipe, tmp_path):
    pipe, image = zero_snr_pipe, gradient_image()
    (tmp_path / "notes.png").write_text("not an image")
    opts = {"steps": 10, "progress": False}
    for kw, option, words in (
        ({"image": image, "strength": 0.0}, "strength", "in (0, 1]"),
        ({"image": image, "strength": 1.01}, "strength", "in (0, 1]"),
        ({"image": image, "strength": 0.05}, "strength", "runs int(10 * 0.05) = 0 steps"),
        ({"image": tmp_path / "nowhere.png"}, "image", f"{tmp_path / 'nowhere.png'}: no such file"),
        ({"image": tmp_path}, "image", "(a folder)"),
        ({"image": tmp_path / "notes.png"}, "image", f"{tmp_path / 'notes.png'}: cannot read it as an image"),
        ({"image": [image] * 3}, "image", "a list of 1 or 2 of them"),
        ({"image": 3}, "image", "expected a PIL image, a path"),
        ({"image": b"\x89PNG\r\n"}, "image", "got 6 bytes (a file's contents?): open them first"),
        ({"image": [image, None]}, "image", "got None"),
        ({"image": np.zeros((SIDE, SIDE, 3))}, "image", "got a ndarray of shape (16, 16, 3)"),  # not the array
    ):
        with pytest.raises(SampleOptionError) as err:
            pipe.generate(PROMPTS, **opts, **kw)
        assert err.value.option == option and words in str(err.value), str(err.value)
    with pytest.raises(SampleOptionError, match=r"expected a PIL image, a path, or a list of 1, got a list of 2"):
        pipe.generate(PROMPTS[:1], image=[image, image], **opts)
    # The least strength suggested does run a step (1/3 rounded to 0.333 would not).
    with pytest.raises(SampleOptionError, match="at least 0.334") as err:
        pipe.generate(PROMPTS, image=image, strength=0.3, steps=3, progress=False)
    assert pipe.generate(PROMPTS, image=image, strength=0.334, steps=3, progress=False).shape[0] == len(PROMPTS)
    spec = ModelSpec(None, 8, SIDE, 50)
    assert spec.check(steps=10, guidance=3.0, sampler="dpmpp", strength=0.1) == (SIDE, SIDE)
    with pytest.raises(SampleOptionError, match="strength"):
        spec.check(steps=10, guidance=3.0, sampler="dpmpp", strength=0.09)
    # A strength without an image changes nothing: said, and text to image runs (the default 0.8 is no request).
    with pytest.warns(PromptWarning, match="strength 0.5 has no effect without an input image"):
        warned = pipe.generate(PROMPTS, strength=0.5, **opts)
    assert np.array_equal(warned, pipe.generate(PROMPTS, **opts))
    assert pipe.check_prompts(PROMPTS, image=image, strength=0.5) == []


# ---- the command line -----------------------------------------------------------------------------------



def test_cli_sample_image_writes_the_pipelines_png(model_dir, tmp_path, env):
    gradient_image(24, 20).save(tmp_path / "in.png")
    proc = run_cli(["sample", PROMPTS[0], "--model", str(model_dir), "--steps", "4", "--seed", "3", "--device", "cpu",
                    "--num-images", "2", "--image", "in.png", "--strength", "0.6", "--out", "out.png"], tmp_path, env)
    assert "from in.png at strength 0.6: 2 steps run" in proc.stdout
    pipe = TextToImagePipeline.from_pretrained(model_dir, device="cpu")
    again = pipe.generate(PROMPTS[:1], steps=4, seed=3, num_images_per_prompt=2, image=tmp_path / "in.png",
                          strength=0.6, progress=False)
    images_to_grid(again, 1).save(tmp_path / "again.png")
    assert (tmp_path / "out.png").read_bytes() == (tmp_path / "again.png").read_bytes()
    t2i = pipe.generate(PROMPTS[:1], steps=4, seed=3, num_images_per_prompt=2, progress=False)
    assert not np.array_equal(again, t2i)  # the image was used


def test_cli_sample_bad_image_or_strength_fails_before_loading(model_dir, tmp_path, env):
    # Garbage weights (as tests/test_sample.py): had the model been loaded first, it would fail about model.pt.
    broken = broken_model_dir(model_dir, tmp_path)
    gradient_image().save(tmp_path / "in.png")
    base = ["sample", PROMPTS[0], "--model", str(broken), "--steps", "10"]
    # A strength out of (0, 1] (with or without --image) and one too small for --steps are refused alike: exit 2,
    # "error: --strength: ..." saying what it expects, as --size and the other options (no typer usage box).
    expected = "error: --strength: expected a number in (0, 1] (1: the whole schedule), got"
    too_small = "error: --strength: 0.05 of 10 steps runs int(10 * 0.05) = 0 steps; give a strength of at least 0.1"
    for args, code, words in ((["--image", "nowhere.png"], 1, "error: --image nowhere.png: no such file"),
                              (["--image", "in.png", "--strength", "0.05"], 2, too_small),
                              (["--image", "in.png", "--strength", "0"], 2, f"{expected} 0.0"),
                              (["--strength", "1.5"], 2, f"{expected} 1.5")):
        proc = run_cli([*base, *args], tmp_path, env, check=False)
        assert proc.returncode == code and words in proc.stderr and "model.pt" not in proc.stderr, proc.stderr
        assert "Usage:" not in proc.stderr and "Invalid value" not in proc.stderr, proc.stderr
    assert not (tmp_path / "samples.png").exists()


def test_cli_sample_strength_without_image_warns(model_dir, tmp_path, env):
    proc = run_cli(["sample", PROMPTS[0], "--model", str(model_dir), "--steps", "1", "--device", "cpu",
                    "--strength", "0.5", "--out", "s.png"], tmp_path, env)
    assert "warning: strength 0.5 has no effect without an input image" in proc.stderr
    assert "strength" not in proc.stdout and (tmp_path / "s.png").is_file()
