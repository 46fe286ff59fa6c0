"""Fine-tuning (`train.init_from`): the train stage starts from a trained model's text encoder and denoiser, and
refuses, before its run opens, a model trained with another tokenizer, VAE or architecture (training/init_from.py).

The module fixture trains a tiny DiT for two steps on test_train_stage's tiny data: the model fine-tuning starts
from. Each test copies that project folder.
"""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from test_train_stage import copy_project, runs, train_in_process, upstream  # noqa: F401 (upstream: a fixture)

QUICK = ("train.sample_every_n_steps=0", "train.val_batches=0")


@pytest.fixture(scope="module")
def trained(upstream, tmp_path_factory) -> Path:  # noqa: F811
    """A project folder whose models/pretrained is a model the train stage wrote (2 steps)."""
    root = copy_project(upstream, tmp_path_factory.mktemp("trained"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'pretrain.db'}")
        train_in_process(root, "train.max_steps=2", *QUICK)
    shutil.move(root / "models/diffusion", root / "models/pretrained")
    shutil.rmtree(root / "checkpoints")
    return root


@pytest.fixture
def project(trained, tmp_path) -> Path:
    return copy_project(trained, tmp_path)


def _state(folder: Path, part: str) -> dict[str, torch.Tensor]:
    state = torch.load(folder / "model.pt", weights_only=True)
    return {k: v for k, v in state.items() if k.startswith(f"{part}.")}


def test_fine_tuning_starts_from_the_models_weights(project, capsys):
    """The text encoder and denoiser are the model's before the first step, the VAE the run's; a run at a
    vanishing learning rate exports them unchanged (the EMA starts at them), says it fine-tunes and records where
    from; init_from is part of the run key."""
    from diffusion.params import load_section
    from diffusion.stage_configs import TrainConfig
    from pipeline.train import build_model, resolve_derived

    pretrained = project / "models/pretrained"
    cfg = load_section(TrainConfig, project / "params.yaml").replace(
        latents_dir=str(project / "data/latents"), vae_dir=str(project / "models/vae"),
        tokenizer_path=str(project / "data/tokenizer.json"), init_from=str(pretrained))
    cfg = resolve_derived(cfg, [4, 16, 16])
    model = build_model(cfg)
    for part in ("text_encoder", "denoiser"):
        expected = _state(pretrained, part)
        got = {f"{part}.{k}": v for k, v in getattr(model, part).state_dict().items()}
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), part
    fresh = build_model(cfg.replace(init_from=None))
    assert not all(torch.equal(a, b) for a, b in zip(fresh.denoiser.parameters(), model.denoiser.parameters()))

    # The model folder is also the VAE folder (it holds the VAE the latents were encoded with).
    train_in_process(project, "train.max_steps=1", "train.lr=1e-12", "train.warmup_steps=0", *QUICK,
                     f"train.init_from={pretrained}", f"train.vae_dir={pretrained}")
    assert f"fine-tuning, from the text encoder and dit of {pretrained}" in capsys.readouterr().out
    out = project / "models/diffusion"
    for part in ("text_encoder", "denoiser"):
        new, old = _state(out, part), _state(pretrained, part)
        assert all(torch.allclose(new[k], old[k], atol=1e-6) for k in old), part
    vae = torch.load(project / "models/vae/model.pt", weights_only=True)
    assert all(torch.equal(v, vae[k.removeprefix("vae.")]) for k, v in _state(out, "vae").items())
    assert json.loads((out / "train_config.json").read_text())["init_from"] == str(pretrained)
    assert runs("train")[1][0].data.params["init_from"] == str(pretrained)

    train_in_process(project, "train.max_steps=1", "train.lr=1e-12", "train.warmup_steps=0", *QUICK)
    assert len(list((project / "checkpoints/train").iterdir())) == 2  # another run key without init_from


def _retokenize(folder: Path) -> None:
    """Give the model folder a tokenizer of another vocabulary (one the shard stage trained on other captions)."""
    from diffusion.data import tokenizer as tok

    length = tok.max_length_of(tok.load_tokenizer(folder / "tokenizer.json"))
    tok.save_tokenizer(tok.train_tokenizer(["a dog on a sofa", "two cats"], 64, length), folder / "tokenizer.json")


def _perturb(folder: Path, prefix: str) -> None:
    state = torch.load(folder / "model.pt", weights_only=True)
    name = next(k for k in sorted(state) if k.startswith(prefix) and state[k].is_floating_point())
    state[name] = state[name] + 1e-3
    torch.save(state, folder / "model.pt")


