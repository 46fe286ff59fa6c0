"""The GPU profile (profiles/gpu.yaml), checked on the CPU: every stage's config parses with the GPU values,
the networks build at full size, and one training step runs at a tiny batch.

Also the profile mechanism itself (diffusion.params.load_params): params.yaml <- profiles/<name>.yaml <- -S,
its errors, and dvc.yaml declaring each stage's profile section (STYLE.md 15a: every shipped preset parses).
"""

import re

import pytest
import torch
import yaml
from conftest import ROOT

from diffusion.config import ConfigError

from diffusion.params import BASE_PROFILE, load_params, load_section
from diffusion.eval_configs import EvaluateConfig, JudgeConfig
from diffusion.data_configs import EncodeLatentsConfig, ShardConfig
from diffusion.stage_configs import TrainConfig, TrainVAEConfig

PARAMS = ROOT / "params.yaml"
GPU = ["profile=gpu"]
STAGE_CONFIGS = (ShardConfig, EncodeLatentsConfig, TrainVAEConfig, TrainConfig, JudgeConfig, EvaluateConfig)
LATENT = (4, 32, 32)  # 256 px through the f=8 VAE


def gpu(cls, *extra):
    return load_section(cls, PARAMS, [*GPU, *extra])


# ---- the profile's values ----------------------------------------------------------------------------


def test_every_stage_loads_with_the_gpu_profile():
    shard, enc, vae, train, judge, ev = (gpu(cls) for cls in STAGE_CONFIGS)
    assert shard.resolution == 256
    assert vae.model.downsample_factor == 8 and vae.model.latent_dim == LATENT[0]
    assert shard.resolution // vae.model.downsample_factor == LATENT[1]
    for cfg in (vae, train):
        assert cfg.precision == "bf16-mixed" and cfg.accelerator == "gpu"
        assert cfg.devices == 1 and cfg.num_workers > 0
    assert train.denoising_type == "dit" and train.dit_preset == "DiT-B/2"
    # The preset is resolved in the config itself, so what MLflow logs (to_dict) is what builds the network.
    assert (train.dit.depth, train.dit.hidden_size, train.dit.num_heads, train.dit.patch_size) == (12, 768, 12, 2)
    assert train.denoiser_config() == train.dit
    assert train.text_encoder.width >= 512 and train.text_encoder.depth > 2
    assert enc.device == "cuda" and ev.device == "cuda"
    assert len(judge.channels) == 6, "six blocks pool 256 px to 4x4"
    # -S applies over the profile: the profile's U-Net is one flag away.
    assert gpu(TrainConfig, "train.denoising_type=unet").denoiser_config() == train.unet


def test_the_cpu_profile_is_params_yaml_as_written():
    raw = yaml.safe_load(PARAMS.read_text())
    assert raw["profile"] == BASE_PROFILE
    assert load_params(PARAMS) == raw
    for cls in STAGE_CONFIGS:
        assert load_section(cls, PARAMS) == cls.from_dict(raw[cls.section], cls.section)


def test_trainer_accepts_the_profile_settings():
    """Lightning builds a Trainer from each training section (on the CPU: the profile's accelerator is gpu)."""
    from diffusion.training.trainer import build_trainer

    for cls in (TrainVAEConfig, TrainConfig):
        cfg = gpu(cls, f"{cls.section}.accelerator=cpu")
        trainer = build_trainer(cfg, callbacks=[], logger=False)
        assert trainer.max_steps == cfg.max_steps and "bf16" in str(trainer.precision)


