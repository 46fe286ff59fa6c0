"""The train stage's validation loss (training/val_loss.py): a fixed, stratified set; the EMA weights; figures in
MLflow, metrics/train.json and the val curve; trained weights the same to the bit with or without it; a resumed run's
figures those of an uninterrupted one; a val split too small stops the stage before its run.

Stage tests use test_train_stage's tiny project (32 val latents, batch 8: val_batches 4 is the whole val split).
"""

import contextlib
import copy
import csv
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import test_train_stage
import torch
from test_train_stage import _tiny_seed_model, runs, train_in_process

# test_train_stage's tiny project (shard, train_vae and encode_latents run once for this module).
upstream, project = test_train_stage.upstream, test_train_stage.project

QUICK = ("train.sample_every_n_steps=0", "train.sample_prompts=[]")
QUARTERS = ["loss_t000_249", "loss_t250_499", "loss_t500_749", "loss_t750_999"]


def _prepare(project, seed=0, batches=4, batch_size=8):
    from diffusion.data.tokenizer import load_tokenizer
    from diffusion.training.latent_stats import read_vae_config
    from diffusion.training.val_loss import prepare_val_set

    vae = read_vae_config(project / "models/vae")
    return prepare_val_set(
        [str(p) for p in sorted((project / "data/latents/val").glob("*.tar"))],
        [str(p) for p in sorted((project / "data/latents/train").glob("*.tar"))],
        load_tokenizer(project / "data/tokenizer.json"), batch_size=batch_size, batches=batches,
        latent_scale=vae["latent_scale"], latent_shift=vae["latent_shift"], num_timesteps=1000, seed=seed)


def test_stratified_timesteps_put_one_in_each_stratum():
    from diffusion.training.val_loss import quarters, stratified_timesteps

    t = stratified_timesteps(8, 1000, torch.Generator().manual_seed(0))
    assert sorted(t.tolist()) == [62, 187, 312, 437, 562, 687, 812, 937]
    assert t.tolist() != sorted(t.tolist()), "assigned in a drawn order, not the shards'"
    assert torch.equal(t, stratified_timesteps(8, 1000, torch.Generator().manual_seed(0)))
    t = stratified_timesteps(1000, 1000, torch.Generator().manual_seed(1))
    assert sorted(t.tolist()) == list(range(1000))  # n = T: every timestep once
    assert [q[0] for q in quarters(1000)] == QUARTERS
    assert quarters(1000)[3][1:] == (750, 999) and quarters(10)[0] == ("loss_t0_1", 0, 1)