def _rescale(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["latent_scale"] *= 1.5
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, overrides, message", [
    ("missing", [], r"train.init_from: .*nowhere is not a folder; expected a model folder the train stage wrote"),
    ("empty", [], r"train.init_from: .*empty holds no config.json or model.pt or tokenizer.json"),
    (None, ["train.out_dir=models/pretrained"], (r"train.init_from: .*pretrained is train.out_dir, which this run "
                                                 r"replaces .*cp -r ")),
    ("vae_folder", [], r"train.init_from: .*config.json is not a text-to-image model's"),
    ("tokenizer", [], (r"train.tokenizer_path: .*tokenizer.json is not the tokenizer of the model in train.init_from "
                       r"\(its vocabulary differs .*set train.tokenizer_path to .*pretrained/tokenizer.json")),
    (None, ["train.dit.depth=1"], r"set 1 key\(s\) to the model's: train.dit.depth: 1 here, 2 in the model"),
    (None, ["train.text_encoder.width=48"], (r"set 2 key\(s\) to the model's: train.text_encoder.width: 48 here, "
                                             r"32 in the model; train.dit.context_dim: 48 here, 32 in the model")),
    (None, ["train.denoising_type=unet"], r"train.denoising_type: 'unet' here, but the model .* is a 'dit'"),
    ("encoder", [], r"train.vae_dir: .*models/vae is not the VAE .* \(its encoder's weights differ"),
    ("scale", [], r"train.vae_dir: .* \(its latent_scale is .*, the model's .*\): its latents are another space"),
])
def test_a_model_trained_with_other_inputs_is_refused_before_the_run(project, change, overrides, message):
    from diffusion.config import ConfigError

    pretrained = project / "models/pretrained"
    init = {"missing": project / "nowhere", "empty": project / "empty", "vae_folder": project / "models/vae"}.get(
        change, pretrained)
    (project / "empty").mkdir()
    if change == "vae_folder":
        shutil.copy(pretrained / "tokenizer.json", init)
    {"tokenizer": _retokenize, "encoder": lambda f: _perturb(f, "vae.encoder."), "scale": _rescale}.get(
        change, lambda f: None)(pretrained)
    with pytest.raises(ConfigError, match=message):
        train_in_process(project, *QUICK, f"train.init_from={init}", *overrides)
    assert not runs("train")[1] and not (project / "checkpoints/train").exists()


def test_what_does_not_change_the_weights_may_differ(project):
    """Gradient checkpointing, the decoder (a VAE whose decoder alone was fine-tuned encodes the same latents),
    the schedule and the prediction type are the run's to choose."""
    pretrained = project / "models/pretrained"
    _perturb(pretrained, "vae.decoder.")
    train_in_process(project, "train.max_steps=1", *QUICK, f"train.init_from={pretrained}",
                     "train.dit.gradient_checkpointing=true", "train.scheduler.prediction_type=epsilon",
                     "train.min_snr_on=snr")
    assert (project / "models/diffusion/model.pt").is_file()


def test_characters_the_models_tokenizer_never_saw_are_warned(project):
    from diffusion.data.locations import list_split
    from diffusion.data.tokenizer import load_tokenizer, train_tokenizer
    from diffusion.training.init_from import warn_unknown_characters

    urls = list_split(str(project / "data/latents"), "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the captions' own tokenizer knows every character: no warning
        assert warn_unknown_characters(urls, load_tokenizer(project / "data/tokenizer.json"), "m") == 0.0
    narrow = train_tokenizer(["a red circle"], 64, 32)  # no 'q', 'u', 's', 't', ...
    with pytest.warns(UserWarning, match=r"train.init_from: \d+\.\d% of the caption tokens .* are \[UNK\] to the "
                                         r"tokenizer of m, which never saw the characters '.*q.*'"):
        share = warn_unknown_characters(urls, narrow, "m")
    assert 0 < share < 1


def test_a_model_folder_serves_as_its_vaes_folder(project):
    """Every reader of a vae_dir takes a text-to-image model's folder as the VAE it holds (config.json's vae and
    latent scale and shift, model.pt's vae.* entries): the same VAE, scale, shift and encoder digest as its folder."""
    from diffusion.training import latent_stats as stats

    vae_dir, model_dir = project / "models/vae", project / "models/pretrained"
    (vae, scale, shift), (same, model_scale, model_shift) = stats.load_vae(vae_dir), stats.load_vae(model_dir)
    assert (scale, shift) == (model_scale, model_shift)
    assert stats.read_vae_config(model_dir)["vae"] == vae.cfg.to_dict()
    ours, theirs = vae.state_dict(), same.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(v, theirs[k]) for k, v in ours.items())
    assert stats.encoder_digest(model_dir) == stats.encoder_digest(vae_dir) and stats.vae_problem(model_dir) is None