def test_dvc_yaml_declares_each_stage_profile_section():
    """Every stage depends on `profile` and its section of profiles/${profile}.yaml, and every profile file
    has each section (DVC refuses a stage whose declared params are missing from the file)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    sections = {cls.section for cls in STAGE_CONFIGS}
    for name, stage in stages.items():
        params = stage.get("params", [])
        section = next((p for p in params if isinstance(p, str) and p in sections), None)
        assert section == name, f"dvc.yaml: stage {name} does not list its params section"
        assert "profile" in params, name
        assert {"profiles/${profile}.yaml": [section]} in params, name
    for path in (ROOT / "profiles").glob("*.yaml"):
        assert set(yaml.safe_load(path.read_text())) == sections, path.name


# ---- the networks at full size, one step at a tiny batch ---------------------------------------------------


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _model(train: TrainConfig, vae_cfg, vocab_size: int = 1000, max_length: int = 32):
    """The LatentDiffusionModel as pipeline/train.py builds it (there the tokenizer gives vocab and length)."""
    from diffusion.models import LatentDiffusionModel

    text = train.text_encoder.replace(vocab_size=vocab_size, max_length=max_length)
    return LatentDiffusionModel(vocab_size=vocab_size, denoising_type=train.denoising_type, text_encoder=text,
                                vae=vae_cfg, denoiser=train.denoiser_config())


def test_profile_parameter_counts():
    """DiT-B/2 and the profile's U-Net are of a size (within 25%); counts quoted in profiles/gpu.yaml."""
    from diffusion.models.vae import AutoencoderKL

    vae_cfg = gpu(TrainVAEConfig).model
    counts = {}
    with torch.device("meta"):  # shapes only: exact counts without allocating 1 GB of weights
        for kind in ("dit", "unet"):
            model = _model(gpu(TrainConfig, f"train.denoising_type={kind}"), vae_cfg)
            counts[kind] = _count(model.denoiser)
        counts["text_encoder"] = _count(model.text_encoder)
        counts["vae"] = _count(AutoencoderKL(vae_cfg))
    print("GPU profile parameters: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))
    assert 0.75 <= counts["unet"] / counts["dit"] <= 1.25, counts
    assert 120e6 <= counts["dit"] <= 200e6, "DiT-B/2 is ~130M, plus its cross-attention"
    text = (ROOT / "profiles" / "gpu.yaml").read_text()
    for name, key in (("VAE (KL-f8)", "vae"), ("text encoder", "text_encoder"), ("DiT-B/2", "dit"), ("U-Net", "unet")):
        assert re.search(rf"{re.escape(name)}\s+{counts[key] / 1e6:.1f}M", text), f"profiles/gpu.yaml: {name} count"


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_one_training_step_of_each_denoiser(kind):
    """Forward, backward and AdamW step through DiffusionSystem's loss at batch 1 on 32x32x4 latents, under
    bf16 autocast as the profile's bf16-mixed runs it."""
    from diffusion.scheduler import DDPMScheduler
    from diffusion.training.diffusion_system import DiffusionSystem, OptimSettings

    torch.manual_seed(0)
    train = gpu(TrainConfig, f"train.denoising_type={kind}")
    model = _model(train, gpu(TrainVAEConfig).model)
    # compile_denoiser off: torch.compile on the CPU would spend minutes in the C++ compiler.
    system = DiffusionSystem(model, DDPMScheduler.from_config(train.scheduler), OptimSettings(
        lr=train.lr, weight_decay=train.weight_decay, betas=(train.beta1, train.beta2),
        min_snr_gamma=train.min_snr_gamma))
    optimizer = system.configure_optimizers()["optimizer"]
    latents, tokens = torch.randn(1, *LATENT), torch.randint(4, 1000, (1, 32))
    before = {n: p.detach().clone() for n, p in model.denoiser.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = system.diffusion_loss(latents, tokens)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    # The text encoder trains with the denoiser (its gradients are still zero: the denoiser's output layer starts at
    # zero, as in DiT and ADM, so only that layer moves on the first step).
    assert all(p.grad is not None for p in model.text_encoder.parameters())
    assert any(not torch.equal(before[n], p) for n, p in model.denoiser.named_parameters()), "the step moved weights"


def test_vae_forward_at_256px():
    """The profile's KL-f8 autoencoder maps a 256 px image to a 32x32x4 latent and back (batch 1, no grad)."""
    from diffusion.models.vae import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(gpu(TrainVAEConfig).model).eval()
    image = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        recon, posterior = vae(image)
    assert posterior.mean.shape == (1, *LATENT)
    assert recon.shape == image.shape and torch.isfinite(recon.float()).all()


# ---- the profile mechanism and its errors --------------------------------------------------------------------


def _project(tmp_path, profile: str | None = None, params: dict | None = None):
    """A params.yaml (and profiles/gpu.yaml holding `profile`) in a temporary folder."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params or {"profile": "cpu", "shard": {"resolution": 32, "seed": 0}}))
    if profile is not None:
        (tmp_path / "profiles").mkdir()
        (tmp_path / "profiles" / "gpu.yaml").write_text(profile)
    return path


def test_layers_params_then_profile_then_overrides(tmp_path):
    path = _project(tmp_path, "shard:\n  resolution: 256\n  shapes: {num_train: 7}\n")
    assert load_section(ShardConfig, path).resolution == 32
    cfg = load_section(ShardConfig, path, ["profile=gpu"])
    assert (cfg.resolution, cfg.seed, cfg.shapes.num_train) == (256, 0, 7), "a profile changes only its keys"
    assert load_section(ShardConfig, path, ["profile=gpu", "shard.resolution=64"]).resolution == 64
    assert load_section(ShardConfig, path, ["shard.resolution=64", "profile=gpu"]).resolution == 64


def test_unknown_profile_is_refused_with_the_choices(tmp_path):
    path = _project(tmp_path, "shard: {}\n")
    with pytest.raises(ConfigError, match=r"profiles/tpu\.yaml not found.*expected one of: cpu, gpu"):
        load_section(ShardConfig, path, ["profile=tpu"])
    with pytest.raises(ConfigError, match="profile: expected a profile name"):
        load_params(path, ["profile=../secrets"])


@pytest.mark.parametrize("text, key", [
    ("shard:\n  colour_depth: 8\n", "shard.colour_depth"),     # a key no config has
    ("shard:\n  resolution: big\n", "shard.resolution"),       # a bad value
    ("shrd:\n  resolution: 64\n", "'shrd'"),                   # a section params.yaml lacks
    ("shard: 5\n", "shard"),                                   # a section that is not a mapping
])
def test_bad_profile_key_names_the_file_and_the_key(tmp_path, text, key):
    path = _project(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_section(ShardConfig, path, GPU)
    assert "gpu.yaml" in str(err.value) and key in str(err.value)


def test_a_bad_override_is_not_blamed_on_the_profile(tmp_path):
    path = _project(tmp_path, "shard:\n  resolution: 256\n")
    with pytest.raises(ConfigError) as err:
        load_section(ShardConfig, path, ["profile=gpu", "shard.resolution=2"])
    assert "shard.resolution" in str(err.value) and "gpu.yaml" not in str(err.value)


def test_a_mistake_in_params_yaml_is_not_blamed_on_the_profile(tmp_path):
    path = _project(tmp_path, "shard:\n  resolution: 256\n",
                    {"profile": "cpu", "shard": {"resolution": 32, "colour_depth": 8}})
    with pytest.raises(ConfigError) as err:
        load_section(ShardConfig, path, GPU)
    assert "shard.colour_depth" in str(err.value) and "gpu.yaml" not in str(err.value)
    assert str(err.value).startswith(str(path))


def test_a_mistake_in_any_section_stops_every_stage_before_it_works(tmp_path):
    """check_every_section (run by the CLI before a stage's main): a typo in the profile's train section stops
    the shard stage, rather than the train stage after shard, train_vae and encode_latents ran."""
    from diffusion.stage_configs import check_every_section

    path = _project(tmp_path, "train:\n  ema_decay_typo: 0.5\n",
                    {"profile": "cpu", "shard": {"resolution": 32}, "train": {"batch_size": 4}})
    check_every_section(path, [])  # params.yaml alone is fine
    assert load_section(ShardConfig, path, GPU).resolution == 32  # the shard section itself loads
    with pytest.raises(ConfigError, match=r"gpu\.yaml: .*train\.ema_decay_typo"):
        check_every_section(path, GPU)


def test_an_override_replacing_a_section_is_not_blamed_on_the_profile(tmp_path):
    """-S train=5 is the override's mistake: it read "profiles/cpu.yaml: unknown key 'train'"."""
    path = _project(tmp_path, "shard: {}\n", {"profile": "gpu", "shard": {"resolution": 32}})
    with pytest.raises(ConfigError) as err:
        load_section(ShardConfig, path, ["shard=5"])
    assert "shard: expected a mapping" in str(err.value) and "gpu.yaml" not in str(err.value)


def test_an_override_of_no_section_is_refused(tmp_path):
    """A misspelt section, or DVC's `file:key=value` form, would otherwise be read by no stage and ignored."""
    path = _project(tmp_path, "shard: {}\n")
    with pytest.raises(ConfigError, match="has no key 'shrd'; expected one of: profile, shard"):
        load_section(ShardConfig, path, ["shrd.resolution=64"])
    with pytest.raises(ConfigError, match="DVC's form"):
        load_section(ShardConfig, path, ["profiles/gpu.yaml:shard.resolution=64"])


def test_the_cpu_profile_needs_no_file(tmp_path):
    """Projects (and tests) with only a params.yaml keep working: the base profile's file is optional."""
    assert load_section(ShardConfig, _project(tmp_path)).resolution == 32


def test_a_profile_cannot_move_a_path_that_dvc_yaml_reads(tmp_path):
    """dvc.yaml names the stages' outputs after params.yaml's keys (``${shard.out_dir}``) and DVC reads params.yaml
    alone, so a profile that set one would have the stage write where DVC does not look: refused, naming the
    profile file and the key. Without a dvc.yaml beside params.yaml, or for keys dvc.yaml does not name, a
    profile sets what it likes."""
    path = _project(tmp_path, "shard:\n  out_dir: data/big_shards\n  resolution: 256\n")
    assert load_section(ShardConfig, path, GPU).out_dir == "data/big_shards"
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    with pytest.raises(ConfigError, match=r"gpu\.yaml: shard\.out_dir: a profile cannot set a path"):
        load_section(ShardConfig, path, GPU)
    (tmp_path / "profiles" / "gpu.yaml").write_text("shard:\n  resolution: 256\n")
    assert load_section(ShardConfig, path, GPU).resolution == 256
    assert load_section(ShardConfig, path, [*GPU, "shard.out_dir=data/big_shards"]).out_dir == "data/big_shards"


def test_a_dit_size_set_beside_a_preset_is_refused_not_replaced():
    """dit_preset sets the DiT's depth, width, heads and patch over the section's values; one that a profile or
    an override also set was replaced without a word (-S profile=gpu -S train.dit.depth=2 trained 12 blocks),
    or refused for a check the preset would have made moot (hidden_size 64 against params.yaml's heads)."""
    with pytest.raises(ConfigError, match=r"train.dit.depth: set by the override 'train.dit.depth=2', but "
                                          r"dit_preset DiT-B/2 sets .*depth 12"):
        gpu(TrainConfig, "train.dit.depth=2")
    with pytest.raises(ConfigError, match=r"train.dit.hidden_size: set by the override"):
        gpu(TrainConfig, "train.dit.hidden_size=64")
    with pytest.raises(ConfigError, match=r"train.dit.patch_size: .*dit_preset DiT-S/2"):
        load_section(TrainConfig, PARAMS, ["train.dit_preset=DiT-S/2", "train.dit={patch_size: 4}"])
    assert gpu(TrainConfig, "train.dit.depth=12").dit.depth == 12  # the preset's own value is no conflict
    assert gpu(TrainConfig, "train.dit.mlp_ratio=2.0").dit.mlp_ratio == 2.0  # nor a field it does not set
    # Without a preset the section's sizes are the user's to set.
    assert gpu(TrainConfig, "train.dit_preset=null", "train.dit.depth=2").dit.depth == 2


def test_a_profile_setting_a_dit_size_beside_its_preset_is_named(tmp_path):
    params = {"profile": "cpu", "train": yaml.safe_load(PARAMS.read_text())["train"]}
    path = _project(tmp_path, "train:\n  dit_preset: DiT-S/2\n  dit:\n    depth: 4\n", params)
    with pytest.raises(ConfigError, match=r"train.dit.depth: set by .*profiles/gpu\.yaml, but dit_preset DiT-S/2"):
        load_section(TrainConfig, path, GPU)
