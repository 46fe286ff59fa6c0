"""Rehearsal while fine-tuning (`train.replay`, training/replay.py): a share of the samples from other latents.

The loader's mixing is tested in test_encode_latents.py; here the stage: it trains on both sets (other weights than
without), keys its checkpoint by both, and refuses replayed latents of another VAE or size before the run.
"""

import json
import shutil

import pytest
import torch
from test_init_from import QUICK, trained  # noqa: F401 (trained: a fixture)
from test_train_stage import copy_project, runs, train_in_process, upstream  # noqa: F401 (a fixture)


@pytest.fixture
def project(trained, tmp_path):  # noqa: F811
    root = copy_project(trained, tmp_path)
    shutil.copytree(root / "data/latents", root / "data/latents-old")
    return root


def test_replay_mixes_the_old_latents_into_fine_tuning(project, capsys):
    """With replay the run trains on other batches (other weights, the same seed) under another checkpoint key,
    says so, and records the params; fine-tuning from a model is the typical use."""
    args = ("train.max_steps=2", "train.warmup_steps=0", *QUICK, f"train.init_from={project / 'models/pretrained'}")
    train_in_process(project, *args)
    plain = torch.load(project / "models/diffusion/model.pt", weights_only=True)
    train_in_process(project, *args, "train.replay.latents_dir=data/latents-old", "train.replay.fraction=0.5")
    assert "train: 50% of the samples from data/latents-old (train.replay)" in capsys.readouterr().out
    mixed = torch.load(project / "models/diffusion/model.pt", weights_only=True)
    assert any(not torch.equal(mixed[k], plain[k]) for k in plain if k.startswith("denoiser."))
    assert len(list((project / "checkpoints/train").glob("train-*"))) == 2  # two run keys: the data differs
    params = runs("train")[1][0].data.params
    assert (params["replay.fraction"], params["replay.latents_dir"]) == ("0.5", "data/latents-old")


@pytest.mark.parametrize("change, message", [
    (("vae", "encoder_sha256", "0" * 64), (r"train.replay.latents_dir: the latents in data/latents-old were encoded "
                                           r"by another VAE than the one in train.vae_dir")),
    (("latent_shape", None, [4, 2, 2]), r"train.replay.latents_dir: latents of shape \[4, 2, 2\] in data/latents-old"),
])
def test_replayed_latents_of_another_vae_or_size_are_refused_before_the_run(project, change, message):
    from pipeline.train import TrainError

    path = project / "data/latents-old/manifest.json"
    manifest = json.loads(path.read_text())
    key, inner, value = change
    if inner is None:
        manifest[key] = value
    else:
        manifest[key][inner] = value
    path.write_text(json.dumps(manifest))
    with pytest.raises(TrainError, match=message):
        train_in_process(project, *QUICK, "train.replay.latents_dir=data/latents-old", "train.replay.fraction=0.2")
    assert not runs("train")[1] and not (project / "checkpoints/train").exists()


def test_replay_settings_that_do_not_go_together_are_refused(project):
    from diffusion.config import ConfigError
    from pipeline.train import TrainError

    with pytest.raises(ConfigError, match=r"replay: latents_dir None with fraction 0.3: set both"):
        train_in_process(project, *QUICK, "train.replay.fraction=0.3")
    with pytest.raises(ConfigError, match=r"replay.fraction: .*< 1.0"):
        train_in_process(project, *QUICK, "train.replay.latents_dir=data/latents-old", "train.replay.fraction=1")
    with pytest.raises(TrainError, match=r"train.replay.latents_dir: .*data/nothing"):
        train_in_process(project, *QUICK, "train.replay.latents_dir=data/nothing", "train.replay.fraction=0.3")
