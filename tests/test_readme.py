"""The README's "Training without the pipeline" examples run as written: imports, names and arguments.

They are run against a tiny VAE written where the example reads the pipeline's (``models/vae``), with the
training's ``max_steps`` lowered from 200 to 2; everything else is the README's text.
"""

import re

import torch
from conftest import ROOT

from diffusion.models.vae import AutoencoderKL, VAEConfig
from diffusion.pipeline_model import TextToImagePipeline
from diffusion.training.latent_stats import LatentStats, save_vae


def python_blocks_after(heading: str, count: int) -> list[str]:
    """The first `count` ```python blocks after `heading` in README.md."""
    text = (ROOT / "README.md").read_text()
    blocks = re.compile(r"```python\n(.*?)```", re.DOTALL).findall(text, text.index(heading))
    assert len(blocks) >= count, f"{len(blocks)} python blocks after {heading!r}, expected {count}"
    return blocks[:count]


def test_the_training_without_the_pipeline_example_runs(tmp_path, monkeypatch):
    code, save = python_blocks_after("### Training without the pipeline", 2)
    assert "max_steps=200" in code and 'load_vae("models/vae")' in code, code
    vae = AutoencoderKL(VAEConfig(latent_dim=4, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                  norm_groups=4, mid_attention=False))
    save_vae(vae, LatentStats(mean=0.1, std=2.0, num_values=1, num_batches=1), tmp_path / "models/vae")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    code = code.replace("max_steps=200", "max_steps=2", 1)
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 (the README's own code)
    model, trainer = scope["model"], scope["trainer"]
    assert trainer.global_step == 2
    # The model decodes with the trained VAE and its measured scale and shift, not a fresh VAE's.
    assert model.latent_scale == 0.5 and model.latent_shift == 0.1
    assert all(torch.equal(a, b) for a, b in zip(model.vae.state_dict().values(), vae.state_dict().values()))

    # The second block wraps the trained model in a pipeline and saves it; the folder reads back (as `cli.py
    # sample --model models/mine` reads it: tests/test_sample.py) and draws the same images for the same seed.
    assert 'save_pretrained("models/mine")' in save, save
    exec(compile(save, "README.md", "exec"), scope)  # noqa: S102
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "models/mine", device="cpu")
    assert loaded.spec.image_size == 32 and loaded.scheduler.config == scope["scheduler"].config
    again = loaded(["a red circle in the top left"], steps=20, seed=0)
    assert [im.tobytes() for im in again] == [im.tobytes() for im in scope["images"]]
