"""Stage tests of train_vae and the shared resumable-run infrastructure (tiny: 32 px, an 8-channel VAE)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli
from diffusion.config import ConfigError
from diffusion.data_configs import ShardConfig
from diffusion.stage_configs import TrainVAEConfig

TINY = {
    "model": {"base_channels": 8, "norm_groups": 4, "channel_mult": [1, 2], "num_res_blocks": 1,
              "mid_attention": False},
    "batch_size": 4, "max_steps": 4, "warmup_steps": 0, "shuffle_buffer": 10, "log_every_n_steps": 1,
    "val_every_n_steps": 100, "checkpoint_every_n_steps": 2, "val_batches": 2, "scale_batches": 4,
    "grid_images": 4, "accelerator": "cpu",
}


def _overrides(values: dict, prefix: str = "train_vae") -> list[str]:
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += _overrides(value, f"{prefix}.{key}")
        else:
            out += ["-S", f"{prefix}.{key}={json.dumps(value)}"]
    return out


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Tiny shards (200 train, 48 val images at 32 px) and a tokenizer, made once by the shard stage."""
    from pipeline import shard

    root = tmp_path_factory.mktemp("train_vae_data")
    cfg = ShardConfig.from_dict({
        "resolution": 32, "samples_per_shard": 100, "out_dir": str(root / "data/shards"),
        "tokenizer_path": str(root / "data/tokenizer.json"), "vocab_size": 64,
        "shapes": {"num_train": 200, "num_val": 48, "holdout": []},
    })
    shard.run(cfg)
    return root