def test_the_prepared_set_is_fixed_by_the_seed(project):
    """Same seed, same tensors; another seed, another choice and other draws. The seen set has as many samples as
    the held-out one and different latents; the tokens are the captions' without dropout."""
    first, again, other = _prepare(project), _prepare(project), _prepare(project, seed=1)
    for name in ("latents", "tokens", "seen_latents", "seen_tokens", "t", "noise"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert not torch.equal(first.noise, other.noise) and not torch.equal(first.seen_latents, other.seen_latents)
    assert len(first) == 32 and first.seen_latents.shape == first.latents.shape == first.noise.shape
    assert not torch.equal(first.latents, first.seen_latents)
    assert (first.tokens[:, 2] != 0).all(), "no caption dropped (the null caption is BOS EOS PAD ...)"
    # The quarters of [0, 1000) get 8 samples each: stratified, not drawn.
    assert torch.bincount(first.t // 250).tolist() == [8, 8, 8, 8]
    # Fewer asked for than the split has: a uniform choice, not the first samples of the shards.
    few = _prepare(project, batches=1)
    assert len(few) == 8 and not torch.equal(few.seen_latents, first.seen_latents[:8])


def _ema_trainer(ema_copy, step=3):
    from diffusion.training.callbacks import EMA

    ema = EMA(decay=0.9)
    ema._average_model = SimpleNamespace(module=SimpleNamespace(model=ema_copy))
    return SimpleNamespace(callbacks=[ema], global_step=step, loggers=[],
                           precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext))


def test_validation_measures_the_ema_weights_and_leaves_them_as_they_were():
    from diffusion.scheduler import DDPMScheduler
    from diffusion.training.diffusion_system import DiffusionSystem, OptimSettings
    from diffusion.training.val_loss import (
        ValLoss,
        ValSet,
        evaluate,
        stratified_timesteps,
    )

    model, _ = _tiny_seed_model("dit")
    system = DiffusionSystem(model, DDPMScheduler(), OptimSettings(min_snr_gamma=5.0))
    ema_copy = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema_copy.denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    n = 12
    val_set = ValSet(torch.randn(n, 4, 8, 8, generator=g), torch.randint(4, 20, (n, 6), generator=g),
                     torch.randn(n, 4, 8, 8, generator=g), torch.randint(4, 20, (n, 6), generator=g),
                     stratified_timesteps(n, 1000, g), torch.randn(n, 4, 8, 8, generator=g), 5, 1000)
    before = {k: v.clone() for k, v in ema_copy.state_dict().items()}
    callback = ValLoss(val_set, every_n_steps=2)
    figures = callback.validate(_ema_trainer(ema_copy), system)
    assert figures == evaluate(system, ema_copy, val_set)
    assert figures["loss"] != evaluate(system, model, val_set)["loss"], "the live weights' loss, not the EMA's"
    assert set(figures) == {"loss", "seen_loss", *QUARTERS} and all(math.isfinite(v) for v in figures.values())
    assert all(torch.equal(before[k], v) for k, v in ema_copy.state_dict().items())
    assert ema_copy.training, "the model's mode is put back"
    # The figures are the training objective at the set's t and noise (weighted_loss), in 3 batches (5, 5, 2).
    held = system.weighted_loss(val_set.latents, val_set.tokens, val_set.t, val_set.noise, model=ema_copy.eval())
    assert figures["loss"] == pytest.approx(held.double().mean().item(), rel=1e-6)
    assert callback.points == [(3, figures)] and callback.curve_csv().splitlines()[0] == \
        "step,loss,seen_loss," + ",".join(QUARTERS)


def _curve(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_validation_changes_no_weight_and_reports_every_figure(project, capsys, one_thread):
    """Bit-identical exported weights without validation and with four; the figures in metrics/train.json, the CSV
    curve and MLflow; the last ones those of the exported (EMA) model; and with another cadence the same figures at
    the same step (the set does not depend on val_every_n_steps)."""
    (project / "plots").mkdir(exist_ok=True)
    (project / "plots/val_loss.csv").write_text("step,loss\n1,9.0\n")  # an earlier run's curve
    train_in_process(project, *QUICK, "train.val_batches=0", "train.checkpoint_dir=ck/none",
                     "train.out_dir=models/none", "train.metrics_path=metrics/none.json")
    # A declared DVC output is written without validation too (DVC fails a stage that does not), header only.
    assert (project / "plots/val_loss.csv").read_text() == "step,loss,seen_loss\n"
    assert not any(k.startswith("val_") for k in json.loads((project / "metrics/none.json").read_text()))
    # Every 3 steps: off the checkpoints' segment boundaries (every 4), where ExactResume reseeds the global
    # generator, so a validation that drew from it would change the weights.
    train_in_process(project, *QUICK, "train.val_batches=4", "train.val_every_n_steps=3")
    model_pt = (project / "models/diffusion/model.pt").read_bytes()
    assert model_pt == (project / "models/none/model.pt").read_bytes(), "validation changed the trained weights"
    assert "val loss" in capsys.readouterr().out

    metrics = json.loads((project / "metrics/train.json").read_text())
    keys = ["val_loss", "val_seen_loss", *(f"val_{q}" for q in QUARTERS)]
    assert all(math.isfinite(metrics[k]) and metrics[k] > 0 for k in keys), metrics
    assert metrics["val_samples"] == 32  # the tiny project's whole val split: 4 batches of 8
    rows = _curve(project / "plots/val_loss.csv")
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 12]
    assert list(rows[0]) == ["step", "loss", "seen_loss", *QUARTERS]
    assert float(rows[-1]["loss"]) == pytest.approx(metrics["val_loss"], abs=1e-6)
    client, found = runs("train")
    run = max(found, key=lambda r: r.info.start_time)  # the one with validation (the first had none)
    history = sorted(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [3, 6, 9, 12]
    assert [round(m.value, 6) for m in history] == [float(r["loss"]) for r in rows]
    assert client.get_metric_history(run.info.run_id, "val/seen_loss")
    assert run.data.metrics["val_loss"] == pytest.approx(metrics["val_loss"])
    _check_against_the_exported_model(project, metrics)

    # Another cadence (5, 10, 12), its own checkpoints: the same weights, so the same figures at step 12.
    train_in_process(project, *QUICK, "train.val_every_n_steps=5", "train.checkpoint_dir=ck/five",
                     "train.out_dir=models/five", "train.metrics_path=metrics/five.json",
                     "train.val_curve_path=plots/five.csv")
    five = _curve(project / "plots/five.csv")
    assert [int(r["step"]) for r in five] == [5, 10, 12] and five[-1] == rows[-1]


def _check_against_the_exported_model(project, metrics, model_dir="models/diffusion"):
    """The final val_loss is the exported model's loss on the stage's set: the EMA weights were measured."""
    from diffusion.models import LatentDiffusionModel
    from diffusion.params import load_section
    from diffusion.scheduler import DDPMScheduler
    from diffusion.stage_configs import TrainConfig
    from diffusion.training.diffusion_system import DiffusionSystem, OptimSettings
    from diffusion.training.val_loss import evaluate

    cfg = load_section(TrainConfig, project / "params.yaml")
    model = LatentDiffusionModel.from_pretrained(project / model_dir)
    system = DiffusionSystem(model, DDPMScheduler.from_config(cfg.scheduler),
                             OptimSettings(min_snr_gamma=cfg.min_snr_gamma, min_snr_on=cfg.min_snr_on))
    assert evaluate(system, model, _prepare(project))["loss"] == pytest.approx(metrics["val_loss"], rel=1e-5)


def test_a_resumed_run_reports_the_figures_of_an_uninterrupted_one(project, monkeypatch, one_thread):
    """Stopped after the checkpoint of step 8 (a validation step too) and rerun: the val curve and figures are the
    uninterrupted run's. (Lightning's validation loop runs after the checkpoint, and skips that validation when
    resuming from it.)"""
    from diffusion.training.exact_resume import ExactResume

    args = (*QUICK, "train.val_every_n_steps=4", "train.checkpoint_every_n_steps=4")
    train_in_process(project, *args, "train.checkpoint_dir=ck/whole", "train.out_dir=models/whole",
                     "train.metrics_path=metrics/whole.json", "train.val_curve_path=plots/whole.csv")

    class Stop(Exception):
        pass

    original = ExactResume.on_train_batch_start

    def stop_after_step_8(self, trainer, *a):
        if trainer.global_step == 8:
            raise Stop
        original(self, trainer, *a)

    monkeypatch.setattr(ExactResume, "on_train_batch_start", stop_after_step_8)
    with pytest.raises(Stop):
        train_in_process(project, *args)
    monkeypatch.setattr(ExactResume, "on_train_batch_start", original)
    train_in_process(project, *args)
    assert (project / "plots/val_loss.csv").read_text() == (project / "plots/whole.csv").read_text()
    resumed, whole = (json.loads((project / f"metrics/{n}.json").read_text()) for n in ("train", "whole"))
    assert {k: v for k, v in resumed.items() if k.startswith("val_")} == \
        {k: v for k, v in whole.items() if k.startswith("val_")}
    assert len(_curve(project / "plots/val_loss.csv")) == 3


def test_a_finished_run_rerun_with_other_val_batches_measures_the_new_set(project, one_thread):
    """val_batches is not part of the run key: rerun with another, a finished run resumes its last checkpoint and
    trains no step. Its final figures are measured again, on the new set, so that val_samples counts the latents
    val_loss measured (it reported the old set's val_loss beside the new set's size)."""
    args = (*QUICK, "train.checkpoint_dir=ck/rerun", "train.out_dir=models/rerun",
            "train.metrics_path=metrics/rerun.json", "train.val_curve_path=plots/rerun.csv")
    train_in_process(project, *args, "train.val_batches=1")
    one = json.loads((project / "metrics/rerun.json").read_text())
    train_in_process(project, *args, "train.val_batches=4")
    four = json.loads((project / "metrics/rerun.json").read_text())
    assert (one["val_samples"], four["val_samples"]) == (8, 32) and four["steps"] == one["steps"]
    assert four["val_loss"] != one["val_loss"]
    _check_against_the_exported_model(project, four, "models/rerun")
    rows = _curve(project / "plots/rerun.csv")
    assert float(rows[-1]["loss"]) == pytest.approx(four["val_loss"], abs=1e-6)
    assert [int(r["step"]) for r in rows].count(four["steps"]) == 1


@pytest.mark.parametrize("change", ["no_val_split", "empty_unlisted"])
def test_no_val_latents_stop_the_stage_before_its_run(project, change):
    import tarfile

    from pipeline.train import TrainError

    if change == "no_val_split":
        shutil.rmtree(project / "data/latents/val")
    else:  # latents made elsewhere, no manifest to count them: counted when the set is read
        (project / "data/latents/manifest.json").unlink()
        for shard in (project / "data/latents/val").glob("*.tar"):
            tarfile.open(shard, "w").close()
    with pytest.raises(TrainError, match=r"train.val_batches: .*(val_fraction|encode-latents).*val_batches: 0"):
        train_in_process(project, *QUICK)
    assert not runs("train")[1] and not (project / "checkpoints/train").exists()
    if change == "no_val_split":  # without validation the val split is not needed
        from diffusion.params import load_section
        from diffusion.stage_configs import TrainConfig
        from pipeline.train import validate

        cfg = load_section(TrainConfig, project / "params.yaml", ["train.val_batches=0"]).replace(
            latents_dir=str(project / "data/latents"), vae_dir=str(project / "models/vae"),
            tokenizer_path=str(project / "data/tokenizer.json"), out_dir=str(project / "models/diffusion"))
        assert validate(cfg)[1] == []


def test_a_val_split_under_one_batch_is_used_whole_with_a_warning(project):
    """32 val latents at batch 64: a small folder's 5% held out. Refusing it stopped a user's first run at the train
    stage; the estimate is noisier, not wrong."""
    with pytest.warns(UserWarning, match=r"holds 32 latents, less than one batch of 64"):
        train_in_process(project, *QUICK, "train.batch_size=64")
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert math.isfinite(metrics["val_loss"]) and math.isfinite(metrics["val_seen_loss"])
