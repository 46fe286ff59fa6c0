"""Sampling from a trained model folder: TextToImagePipeline and `cli.py sample` (the MLflow pyfunc model:
tests/test_pyfunc.py).

The model folder is built here, at tiny sizes with random weights, in the layout the train stage exports
(config.json, model.pt, tokenizer.json, train_config.json), so these tests need no earlier stage.
"""

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from conftest import broken_model_dir, run_cli
from diffusion.data.tokenizer import save_tokenizer, train_tokenizer
from diffusion.models import LatentDiffusionModel
from diffusion.model_spec import MODEL_FILES, ModelNotFoundError, ModelSpec, SampleOptionError
from diffusion.pipeline_model import TextToImagePipeline, images_to_grid
from diffusion.scheduler import DDPMScheduler
from diffusion.stage_configs import TrainConfig

CAPTIONS = [f"a {c} {s} in the {p}" for c in ("red", "blue", "green") for s in ("circle", "square", "triangle")
            for p in ("top left", "center", "bottom right")]  # no "z" anywhere: "zebra" is out of vocabulary
MAX_LENGTH = 10
SIDE = 16  # the "training resolution": latents 4x4, VAE factor 4, U-Net factor 2 -> sides multiple of 8
PROMPTS = ["a red circle in the top left", "a blue square in the center"]
FAST = {"steps": 2, "guidance": 3.0, "sampler": "dpmpp", "seed": 5}


def tiny_parts() -> tuple[LatentDiffusionModel, Tokenizer]:
    """A tiny LatentDiffusionModel with random weights (seeded) and the tokenizer it is sized for."""
    tok = train_tokenizer(CAPTIONS, vocab_size=80, max_length=MAX_LENGTH)
    torch.manual_seed(0)
    model = LatentDiffusionModel(
        vocab_size=tok.get_vocab_size(),
        text_encoder={"max_length": MAX_LENGTH, "width": 32, "depth": 1, "num_heads": 2},
        vae={"base_channels": 8, "channel_mult": (1, 2, 2), "num_res_blocks": 1, "norm_groups": 4},
        denoiser={"base_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_levels": (1,),
                  "num_heads": 2, "norm_groups": 4},
    )
    with torch.no_grad():  # the U-Net's output layer starts at zero; perturb it so the prompt matters
        for p in model.denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, tok