@pytest.fixture
def workdir(data_root, tmp_path) -> Path:
    """A project folder: the repository's params.yaml and the tiny data (linked)."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "data").symlink_to(data_root / "data")
    return tmp_path


def tiny_cfg(root: Path, **changes) -> TrainVAEConfig:
    paths = {"shards_dir": str(root / "data/shards"), "tokenizer_path": str(root / "data/tokenizer.json"),
             "out_dir": str(root / "models/vae"), "metrics_path": str(root / "metrics/vae.json"),
             "checkpoint_dir": str(root / "checkpoints/train_vae")}
    return TrainVAEConfig.from_dict({**TINY, **paths, **changes}, "train_vae")


def _runs(stage: str = "train_vae"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("diffusion")
    return client, client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'") if exp else []


def _artifacts(client, run_id: str, path=None) -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


# ------------------------------------------------------------------------------------------------
# The stage from the command line: killed, resumed, outputs and MLflow
# ------------------------------------------------------------------------------------------------


def test_cli_stage_killed_then_resumes_same_run(workdir, cli_env):
    args = ["train-vae", *_overrides({**TINY, "max_steps": 10})]
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=workdir, env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not list(workdir.glob("checkpoints/train_vae/*/last.ckpt")) and time.time() < deadline:
        assert proc.poll() is None, "the stage ended before writing a checkpoint"
        time.sleep(0.05)
    assert proc.poll() is None, "the stage finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (ckpt,) = workdir.glob("checkpoints/train_vae/*/last.ckpt")
    # Our own file (a test fixture), so the full unpickler is fine here.
    killed_at = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    assert 2 <= killed_at < 10
    run_id = (ckpt.parent / "mlflow_run_id.txt").read_text().strip()

    started = time.time() * 1000
    out = run_cli(args, workdir, cli_env).stdout
    assert f"resuming from {ckpt.relative_to(workdir)}" in out
    assert re.search(r"train_vae: rank 0 of 1 took 10 optimizer steps; weights [0-9a-f]{12}", out), out
    assert (ckpt.parent / "mlflow_run_id.txt").read_text().strip() == run_id

    # One MLflow run, continued: tags, params, per-step metrics, the grid.
    client, runs = _runs()
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert {"stage", "git_commit", "dvc_exp_name"} <= set(run.data.tags)
    assert run.data.params["batch_size"] == "4" and run.data.params["model.base_channels"] == "8"
    history = client.get_metric_history(run_id, "train/loss")
    resumed_steps = sorted(m.step for m in history if m.timestamp >= started)
    # The global step continued: the second process logged only the steps after the checkpoint, each at its
    # optimizer step (as the checkpoint counts them), not Lightning's count of the steps before it.
    assert resumed_steps == list(range(killed_at + 1, 11))
    assert any(p.startswith("reconstructions/") and p.endswith(".png") for p in _artifacts(client, run_id))

    metrics = json.loads((workdir / "metrics/vae.json").read_text())
    assert metrics["steps"] == 10
    assert {"val_psnr", "val_ssim", "train_loss", "latent_scale", "latent_shift"} <= set(metrics)
    assert metrics["val_psnr"] > 0 and 0 < metrics["latent_scale"]
    assert run.data.metrics["val_psnr"] == pytest.approx(metrics["val_psnr"])
    _check_vae_artifact(workdir / "models/vae", workdir / "data/shards/val")

    # And it ends where a run that was never stopped ends, to the bit (exact_resume.ExactResume). A validation
    # every 3 steps, off the checkpoint grid, must not shift the noise either (it may be set freely).
    again = {"checkpoint_dir": "checkpoints/again", "out_dir": "models/again", "metrics_path": "metrics/again.json",
             "val_every_n_steps": 3}
    run_cli([*args, *_overrides(again)], workdir, cli_env)
    assert (workdir / "models/again/model.pt").read_bytes() == (workdir / "models/vae/model.pt").read_bytes()
    assert json.loads((workdir / "metrics/again.json").read_text())["train_loss"] == metrics["train_loss"]


def _check_vae_artifact(vae_dir: Path, val_shards: Path) -> None:
    """models/vae loads, and its scale makes the val latents roughly unit variance."""
    from diffusion.data.shard_reading import iter_shards
    from diffusion.training import load_vae

    config = json.loads((vae_dir / "config.json").read_text())
    assert config["vae"]["base_channels"] == 8 and "latent_scale" in config and "latent_shift" in config
    vae, scale, shift = load_vae(vae_dir)
    x = torch.stack([s["image"] for s, _ in zip(iter_shards(str(val_shards)), range(32))])
    with torch.no_grad():
        z = vae.encode(x).sample(torch.Generator().manual_seed(0))
    scaled = (z - shift) * scale
    assert 0.6 < scaled.std().item() < 1.6
    assert abs(scaled.mean().item()) < 0.6


# ------------------------------------------------------------------------------------------------
# In-process runs: changed parameters, the discriminator, a diverging loss
# ------------------------------------------------------------------------------------------------


def test_same_params_rerun_resumes_changed_params_start_fresh(tmp_path, data_root):
    from pipeline.train_vae import main

    (tmp_path / "data").symlink_to(data_root / "data")
    # 3 steps, a checkpoint every 2: the last step is off the interval, and last.ckpt must still hold it.
    first = main(tiny_cfg(tmp_path, max_steps=3, checkpoint_every_n_steps=2))
    weights = (tmp_path / "models/vae/model.pt").read_bytes()
    (ckpt,) = (tmp_path / "checkpoints/train_vae").glob("*/last.ckpt")
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 3
    # Same parameters, data and code (e.g. `dvc repro -f`): the finished checkpoint is resumed, nothing
    # trains, the outputs are identical, and the same MLflow run continues.
    again = main(tiny_cfg(tmp_path, max_steps=3, checkpoint_every_n_steps=2))
    assert again == first and "train_loss" in again
    assert (tmp_path / "models/vae/model.pt").read_bytes() == weights
    assert len(_runs()[1]) == 1
    # A parameter the key ignores changed: the same checkpoint, but a new MLflow run, since the finished run's
    # logged params cannot change (and its tags must not be rewritten).
    with pytest.warns(UserWarning, match="new MLflow run"):
        main(tiny_cfg(tmp_path, max_steps=3, checkpoint_every_n_steps=2, log_every_n_steps=7))
    assert (tmp_path / "models/vae/model.pt").read_bytes() == weights
    _, runs = _runs()
    assert len(runs) == 2 and "7" in {r.data.params["log_every_n_steps"] for r in runs}
    # The new run says which run and checkpoint it continues (the warning goes to stderr only).
    new, old = sorted(runs, key=lambda r: r.data.params["log_every_n_steps"] == "7", reverse=True)
    assert new.data.tags["resumed_from_run"] == old.info.run_id
    assert Path(new.data.tags["resumed_from_checkpoint"]).resolve() == ckpt.resolve()
    assert "resumed_from_run" not in old.data.tags
    second = main(tiny_cfg(tmp_path, max_steps=3, checkpoint_every_n_steps=2, lr=1e-4))
    assert second["steps"] == 3
    folders = sorted((tmp_path / "checkpoints/train_vae").iterdir())
    assert len(folders) == 2  # a new key: a fresh start beside the old checkpoint
    ids = {(f / "mlflow_run_id.txt").read_text().strip() for f in folders}
    _, runs = _runs()
    assert len(ids) == 2 and ids <= {r.info.run_id for r in runs} and len(runs) == 3


def test_discriminator_path_runs_with_manual_optimization(tmp_path, data_root):
    from pipeline.train_vae import main

    (tmp_path / "data").symlink_to(data_root / "data")
    disc = {"enabled": True, "start_step": 1, "num_layers": 2, "channels": 8}
    metrics = main(tiny_cfg(tmp_path, max_steps=3, discriminator=disc))
    # One global step per batch although two optimizers step (pytorch-lightning #17958 avoided).
    assert metrics["steps"] == 3
    # Both LR schedules count every batch (the discriminator's too, before start_step): same position.
    (ckpt,) = (tmp_path / "checkpoints/train_vae").glob("*/last.ckpt")
    schedulers = torch.load(ckpt, map_location="cpu", weights_only=False)["lr_schedulers"]
    assert [s["last_epoch"] for s in schedulers] == [3, 3]
    assert {"train_d_loss", "train_g_loss", "train_d_weight"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    client, (run,) = _runs()
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [1, 2, 3]


def test_mlflow_steps_are_optimizer_steps_and_the_last_validation_is_logged_once(tmp_path, data_root):
    """MLflow's step axis is the optimizer step, as checkpoints, grids and metrics files count (Lightning's
    loggers get the steps before the batch: the loss of step 1 sat at step 0). A validation after the last step
    is the final one: the stage does not run it again (it sat at steps 3 and 4 with the same weights)."""
    from pipeline.train_vae import main

    (tmp_path / "data").symlink_to(data_root / "data")
    metrics = main(tiny_cfg(tmp_path, max_steps=4, val_every_n_steps=2))
    client, (run,) = _runs()

    def history(key):
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    assert [step for step, _ in history("train/loss")] == [1, 2, 3, 4]
    psnr = history("val/psnr")
    assert [step for step, _ in psnr] == [2, 4] and psnr[-1][1] == pytest.approx(metrics["val_psnr"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_psnr")] == [4]
    grids = [p for p in _artifacts(client, run.info.run_id) if p.startswith("reconstructions/")]
    assert sorted(grids) == ["reconstructions/step_0000002.png", "reconstructions/step_0000004.png"]


def test_non_finite_loss_stops_naming_the_step(tmp_path, data_root, monkeypatch):
    from diffusion.training.nonfinite import NonFiniteLossError
    from diffusion.training.vae_system import VAESystem
    from pipeline.train_vae import main

    real = VAESystem.reconstruction_losses

    def poisoned(self, x, recon, posterior):
        out = real(self, x, recon, posterior)
        if self.training and self.global_step >= 2:  # the third step's loss
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(VAESystem, "reconstruction_losses", poisoned)
    (tmp_path / "data").symlink_to(data_root / "data")
    cfg = tiny_cfg(tmp_path, max_steps=6, log_every_n_steps=5, checkpoint_every_n_steps=2)
    with pytest.raises(NonFiniteLossError, match=r"at step 3\b"):
        main(cfg)
    (ckpt,) = (tmp_path / "checkpoints/train_vae").glob("*/last.ckpt")
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2  # the last good one
    assert not (tmp_path / "models/vae").exists()


# ------------------------------------------------------------------------------------------------
# Configuration and inputs
# ------------------------------------------------------------------------------------------------


def test_bad_config_exits_2_naming_the_key(workdir, cli_env):
    proc = run_cli(["train-vae", "-S", "train_vae.batch_size=0"], workdir, cli_env, check=False)
    assert proc.returncode == 2 and "train_vae.batch_size" in proc.stderr
    # The VAE replaces its whole folder: pointed at data/ it deleted the shards, after training.
    proc = run_cli(["train-vae", "-S", "train_vae.out_dir=data"], workdir, cli_env, check=False)
    assert proc.returncode == 2 and "train_vae.out_dir: data holds" in proc.stderr
    assert (workdir / "data/shards/manifest.json").is_file()
    # The shards hold RGB: another channel count failed inside the first step, with the run open.
    with pytest.raises(ConfigError, match=r"train_vae.model.in_channels: the shards hold RGB"):
        TrainVAEConfig.from_dict({"model": {"in_channels": 1}}, "train_vae")


def test_a_damaged_checkpoint_stops_the_stage_before_its_run(tmp_path, data_root):
    from pipeline.train_vae import main

    from diffusion.training.checkpointing import CheckpointError

    (tmp_path / "data").symlink_to(data_root / "data")
    main(tiny_cfg(tmp_path, max_steps=2))
    (ckpt,) = (tmp_path / "checkpoints/train_vae").glob("*/last.ckpt")
    run_id = (ckpt.parent / "mlflow_run_id.txt").read_text()
    with open(ckpt, "r+b") as fh:
        fh.truncate(ckpt.stat().st_size // 2)  # a copy cut short
    with pytest.raises(CheckpointError, match=rf"{ckpt.name}: damaged checkpoint .* delete the folder"):
        main(tiny_cfg(tmp_path, max_steps=2))
    assert len(_runs()[1]) == 1 and (ckpt.parent / "mlflow_run_id.txt").read_text() == run_id


def test_hardware_this_machine_lacks_stops_the_stage_before_its_run(workdir, cli_env):
    accelerator = "gpu" if not torch.cuda.is_available() else "mps"
    proc = run_cli(["train-vae", "-S", f"train_vae.accelerator={accelerator}"], workdir, cli_env, check=False)
    assert proc.returncode == 2 and "train_vae.accelerator" in proc.stderr, proc.stderr
    assert not (workdir / "checkpoints").exists() and not _runs()[1]  # nothing opened or written


def test_check_hardware_against_the_devices_torch_sees(monkeypatch):
    from types import SimpleNamespace

    from diffusion.training.trainer import check_hardware

    def check(gpus: int, mps: bool = False, **fields):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        check_hardware(SimpleNamespace(**{"accelerator": "auto", "devices": 1, "strategy": "auto", "num_nodes": 1,
                                          **fields}), "s")

    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "SLURM_NTASKS", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    check(0), check(0, accelerator="cpu", devices=4, strategy="ddp")  # CPU processes: any number
    check(2, devices=-1, strategy="ddp")  # -1: every GPU
    check(2, accelerator="gpu", devices=2, strategy="fsdp"), check(0, True, accelerator="gpu")  # gpu: MPS too
    for gpus, mps, fields, key in ((0, False, {"accelerator": "cuda"}, "s.accelerator"),
                                   (0, True, {"accelerator": "cuda"}, "s.accelerator"),
                                   (0, False, {"accelerator": "mps"}, "s.accelerator"),
                                   (2, False, {"devices": 3}, "s.devices"),
                                   (0, False, {"strategy": "fsdp"}, "s.strategy"),
                                   (2, False, {"accelerator": "cpu", "strategy": "fsdp"}, "s.strategy"),
                                   # Lightning's TypeError, after the run had opened:
                                   (0, False, {"devices": -1, "strategy": "ddp"}, "s.devices"),
                                   # no launcher: it waited 30 minutes for the second machine
                                   (0, False, {"num_nodes": 2, "strategy": "ddp"}, "s.num_nodes")):
        with pytest.raises(ConfigError, match=key):
            check(gpus, mps, **fields)

    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")  # joined by hand (README): a launcher
    check(0, num_nodes=2, strategy="ddp")
    # torchrun's layout must be the Trainer's (Lightning's ValueError came after the run had opened).
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x"), monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    check(0, devices=2, strategy="ddp")
    with pytest.raises(ConfigError, match=r"s\.devices: 1, but torchrun started 2"):
        check(0, strategy="ddp")
    monkeypatch.setenv("WORLD_SIZE", "4")
    check(0, devices=2, num_nodes=2, strategy="ddp")
    with pytest.raises(ConfigError, match=r"s\.num_nodes=2"):
        check(0, devices=2, strategy="ddp")


def test_discriminator_refuses_plain_ddp():
    with pytest.raises(ConfigError, match=r"train_vae\.strategy: .*ddp_find_unused_parameters_true"):
        TrainVAEConfig.from_dict({"discriminator": {"enabled": True}, "strategy": "ddp"}, "train_vae")
    TrainVAEConfig.from_dict({"discriminator": {"enabled": True}, "strategy": "ddp_find_unused_parameters_true"},
                             "train_vae")


def test_discriminator_refuses_accumulation_and_clipping():
    with pytest.raises(ConfigError, match=r"train_vae\.accumulate_grad_batches: .*discriminator\.enabled"):
        TrainVAEConfig.from_dict({"discriminator": {"enabled": True}, "accumulate_grad_batches": 2}, "train_vae")
    with pytest.raises(ConfigError, match=r"train_vae\.gradient_clip_val: .*discriminator\.enabled"):
        TrainVAEConfig.from_dict({"discriminator": {"enabled": True}, "gradient_clip_val": 1.0}, "train_vae")
    TrainVAEConfig.from_dict({"accumulate_grad_batches": 2, "gradient_clip_val": 1.0}, "train_vae")  # fine without


def test_missing_shards_name_the_shard_command(tmp_path):
    from pipeline.train_vae import TrainVAEError, validate

    with pytest.raises(TrainVAEError, match="python cli.py shard"):
        validate(tiny_cfg(tmp_path))


def test_params_yaml_section_parses():
    from diffusion.params import load_section

    cfg = load_section(TrainVAEConfig, ROOT / "params.yaml")
    assert cfg.checkpoint_dir == "checkpoints/train_vae" and cfg.kl_weight > 0


@pytest.mark.parametrize("first, second", [("diffusion.stage_configs", "diffusion.models.vae"),
                                           ("diffusion.models.vae", "diffusion.stage_configs")])
def test_config_and_vae_import_in_either_order(first, second):
    code = (f"import {first}, {second}\n"
            "from diffusion.stage_configs import TrainVAEConfig\nfrom diffusion.models.vae import VAEConfig\n"
            "assert isinstance(TrainVAEConfig.from_dict({}, 'train_vae').model, VAEConfig)")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


# ------------------------------------------------------------------------------------------------
# Units: run keys, latent statistics, the grid
# ------------------------------------------------------------------------------------------------


def test_run_key_ignores_excluded_fields_only():
    from diffusion.run_keys import run_key
    from pipeline.train_vae import EXCLUDE

    base = tiny_cfg(Path("/x")).to_dict()
    key = run_key(base, extra={"data": "d"})
    assert run_key({**base, "log_every_n_steps": 7, "val_every_n_steps": 3}, extra={"data": "d"}) == key
    assert run_key({**base, "checkpoint_every_n_steps": 3}, extra={"data": "d"}) != key  # the segments (ExactResume)
    assert run_key({**base, "num_workers": 3}, extra={"data": "d"}) != key  # another sample stream
    assert run_key({**base, "lr": 0.1}, extra={"data": "d"}) != key
    # The stage's own exclusions: the schedule changes the weights, so it keys the run.
    assert run_key({**base, "lr_schedule": "linear"}, exclude=EXCLUDE) != run_key(base, exclude=EXCLUDE)
    assert run_key(base, extra={"data": "other"}) != key
    assert run_key(base, exclude=("model.base_channels",), extra={"data": "d"}) == run_key(
        {**base, "model": {**base["model"], "base_channels": 16}}, exclude=("model.base_channels",),
        extra={"data": "d"})


def test_latent_stats_give_unit_variance_and_round_trip(tmp_path):
    from diffusion.models.vae import AutoencoderKL
    from diffusion.training.latent_stats import load_vae, measure_latent_stats, save_vae

    torch.manual_seed(0)
    vae = AutoencoderKL(tiny_cfg(tmp_path).model)
    batches = [{"image": torch.rand(4, 3, 16, 16) * 2 - 1} for _ in range(3)]
    stats = measure_latent_stats(vae, batches, 3, generator=torch.Generator().manual_seed(0))
    # The same posterior samples, drawn here in the same order from the same seed, in eval mode.
    vae.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = torch.cat([vae.encode(b["image"]).sample(g) for b in batches]).double()
    assert stats.num_batches == 3 and stats.num_values == z.numel()
    assert stats.mean == pytest.approx(z.mean().item(), rel=1e-6, abs=1e-9)
    assert stats.std == pytest.approx(z.std().item(), rel=1e-6)
    assert stats.scale == pytest.approx(1 / stats.std)
    assert ((z - stats.shift) * stats.scale).std().item() == pytest.approx(1.0, rel=1e-6)
    assert ((z - stats.shift) * stats.scale).mean().item() == pytest.approx(0.0, abs=1e-6)  # shift is the mean
    save_vae(vae, stats, tmp_path / "vae")
    loaded, scale, shift = load_vae(tmp_path / "vae")
    assert (scale, shift) == (stats.scale, stats.shift)
    x = batches[0]["image"]
    torch.testing.assert_close(loaded.encode(x).mean, vae.eval().encode(x).mean)


def test_make_grid_layout():
    from diffusion.evaluation.grid import make_grid, pairs

    originals, recons = torch.zeros(3, 3, 4, 4), torch.ones(3, 3, 4, 4)
    img = make_grid(pairs(originals, recons), nrow=2, padding=1, pad_value=0.5)
    assert img.size == (2 * 5 + 1, 3 * 5 + 1)
    px = img.load()
    assert px[1, 1] == (0, 0, 0) and px[6, 1] == (255, 255, 255) and px[0, 0] == (128, 128, 128)


def test_lr_schedule_constant_or_cosine_to_min_ratio():
    from diffusion.stage_configs import TrainVAEConfig
    from diffusion.training.vae_system import schedule

    def cfg(**fields):
        return TrainVAEConfig.from_dict({"warmup_steps": 10, "max_steps": 100, **fields}, "train_vae")

    for constant in (schedule(cfg(min_lr_ratio=None)), schedule(cfg(lr_schedule="constant", min_lr_ratio=0.05))):
        assert constant(0) == pytest.approx(0.1) and constant(9) == 1.0 and constant(500) == 1.0
    cosine = schedule(cfg(min_lr_ratio=0.05))
    assert cosine(0) == pytest.approx(0.1) and cosine(10) == pytest.approx(1.0)
    assert cosine(55) == pytest.approx(0.525) and cosine(100) == pytest.approx(0.05)
    assert cosine(40) > cosine(60) > cosine(80)


@pytest.mark.parametrize("discriminator", [False, True])
def test_vae_optimizers_are_the_fused_adamw_and_clip_under_bf16(tmp_path, discriminator):
    """One fused kernel per step (training/optim.py): on a CPU the default AdamW is a for-loop of ~10 small
    kernels per tensor. Under a GradScaler (16-mixed) it is the foreach one instead, which Lightning unscales
    before clipping; without one, the system clips the fused optimizer's gradients itself."""
    from types import SimpleNamespace

    from diffusion.training.vae_system import VAESystem

    cfg = tiny_cfg(tmp_path, discriminator={"enabled": discriminator, "start_step": 0})
    system = VAESystem(cfg)
    out = system.configure_optimizers()
    opts = out[0] if discriminator else [out["optimizer"]]
    assert len(opts) == (2 if discriminator else 1)
    assert all(o.defaults["fused"] is True and not o.defaults["foreach"] for o in opts)
    params = [p for group in opts[0].param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    system.configure_gradient_clipping(opts[0], 0.5, "norm")
    assert torch.cat([p.grad.flatten() for p in params]).norm().item() == pytest.approx(0.5, rel=1e-4)
    system._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=torch.amp.GradScaler("cpu")))
    out = system.configure_optimizers()
    opts = out[0] if discriminator else [out["optimizer"]]
    assert all(not o.defaults["fused"] and o.defaults["foreach"] for o in opts)


