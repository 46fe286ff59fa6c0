"""The README's "Training without the pipeline" example runs as written: imports, names and arguments.

It is run against a tiny VAE written where the example reads the pipeline's (``models/vae``), with its
``max_steps`` lowered from 200 to 2; everything else is the README's text.
"""

import re

import torch
from conftest import ROOT

from diffusion.models.vae import AutoencoderKL, VAEConfig
from diffusion.training.latent_stats import LatentStats, save_vae


def python_block_after(heading: str) -> str:
    """The first ```python block after `heading` in README.md."""
    text = (ROOT / "README.md").read_text()
    start = text.index(heading)
    match = re.compile(r"```python\n(.*?)```", re.DOTALL).search(text, start)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


def test_the_training_without_the_pipeline_example_runs(tmp_path, monkeypatch):
    code = python_block_after("### Training without the pipeline")
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