def make_model_dir(root: Path) -> Path:
    """A model folder as `pipeline/train.py` exports it, plus the latents manifest that records the
    training resolution (train_config.json's latents_dir points at it)."""
    model, tok = tiny_parts()
    model_dir = model.save_pretrained(root / "model")
    save_tokenizer(tok, model_dir / "tokenizer.json")
    latents = root / "latents"
    latents.mkdir()
    (latents / "manifest.json").write_text(json.dumps({"latent_shape": [4, SIDE // 4, SIDE // 4]}))
    cfg = TrainConfig().replace(latents_dir=str(latents), out_dir=str(model_dir))
    (model_dir / "train_config.json").write_text(json.dumps(cfg.to_dict()))
    return model_dir


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread here and in the subprocesses: on a loaded 2-core machine two OpenMP threads spin
    against each other and a tiny sampling call takes seconds instead of milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)




# ---- the pipeline -------------------------------------------------------------------------------------


def test_pipeline_images_and_defaults(pipe):
    images = pipe(PROMPTS, num_images_per_prompt=2, progress=False, **FAST)
    assert len(images) == 4 and all(isinstance(im, Image.Image) and im.size == (SIDE, SIDE) for im in images)
    assert pipe.spec.image_size == SIDE and pipe.spec.latent_multiple == 8
    bigger = pipe.generate(PROMPTS[:1], image_size=24, progress=False, **FAST)
    assert bigger.shape == (1, 24, 24, 3) and bigger.dtype == np.uint8
    # The prompt conditions the image (the weights are random, but not text-blind): one prompt at a time, so
    # both start from the same noise and only the text differs.
    a = pipe.generate(PROMPTS[:1], progress=False, **FAST)
    b = pipe.generate(PROMPTS[1:2], progress=False, **FAST)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize(("options", "option"), [
    ({"image_size": 20}, "image_size"), ({"steps": 0}, "steps"), ({"steps": 1001}, "steps"),
    ({"sampler": "lms"}, "sampler"), ({"guidance": -1.0}, "guidance"), ({"num_images_per_prompt": 0},
                                                                          "num_images_per_prompt"),
    ({"image_size": 0}, "image_size"),  # 0 is a bad size, not "the training size"
    ({"num_images_per_prompt": 1.7}, "num_images_per_prompt"),
    ({"image_size": 16.0}, "image_size"), ({"image_size": "16"}, "image_size"), ({"image_size": (16,)}, "image_size"),
    ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": 2**64}, "seed"),
    ({"batch_size": 0}, "batch_size"), ({"batch_size": -1}, "batch_size"),  # -1 returned no images at all
    ({"guidance_rescale": 1.5}, "guidance_rescale"), ({"guidance_rescale": -0.1}, "guidance_rescale"),
    ({"guidance_rescale": float("nan")}, "guidance_rescale"),
])
def test_bad_options_are_refused(model_dir, options, option):
    spec = ModelSpec.read(model_dir)
    with pytest.raises(SampleOptionError) as err:
        spec.check(**{"steps": 2, "guidance": 3.0, "sampler": "dpmpp", **options})
    assert err.value.option == option
    spec.check(steps=2, guidance=np.float32(3.0), sampler="dpmpp", image_size=(16, np.int64(24)), batch_size=1)


def test_the_library_generate_names_bad_arguments(pipe):
    import torch

    model, scheduler = pipe.model, pipe.scheduler
    tokens = torch.tensor([[1, 5, 2]])
    ok = {"text_tokens": tokens, "scheduler": scheduler, "num_inference_steps": 1, "image_size": SIDE}
    for change, pattern in (({"text_tokens": tokens.float()}, "text_tokens: expected a .B, T. integer tensor"),
                            ({"text_tokens": tokens[0]}, "text_tokens: expected"),
                            ({"text_tokens": [[1, 5, 2]]}, "text_tokens: expected"),
                            ({"text_tokens": tokens + 10**6}, r"text_tokens: ids must be in \[0, "),
                            ({"scheduler": None}, "scheduler: expected"),
                            ({"num_inference_steps": 0}, "num_inference_steps"),
                            ({"guidance_scale": float("nan")}, "guidance_scale"),
                            ({"image_size": 16.0}, "image_size: expected an int side or a pair")):
        with pytest.raises((TypeError, ValueError), match=pattern):
            model.generate(**{**ok, **change})
    assert model.generate(**ok).shape == (1, 3, SIDE, SIDE)
    with pytest.raises(TypeError, match="prompts: expected a list of strings"):
        pipe.generate([None], progress=False, **FAST)


def test_prompt_warnings(pipe):
    long = "a red circle in the top left and a blue square in the center"
    messages = pipe.check_prompts(["", "a zebra circle", long, PROMPTS[0]])
    assert len(messages) == 3
    assert "unconditional" in messages[0] and "truncated" in messages[2]
    # Only the unseen character is [UNK]; the rest of the word is spelled in pieces.
    assert messages[1].endswith("read as [UNK]: 'z' in 'zebra'"), messages[1]
    assert pipe.check_prompts(["a red ✓"])[0].endswith("read as [UNK]: '✓'")
    # Negative prompts are read by the same tokenizer; an empty one is the default, not news.
    messages = pipe.check_prompts(PROMPTS, ["", "a zebra"], guidance=3.0)
    assert len(messages) == 1 and messages[0].startswith("negative prompt 2 ('a zebra')") and "'zebra'" in messages[0]
    assert pipe.check_prompts(PROMPTS, "", guidance=1.0) == []
    assert "no effect at guidance 1" in pipe.check_prompts(PROMPTS, "a blue square", guidance=1.0)[0]
    assert "guidance_rescale has no effect" in pipe.check_prompts(PROMPTS, guidance=1.0, guidance_rescale=0.7)[0]
    assert pipe.check_prompts(PROMPTS, guidance=3.0, guidance_rescale=0.7) == []


def test_a_negative_prompt_takes_the_null_captions_place_in_guidance(pipe):
    """diffusers' ``negative_prompt``: guidance steers from it instead of from the null caption. At guidance 0
    the guided prediction is the unconditional half alone, so it is the model conditioned on the negative
    prompt: the images of that prompt at guidance 1 (one forward of batch 1 against the half of a batch of 2,
    hence a tolerance of one level)."""
    opts = {"steps": 2, "sampler": "dpmpp", "seed": 5, "progress": False}
    at_zero = pipe.generate(PROMPTS[:1], guidance=0.0, negative_prompt=PROMPTS[1], **opts).astype(int)
    conditioned = pipe.generate(PROMPTS[1:], guidance=1.0, **opts).astype(int)
    unconditional = pipe.generate(PROMPTS[:1], guidance=0.0, **opts).astype(int)
    assert np.abs(at_zero - conditioned).max() <= 1
    assert np.abs(unconditional - conditioned).max() > 10  # the negative prompt, not the null caption, was used
    # "" is the null caption: the default's images, bit for bit; one negative per prompt, or one for all.
    default = pipe.generate(PROMPTS, **FAST, progress=False)
    assert np.array_equal(pipe.generate(PROMPTS, negative_prompt="", **FAST, progress=False), default)
    one = pipe.generate(PROMPTS, negative_prompt="a green triangle", **FAST, progress=False)
    assert not np.array_equal(one, default)
    assert np.array_equal(pipe.generate(PROMPTS, negative_prompt=["a green triangle"] * 2, **FAST, progress=False),
                          one)
    for bad in (["a green triangle"], [None, ""], 3):
        with pytest.raises(SampleOptionError) as err:
            pipe.generate(PROMPTS, negative_prompt=bad, **FAST, progress=False)
        assert err.value.option == "negative_prompt"
    # Lin et al.'s rescale changes the guided images (and is refused outside [0, 1], above).
    assert not np.array_equal(pipe.generate(PROMPTS, guidance_rescale=0.7, **FAST, progress=False), default)


def test_missing_model_names_the_stage(tmp_path):
    with pytest.raises(ModelNotFoundError, match="python cli.py train"):
        TextToImagePipeline.from_pretrained(tmp_path / "nowhere")


def test_damaged_model_folder_and_bad_devices_are_named(model_dir, tmp_path):
    from diffusion.model_spec import check_device

    damaged = tmp_path / "damaged"
    shutil.copytree(model_dir, damaged)
    train_config = json.loads((damaged / "train_config.json").read_text())
    del train_config["scheduler"]
    (damaged / "train_config.json").write_text(json.dumps(train_config))
    with pytest.raises(ModelNotFoundError, match="scheduler.num_timesteps"):
        ModelSpec.read(damaged)
    (damaged / "train_config.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError, match="not valid JSON"):
        ModelSpec.read(damaged)
    # Files that exist but cannot be read: named, and never torch's advice to load with weights_only=False.
    shutil.copyfile(model_dir / "train_config.json", damaged / "train_config.json")
    weights = (model_dir / "model.pt").read_bytes()
    for content in (weights[: len(weights) // 2], b"not a checkpoint"):
        (damaged / "model.pt").write_bytes(content)
        with pytest.raises(ModelNotFoundError, match="model.pt: not a readable weights file") as err:
            TextToImagePipeline.from_pretrained(damaged)
        assert "weights_only=False" not in str(err.value)
    (damaged / "model.pt").write_bytes(weights)
    (damaged / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="tokenizer.json: not a tokenizer"):
        TextToImagePipeline.from_pretrained(damaged)
    # Folders that hold a model's files but not one sampling reads, each told what it is and what to do.
    bare = tmp_path / "bare"  # what LatentDiffusionModel.save_pretrained writes
    bare.mkdir()
    for name in ("config.json", "model.pt"):
        shutil.copyfile(model_dir / name, bare / name)
    with pytest.raises(ModelNotFoundError, match="not tokenizer.json and train_config.json.*from_components"):
        ModelSpec.read(bare)
    (bare / "config.json").write_text(json.dumps({"base_channels": 8, "latent_scale": 1.0}))  # a VAE's
    with pytest.raises(ModelNotFoundError, match="not a text-to-image model's.*VAE"):
        ModelSpec.read(bare)
    custom = json.loads((model_dir / "config.json").read_text())  # a denoiser registered by the user's code
    (damaged / "config.json").write_text(json.dumps({**custom, "denoising_type": "mine"}))
    with pytest.raises(ModelNotFoundError, match="unknown denoising_type 'mine'.*registered in this process"):
        ModelSpec.read(damaged)
    assert check_device("cpu") == "cpu"
    assert check_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for device in ("foo", "cuda:99"):
        with pytest.raises(SampleOptionError) as err:
            check_device(device)
        assert err.value.option == "device"


# ---- the command line ---------------------------------------------------------------------------------


def test_cli_sample_png_and_determinism(model_dir, pipe, tmp_path, env):
    base = ["sample", "--model", str(model_dir), "--steps", "2", "--seed", "3", "--device", "cpu"]
    proc = run_cli([*base, PROMPTS[0], "--out", "one.png"], tmp_path, env)
    assert "one.png" in proc.stdout
    assert Image.open(tmp_path / "one.png").size == (SIDE, SIDE)
    run_cli([*base, PROMPTS[0], "--num-images", "4", "--out", "grid.png"], tmp_path, env)
    assert Image.open(tmp_path / "grid.png").size == (2 * (SIDE + 2) + 2,) * 2  # 2x2, make_grid's 2 px padding
    # Deterministic for a seed: the same bytes again, here from this process rather than a second CLI run.
    again = pipe.generate(PROMPTS[:1], steps=2, seed=3, num_images_per_prompt=4, progress=False)
    images_to_grid(again, 1).save(tmp_path / "again.png")
    assert (tmp_path / "grid.png").read_bytes() == (tmp_path / "again.png").read_bytes()
    # The negative prompt and the rescale reach the pipeline.
    proc = run_cli([*base, *PROMPTS, "--negative-prompt", "a green triangle", "--guidance-rescale", "0.5", "--out",
                    "n.png"], tmp_path, env)
    assert "negative prompt 'a green triangle', guidance rescale 0.5" in proc.stdout
    again = pipe.generate(PROMPTS, steps=2, seed=3, negative_prompt="a green triangle", guidance_rescale=0.5,
                          progress=False)
    images_to_grid(again, 2).save(tmp_path / "again.png")
    assert (tmp_path / "n.png").read_bytes() == (tmp_path / "again.png").read_bytes()


def test_cli_sample_warns_and_proceeds(model_dir, tmp_path, env):
    long = "a red circle in the top left and a blue square in the center"
    proc = run_cli(["sample", "", "a zebra circle", long, "--model", str(model_dir), "--steps", "1",
                    "--device", "cpu", "--out", "w.png", "--negative-prompt", "a zebra"], tmp_path, env)
    assert "negative prompt 'a zebra'" in proc.stderr
    assert "unconditional" in proc.stderr
    assert "'zebra'" in proc.stderr and "vocabulary" in proc.stderr
    assert "truncated" in proc.stderr
    assert Image.open(tmp_path / "w.png").size == (SIDE + 4, 3 * (SIDE + 2) + 2)  # a row per prompt


def test_cli_sample_missing_model_exits_1(tmp_path, env):
    (tmp_path / "params.yaml").write_text("train:\n  out_dir: models/diffusion\n")
    proc = run_cli(["sample", "a red circle"], tmp_path, env, check=False)
    assert proc.returncode == 1
    assert "models/diffusion" in proc.stderr and "python cli.py train" in proc.stderr


def test_cli_sample_bad_size_exits_2_before_loading(model_dir, tmp_path, env):
    # Garbage weights: had the command loaded them before checking --size, it would fail differently.
    broken = broken_model_dir(model_dir, tmp_path)
    proc = run_cli(["sample", "a red circle", "--model", str(broken), "--size", "20"], tmp_path, env, check=False)
    assert proc.returncode == 2
    assert "--size" in proc.stderr and "multiple of 8" in proc.stderr
    (tmp_path / "afile").write_text("")
    for flag, value in (("--device", "foo"), ("--out", "x.pngx"), ("--out", "afile/x.png"), ("--seed", str(2**64)),
                        ("--seed", "-1"), ("--guidance-rescale", "2"),
                        ("-S", "train.bogus=1")):  # -S picks only the default model folder
        proc = run_cli(["sample", "a red circle", "--model", str(broken), flag, value], tmp_path, env, check=False)
        assert proc.returncode == 2 and flag in proc.stderr, proc.stderr
    assert not (tmp_path / "samples.png").exists()


# ---- a pipeline built from parts in memory, saved as a model folder ------------------------------------


def schedule_not_default() -> DDPMScheduler:
    """Every field away from its default: a folder that lost the scheduler section would load another one."""
    return DDPMScheduler(num_timesteps=50, beta_schedule="cosine", beta_start=2e-4, beta_end=3e-2,
                         prediction_type="v_prediction", rescale_zero_terminal_snr=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[TextToImagePipeline, Path]:
    """A pipeline built in memory (as after `train_diffusion_model`) and the folder it saved."""
    model, tok = tiny_parts()
    pipe = TextToImagePipeline.from_components(model, tok, schedule_not_default(), image_size=SIDE)
    return pipe, pipe.save_pretrained(tmp_path_factory.mktemp("saved") / "mine")


def test_saved_pipeline_loads_back_and_draws_the_same_images(saved):
    from pipeline.evaluate import denoiser_params

    pipe, folder = saved
    assert pipe.spec == ModelSpec(None, 8, SIDE, 50)  # from the parts: no folder read
    assert sorted(p.name for p in folder.iterdir()) == sorted(MODEL_FILES)
    assert [p.name for p in folder.parent.iterdir()] == ["mine"]  # no temporary folder left beside it
    loaded = TextToImagePipeline.from_pretrained(folder, device="cpu")
    # The schedule comes back as saved, not as SchedulerConfig's defaults (linear, epsilon, T=1000).
    assert loaded.scheduler.config == pipe.scheduler.config
    assert loaded.spec == ModelSpec(folder, 8, SIDE, 50)
    assert loaded.tokenizer.to_str() == pipe.tokenizer.to_str()
    for options in (FAST, {**FAST, "sampler": "ddpm", "guidance": 1.0}):
        a = pipe.generate(PROMPTS, num_images_per_prompt=2, progress=False, **options)
        b = loaded.generate(PROMPTS, num_images_per_prompt=2, progress=False, **options)
        assert a.shape == (4, SIDE, SIDE, 3) and np.array_equal(a, b)  # bit-identical, the default size
    # The evaluate stage reads the folder too (its MLflow params name the denoiser).
    assert denoiser_params(str(folder))["denoising_type"] == "unet"


def test_cli_samples_from_a_saved_pipeline(saved, tmp_path, env):
    pipe, folder = saved
    run_cli(["sample", PROMPTS[0], "--model", str(folder), "--steps", "2", "--seed", "3", "--device", "cpu",
             "--num-images", "4", "--out", "grid.png"], tmp_path, env)
    images_to_grid(pipe.generate(PROMPTS[:1], steps=2, seed=3, num_images_per_prompt=4, progress=False), 1).save(
        tmp_path / "memory.png")
    assert (tmp_path / "grid.png").read_bytes() == (tmp_path / "memory.png").read_bytes()


def test_a_loaded_train_stage_folder_saved_again_keeps_its_training_settings(model_dir, pipe, tmp_path):
    """A copy made through the pipeline (load, save elsewhere) still says how the model was trained; the keys
    sampling reads come from the parts as they are now."""
    trained = json.loads((model_dir / "train_config.json").read_text())
    copy_dir = pipe.save_pretrained(tmp_path / "copy")
    saved = json.loads((copy_dir / "train_config.json").read_text())
    assert saved["image_size"] == SIDE and trained.get("image_size") is None  # the folder's read from the manifest
    assert {k: v for k, v in saved.items() if k != "image_size"} == trained  # learning rate, steps, latents_dir...
    assert "lr" in saved and "max_steps" in saved
    reloaded = TextToImagePipeline.from_pretrained(copy_dir, device="cpu")
    assert reloaded.spec == dataclasses.replace(pipe.spec, model_dir=copy_dir)
    # Parts in memory know no training settings: their folder holds only what sampling reads.
    fresh = TextToImagePipeline.from_components(pipe.model, pipe.tokenizer, pipe.scheduler, image_size=SIDE)
    assert sorted(json.loads((fresh.save_pretrained(tmp_path / "fresh") / "train_config.json").read_text())) == [
        "denoising_type", "image_size", "scheduler"]


def test_parts_that_do_not_fit_are_refused():
    model, tok = tiny_parts()
    scheduler = DDPMScheduler(num_timesteps=50)
    smaller = train_tokenizer(CAPTIONS, vocab_size=40, max_length=MAX_LENGTH)
    assert smaller.get_vocab_size() != tok.get_vocab_size()
    longer = train_tokenizer(CAPTIONS, vocab_size=80, max_length=MAX_LENGTH + 1)
    for parts, error, pattern in (
        ((model, smaller, scheduler), ValueError, r"tokenizer: its vocabulary has \d+ tokens.*vocab_size"),
        ((model, longer, scheduler), ValueError, r"tokenizer: it pads every caption to 11 tokens.*max_length"),
        ((model, tok, None), TypeError, "scheduler: expected a diffusion.scheduler.DDPMScheduler"),
        ((model.state_dict(), tok, scheduler), TypeError, "model: expected"),
    ):
        with pytest.raises(error, match=pattern):
            TextToImagePipeline.from_components(*parts, image_size=SIDE)
    for size in (20, 16.0, (16, 16)):
        with pytest.raises(SampleOptionError) as err:
            TextToImagePipeline.from_components(model, tok, scheduler, image_size=size)
        assert err.value.option == "image_size"
    # No recorded size: sampling asks for one, and the saved folder records none either.
    pipe = TextToImagePipeline.from_components(model, tok, scheduler)
    with pytest.raises(SampleOptionError, match="give one explicitly"):
        pipe.generate(PROMPTS, progress=False, **FAST)
    assert pipe.generate(PROMPTS[:1], image_size=24, progress=False, **FAST).shape == (1, 24, 24, 3)


def test_save_is_atomic_and_replaces_only_a_model_folder(saved, tmp_path, monkeypatch):
    import diffusion.atomic as atomic_module
    from diffusion.config import ConfigError

    pipe, folder = saved
    target = tmp_path / "model"
    shutil.copytree(folder, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    other = copy.deepcopy(pipe.model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    # Another model's save, interrupted at its last file: the old folder stays whole (not the new weights beside
    # the old train_config.json), and no temporary folder is left.
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_module, "atomic_write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        TextToImagePipeline.from_components(other, pipe.tokenizer, DDPMScheduler(num_timesteps=20),
                                            image_size=SIDE).save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    monkeypatch.undo()
    # Not interrupted, the folder is replaced as a whole.
    TextToImagePipeline.from_components(other, pipe.tokenizer, DDPMScheduler(num_timesteps=20),
                                        image_size=SIDE).save_pretrained(target)
    assert json.loads((target / "train_config.json").read_text())["scheduler"]["num_timesteps"] == 20
    assert (target / "model.pt").read_bytes() != before["model.pt"]
    # A folder holding anything else is not replaced: pointed at a project folder, a save would delete it.
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"save_pretrained: .*model holds notes.txt"):
        pipe.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "mine"


def test_a_schedule_its_config_does_not_describe_is_not_saved(saved, tmp_path):
    class Exponential(DDPMScheduler):
        def make_betas(self) -> torch.Tensor:
            return torch.full((self.config.num_timesteps,), 0.1, dtype=torch.float64)

    pipe, _ = saved
    custom = TextToImagePipeline.from_components(pipe.model, pipe.tokenizer, Exponential(num_timesteps=20),
                                                 image_size=SIDE)
    assert custom.generate(PROMPTS[:1], progress=False, **FAST).shape == (1, SIDE, SIDE, 3)  # it samples
    with pytest.raises(ValueError, match="scheduler: the betas of this Exponential are not those its config gives"):
        custom.save_pretrained(tmp_path / "custom")
    assert not (tmp_path / "custom").exists()