def test_validation_metrics_are_float32_under_bf16_autocast(tmp_path, monkeypatch):
    """bf16-mixed training (the CPU default) must not make PSNR/SSIM those of a bf16 forward: validation
    runs the VAE and the metrics in float32, so it reads the same inside autocast as outside."""
    from diffusion.training.vae_system import VAESystem

    torch.manual_seed(0)
    system = VAESystem(tiny_cfg(tmp_path))
    monkeypatch.setattr(system, "log", lambda *a, **k: None)
    monkeypatch.setattr(system, "log_dict", lambda *a, **k: None)
    # A smooth image with an object, as the shapes are: SSIM of a good reconstruction is far above 0.
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    image = torch.stack([0.3 * xx, 0.3 * yy, 0.8 * ((xx**2 + yy**2) < 0.2).float() - 0.4])[None].repeat(4, 1, 1, 1)

    def metrics(autocast: bool) -> tuple[float, float]:
        system.psnr.reset()
        system.ssim.reset()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            system.validation_step({"image": image}, 0)
        return system.psnr.compute().item(), system.ssim.compute().item()

    assert metrics(autocast=True) == pytest.approx(metrics(autocast=False), rel=1e-6)


def test_precision_auto_picks_bf16_only_where_it_is_fast(monkeypatch):
    from diffusion.training import trainer

    assert trainer.resolve_precision(32, "cpu") == trainer.resolve_precision("32", "auto") == "32-true"
    assert trainer.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"  # an explicit setting is kept
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for amx, want in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert trainer.resolve_precision("auto", "auto") == want
        assert trainer.resolve_precision("auto", "cpu") == want
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # native bf16 (Ampere+); only emulated (V100, T4: torch's default check says yes, and it is slower); none
    for native, emulated, want in ((True, True, "bf16-mixed"), (False, True, "32-true"), (False, False, "32-true")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, n=native, e=emulated: n or (including_emulation and e))
        assert trainer.resolve_precision("auto", "gpu") == trainer.resolve_precision("auto", "auto") == want
    assert trainer.resolve_precision("auto", "mps") == "32-true"


def test_precision_auto_runs_and_tags_what_ran(tmp_path, data_root, monkeypatch):
    from pipeline.train_vae import main

    from diffusion.training.trainer import resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # as on a CPU with AMX
    (tmp_path / "data").symlink_to(data_root / "data")
    main(tiny_cfg(tmp_path, max_steps=2, precision="auto", accelerator="cpu"))
    (run,) = _runs()[1]
    assert run.data.params["precision"] == "auto"
    assert run.data.tags["trainer_precision"] == resolve_precision("auto", "cpu") == "bf16-mixed"
    # What Lightning runs, not what was asked: it turns 16-mixed into bf16-mixed on a CPU.
    main(tiny_cfg(tmp_path, max_steps=1, precision="16-mixed", accelerator="cpu"))
    (run,) = [r for r in _runs()[1] if r.data.params["precision"] == "16-mixed"]
    assert run.data.tags["trainer_precision"] == "bf16-mixed"


def test_only_a_run_of_this_experiment_with_these_params_is_continued(monkeypatch):
    """MLflow refuses to resume a run under another active experiment (every retry failed until the checkpoint
    folder was deleted); and a run logged with other values cannot take the new ones: both get a new run."""
    from diffusion.tracking import stage_run
    from diffusion.training.checkpointing import _run_to_continue

    params = {"lr": 0.1, "channel_mult": [1, 2], "discriminator": {"enabled": False}}
    with stage_run("train_vae", params) as run:
        pass
    run_id = run.info.run_id
    assert _run_to_continue(run_id, params)
    assert not _run_to_continue(run_id, {**params, "lr": 0.2})
    assert not _run_to_continue("0" * 32, params)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "another")
    assert not _run_to_continue(run_id, params)


def test_discriminator_with_several_devices_needs_find_unused():
    """strategy 'auto' resolves to plain DDP for several devices, which fails on the GAN's first step."""
    with pytest.raises(ConfigError, match=r"train_vae\.strategy: 'auto'.*ddp_find_unused_parameters_true"):
        TrainVAEConfig.from_dict({"discriminator": {"enabled": True}, "devices": 2}, "train_vae")
    TrainVAEConfig.from_dict({"discriminator": {"enabled": True}, "devices": 1}, "train_vae")
    with pytest.raises(ConfigError, match="train_vae.strategy"):
        TrainVAEConfig.from_dict({"strategy": "ddp_spawn"}, "train_vae")


def test_under_slurm_lightning_does_not_requeue_or_save_its_own_checkpoints(monkeypatch):
    """Lightning's SLURM default saved hpc_ckpt_N.ckpt on SIGUSR1 at an arbitrary step, which a restart
    preferred when there was no last.ckpt: another trajectory than the run never stopped, in a second MLflow run."""
    from diffusion.training.trainer import build_trainer

    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "diffusion-train", "SLURM_JOB_ID": "123",
                        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                        "SLURM_NODELIST": "localhost", "SLURM_NTASKS_PER_NODE": "1"}.items():
        monkeypatch.setenv(name, value)
    trainer = build_trainer(TrainVAEConfig(accelerator="cpu", max_steps=2), callbacks=[], logger=False)
    environment = trainer._accelerator_connector.cluster_environment
    assert type(environment).__name__ == "SLURMEnvironment" and environment.auto_requeue is False
    # torchrun inside a SLURM job (`srun torchrun ...`): torchrun's environment, as Lightning itself chooses; the
    # SLURM one gave both workers of the node the task's rank and failed on --ntasks-per-node=1 against devices=2.
    for name, value in {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0",
                        "LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    trainer = build_trainer(TrainVAEConfig(accelerator="cpu", max_steps=2), callbacks=[], logger=False)
    assert type(trainer._accelerator_connector.cluster_environment).__name__ == "TorchElasticEnvironment"


def test_under_srun_the_tasks_must_be_the_trainers_processes(monkeypatch):
    """srun's layout is checked before the run opens, as torchrun's is: Lightning's ValueError came from the Trainer,
    after the MLflow run and the checkpoint folder existed."""
    from types import SimpleNamespace

    from diffusion.training.trainer import check_hardware

    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "diffusion-train", "SLURM_NTASKS_PER_NODE": "2",
                        "SLURM_NNODES": "2"}.items():
        monkeypatch.setenv(name, value)

    def check(**fields):
        check_hardware(SimpleNamespace(**{"accelerator": "cpu", "devices": 2, "strategy": "ddp", "num_nodes": 2,
                                          **fields}), "s")

    check(), check(devices="auto")
    with pytest.raises(ConfigError, match=r"s\.devices: 1, but SLURM runs --ntasks-per-node=2"):
        check(devices=1)
    with pytest.raises(ConfigError, match=r"s\.num_nodes=2"):
        check(num_nodes=1)
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # not srun's tasks (Lightning's rule): not checked
    check(devices=1)


def test_vae_loss_adds_the_weighted_kl():
    """loss = rec + kl_weight * KL (LDM's KL-regularised autoencoder): dropping the KL term passed every test."""
    from diffusion.models.vae import DiagonalGaussian
    from diffusion.training.vae_system import VAESystem

    cfg = TrainVAEConfig.from_dict({"model": {"base_channels": 8, "norm_groups": 4, "channel_mult": [1, 2],
                                              "num_res_blocks": 1, "mid_attention": False}, "kl_weight": 0.5},
                                   "train_vae")
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    posterior = DiagonalGaussian(torch.ones(2, 4, 4, 4), torch.zeros(2, 4, 4, 4))  # KL = 0.5 * mean^2 per value
    out = VAESystem(cfg).reconstruction_losses(x, x * 0.5, posterior)
    assert out["kl"].item() == pytest.approx(0.5 * 64 / (3 * 8 * 8))  # summed over the latent, per pixel value
    assert out["loss"].item() == pytest.approx(out["rec"].item() + 0.5 * out["kl"].item())


def test_make_grid_places_images_row_by_row():
    from diffusion.evaluation.grid import make_grid

    levels = torch.tensor([10, 50, 90, 130, 170]) / 255.0
    images = levels.view(5, 1, 1, 1).expand(5, 3, 4, 4)
    grid = np.asarray(make_grid(images, nrow=2, padding=1, pad_value=1.0))
    assert grid.shape == (3 * 5 + 1, 2 * 5 + 1, 3)  # 3 rows of 2 columns
    for i, level in enumerate([10, 50, 90, 130, 170]):
        r, c = divmod(i, 2)
        assert (grid[1 + 5 * r : 5 + 5 * r, 1 + 5 * c : 5 + 5 * c] == level).all(), i
    assert (grid[11:15, 6:10] == 255).all()  # the short last row's empty cell is padding


def test_validation_and_latent_scale_batches_are_a_uniform_choice_of_the_split(tmp_path):
    """train_vae's validation images and the latent-scale batches are drawn over the whole split: the first
    ones, in shard (key) order, are a class-folder dataset's first classes."""
    from PIL import Image

    from diffusion.data.records import Sample
    from diffusion.data.shards import write_shards
    from pipeline.train_vae import image_batches

    # Forty images of four "classes" in key order, told apart by their red channel (10 * class).
    samples = [Sample(f"c{c}_{i:02d}", Image.new("RGB", (8, 8), (10 * c, i, 0)), f"c{c}") for c in range(4)
               for i in range(10)]
    urls = [str(p) for p in write_shards(samples, tmp_path / "s", samples_per_shard=15)]
    batches = list(image_batches(urls, batch_size=4, max_batches=3, seed=0))
    assert [b["image"].shape for b in batches] == [(4, 3, 8, 8)] * 3
    images = torch.cat([b["image"] for b in batches])
    assert images.min() >= -1 and images.max() <= 1
    red = ((images[:, 0, 0, 0] + 1) * 127.5).round().int().tolist()
    pixels = [(r, ((g + 1) * 127.5).round().int().item()) for r, g in zip(red, images[:, 1, 0, 0])]
    assert pixels == sorted(pixels)  # shard order
    assert len({r // 10 for r in red}) >= 3  # the first 12 would be classes 0 and 1
    assert torch.equal(images, torch.cat([b["image"] for b in image_batches(urls, 4, 3, seed=0)]))
    # Fewer images than asked for: all of them, in order, the last batch short.
    every = list(image_batches(urls, batch_size=16, max_batches=3, seed=0))
    assert [len(b["image"]) for b in every] == [16, 16, 8]
