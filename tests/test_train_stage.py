"""The `train` stage: outputs, MLflow, resume after SIGKILL, DDP with two processes, the seed's API.

A module fixture runs shard -> train_vae -> encode_latents once at 32 px with a tiny VAE; each test
copies that project folder and runs the train stage on it with a tiny U-Net or DiT.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, free_port, run_cli, serve_folder

from diffusion.params import apply_overrides

TINY = [
    "shard.resolution=32", "shard.samples_per_shard=100", "shard.vocab_size=64", "shard.shapes.num_train=200",
    "shard.shapes.num_val=32", "shard.shapes.holdout=[]",
    "train_vae.model.base_channels=8", "train_vae.model.norm_groups=4", "train_vae.model.channel_mult=[1, 2]",
    "train_vae.model.num_res_blocks=1", "train_vae.model.mid_attention=false", "train_vae.batch_size=8",
    "train_vae.max_steps=4", "train_vae.scale_batches=4", "train_vae.val_batches=1", "train_vae.accelerator=cpu",
    "train.text_encoder.width=32", "train.text_encoder.depth=1", "train.text_encoder.num_heads=2",
    "train.unet.base_channels=16", "train.unet.num_heads=2", "train.unet.norm_groups=8",
    "train.dit.hidden_size=32", "train.dit.depth=2", "train.dit.num_heads=2",
    "train.batch_size=8", "train.max_steps=12", "train.warmup_steps=2", "train.log_every_n_steps=2",
    "train.checkpoint_every_n_steps=4", "train.sample_every_n_steps=6", "train.sample_steps=3",
    "train.shuffle_buffer=50", "train.accelerator=cpu",
]


def write_params(folder: Path, extra: list[str] = ()) -> Path:
    params = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), [*TINY, *extra])
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """shard, train_vae and encode_latents outputs for the tiny configuration (made once)."""
    from diffusion.data_configs import EncodeLatentsConfig, ShardConfig
    from diffusion.params import load_section
    from diffusion.stage_configs import TrainVAEConfig
    from pipeline import encode_latents, shard, train_vae

    root = tmp_path_factory.mktemp("upstream")
    params = write_params(root)
    cwd = os.getcwd()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'upstream.db'}")
        os.chdir(root)
        try:
            shard.run(load_section(ShardConfig, params))
            train_vae.main(load_section(TrainVAEConfig, params))
            encode_latents.main(load_section(EncodeLatentsConfig, params))
        finally:
            os.chdir(cwd)
    return root


def copy_project(source: Path, folder: Path) -> Path:
    """`source`'s data and models copied into `folder`, with the tiny params.yaml."""
    for name in ("data", "models"):
        shutil.copytree(source / name, folder / name)
    write_params(folder)
    return folder


@pytest.fixture
def project(upstream, tmp_path) -> Path:
    return copy_project(upstream, tmp_path)


def trains_otherwise(root: Path, args: tuple[str, ...], *extra: str) -> dict[str, str]:
    """Train `root` with `args`, then with `extra` too: the denoiser's weights must differ. Returns the second
    run's MLflow params."""
    train_in_process(root, *args)
    plain = torch.load(root / "models/diffusion/model.pt", weights_only=True)
    train_in_process(root, *args, *extra)
    other = torch.load(root / "models/diffusion/model.pt", weights_only=True)
    assert any(not torch.equal(other[k], plain[k]) for k in plain if k.startswith("denoiser."))
    return runs("train")[1][0].data.params


def runs(stage: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("diffusion")
    return client, (client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'") if exp else [])


def test_train_stage_writes_model_metrics_curve_and_one_mlflow_run(project, cli_env):
    out = run_cli(["train"], project, cli_env)
    assert "train: final loss" in out.stdout and "val loss" in out.stdout
    model_dir = project / "models/diffusion"
    assert {p.name for p in model_dir.iterdir()} >= {"config.json", "model.pt", "tokenizer.json"}
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert metrics["steps"] == 12 and metrics["final_loss"] == metrics["final_loss"]  # not NaN
    # params.yaml validates (val_batches 4; every 250 steps, and after the last): the figures of step 12.
    assert metrics["val_loss"] > 0 and metrics["val_seen_loss"] > 0
    assert (project / "plots/val_loss.csv").read_text().splitlines()[1].startswith("12,")
    curve = (project / "plots/train_loss.csv").read_text().splitlines()
    assert curve[0] == "step,loss" and [int(r.split(",")[0]) for r in curve[1:]] == [2, 4, 6, 8, 10, 12]

    client, found = runs("train")
    assert len(found) == 1
    run = found[0]
    assert run.data.tags["stage"] == "train" and "git_commit" in run.data.tags and "dvc_exp_name" in run.data.tags
    assert run.data.tags["profile"] == "cpu"  # the params profile (MLflow's params hold only what it set)
    assert run.data.params["denoising_type"] == "dit" and run.data.params["dit.hidden_size"] == "32"
    assert not [k for k in run.data.params if k.startswith("unet.")]  # the denoiser it does not build
    # The fields that follow from the inputs are logged as built (they logged the section's unused defaults).
    exported = json.loads((model_dir / "config.json").read_text())
    for key in ("in_channels", "context_dim", "input_size"):
        assert run.data.params[f"dit.{key}"] == str(exported["denoiser"][key]), key
    for key in ("vocab_size", "max_length", "pad_token_id"):
        assert run.data.params[f"text_encoder.{key}"] == str(exported["text_encoder"][key]), key
    assert exported["denoiser"]["input_size"] == 16  # the fixture's latents are 16x16
    history = client.get_metric_history(run.info.run_id, "train/loss")
    # Per step, not only at the end, at the optimizer steps the loss curve and the checkpoints count.
    assert sorted(m.step for m in history) == [2, 4, 6, 8, 10, 12]
    # The same window means in MLflow, the curve and final_loss (the mean of the last 10 points; here all 6).
    points = [float(r.split(",")[1]) for r in curve[1:]]
    assert [round(m.value, 6) for m in sorted(history, key=lambda m: m.step)] == points
    assert metrics["final_loss"] == pytest.approx(sum(points) / 6, abs=1e-6)
    throughput = client.get_metric_history(run.info.run_id, "train/samples_per_second")
    assert sorted(m.step for m in throughput) == [2, 4, 6, 8, 10, 12] and all(m.value > 0 for m in throughput)
    # The learning rate each window's last step ran at: warm-up to train.lr over 2 steps, then the cosine decay.
    lr = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/lr"), key=lambda m: m.step)]
    peak = float(run.data.params["lr"])
    assert len(lr) == 6 and lr[0] == pytest.approx(peak, rel=0.05) and lr == sorted(lr, reverse=True) and lr[-1] < peak
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    # Every 6 steps of 12: the grid of step 12 is final.png, drawn once (not step_0000012.png as well).
    assert {"samples/step_0000006.png", "samples/final.png"} <= artifacts
    assert "samples/step_0000012.png" not in artifacts

    from diffusion.data.tokenizer import encode, load_tokenizer
    from diffusion.models import LatentDiffusionModel
    from diffusion.scheduler import DDPMScheduler

    model = LatentDiffusionModel.from_pretrained(model_dir)
    tokens = encode(load_tokenizer(model_dir / "tokenizer.json"), ["a red circle in the top left"])
    images = model.generate(text_tokens=tokens, scheduler=DDPMScheduler(), num_inference_steps=2,
                            guidance_scale=3.0, image_size=(32, 32), sampler="dpmpp")
    assert images.shape == (1, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


def test_unet_trains_through_the_same_stage(project, cli_env):
    run_cli(["train", "-S", "train.denoising_type=unet", "-S", "train.max_steps=4",
             "-S", "train.sample_every_n_steps=0"], project, cli_env)
    config = json.loads((project / "models/diffusion/config.json").read_text())
    assert config["denoising_type"] == "unet" and config["denoiser"]["base_channels"] == 16
    # MLflow has the U-Net's section as built, and not the DiT's, whose derived fields nothing resolved.
    params = runs("train")[1][0].data.params
    assert params["unet.in_channels"] == str(config["denoiser"]["in_channels"])
    assert params["unet.context_dim"] == str(config["denoiser"]["context_dim"])
    assert not [k for k in params if k.startswith("dit.")]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"stage ended before {path} appeared:\n{proc.stdout.read()}")
        if time.time() > end:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.2)


def test_killed_train_stage_resumes_from_its_checkpoint_in_the_same_run(project, cli_env):
    args = [sys.executable, str(ROOT / "cli.py"), "train", "-S", "train.max_steps=24", "-S", "train.sample_every_n_steps=0"]
    proc = subprocess.Popen(args, cwd=project, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt_root = project / "checkpoints/train"
    end = time.time() + 240
    while not list(ckpt_root.glob("train-*/last.ckpt")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < end, "no checkpoint appeared"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_ms = time.time() * 1000
    ckpt = next(ckpt_root.glob("train-*/last.ckpt"))
    killed_at = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < killed_at < 24, killed_at
    assert not (project / "models/diffusion").exists(), "a killed run exports nothing"

    out = run_cli(["train", "-S", "train.max_steps=24", "-S", "train.sample_every_n_steps=0"], project, cli_env)
    assert "resuming from" in out.stdout
    assert json.loads((project / "metrics/train.json").read_text())["steps"] == 24
    client, found = runs("train")
    assert len(found) == 1, "the resumed execution continues the same MLflow run"
    history = client.get_metric_history(found[0].info.run_id, "train/loss")
    # MLflow's steps are the optimizer steps (2, 4, ... 24 for every 2nd of 24 steps, as the loss curve's), every
    # one of them: StepMeans logs a step's loss before the checkpoint of that step is written. (Through Lightning's
    # logging it reached MLflow after the checkpoint, and a kill between the two lost the point at killed_at.)
    assert {m.step for m in history} == set(range(2, 25, 2)), "every logged step is in the one run"
    # The second execution continues from the checkpoint instead of starting again from step 0. (Steps the
    # killed process logged after its last checkpoint are trained and logged again: they were lost with it.)
    resumed = [m.step for m in history if m.timestamp > killed_ms]
    assert resumed and min(resumed) > killed_at and max(resumed) == 24, (killed_at, resumed)
    curve = [int(r.split(",")[0]) for r in (project / "plots/train_loss.csv").read_text().splitlines()[1:]]
    assert curve == list(range(2, 25, 2)), "the loss curve spans both executions"

    # It ends where a run that was never stopped ends, to the bit: the same batches, timesteps and noise after
    # the checkpoint (exact_resume.ExactResume), so the same EMA weights and the same loss curve.
    train_in_process(project, "train.max_steps=24", "train.sample_every_n_steps=0", "train.checkpoint_dir=ck_again",
                     "train.out_dir=models/again", "train.metrics_path=metrics/again.json",
                     "train.loss_curve_path=plots/again.csv")
    assert (project / "models/again/model.pt").read_bytes() == (project / "models/diffusion/model.pt").read_bytes()
    assert (project / "plots/again.csv").read_text() == (project / "plots/train_loss.csv").read_text()

    # Rerunning the finished run trains nothing and writes the same metrics file, to the byte: its training time
    # is the run's as saved with the last checkpoint, not the few milliseconds of the rerun nor the run's time a
    # checkpoint write later (ExactResume.train_seconds), so `git status` shows no change after `dvc repro -f`.
    metrics = (project / "metrics/train.json").read_text()
    train_in_process(project, "train.max_steps=24", "train.sample_every_n_steps=0")
    assert (project / "metrics/train.json").read_text() == metrics
    assert json.loads(metrics)["train_seconds"] > 1.0


def train_in_process(project: Path, *overrides: str):
    """Run the train stage in this process (no interpreter start-up), from the project folder."""
    from diffusion.params import load_section
    from diffusion.stage_configs import TrainConfig
    from pipeline import train

    cwd = os.getcwd()
    os.chdir(project)
    try:
        return train.main(load_section(TrainConfig, project / "params.yaml", list(overrides)))
    finally:
        os.chdir(cwd)


def test_changed_parameters_start_a_fresh_run(project, capsys):
    quick = ("train.max_steps=2", "train.sample_every_n_steps=0")
    train_in_process(project, *quick)
    train_in_process(project, *quick, "train.lr=1e-3")
    assert "resuming" not in capsys.readouterr().out
    assert len(list((project / "checkpoints/train").iterdir())) == 2
    assert len(runs("train")[1]) == 2
    # A run shorter than the logging interval (2 here) still reports its loss: the steps after the last multiple
    # make a last window when training ends (Lightning's logging had none, and final_loss was NaN, not JSON).
    train_in_process(project, "train.max_steps=1", "train.sample_every_n_steps=0")
    metrics = json.loads((project / "metrics/train.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert metrics["steps"] == 1 and metrics["final_loss"] > 0
    assert (project / "plots/train_loss.csv").read_text().splitlines()[1:] == [f"1,{metrics['final_loss']:.6f}"]


def rank_lines(output: str) -> list[tuple[int, int, str]]:
    """(global rank, optimizer steps, weights digest) from each rank's closing line (checkpointing.rank_report)."""
    found = re.findall(r"^train: rank (\d+) of \d+ took (\d+) optimizer steps; weights (\w+)$", output, re.M)
    return [(int(rank), int(steps), digest) for rank, steps, digest in found]


@pytest.mark.timeout(300)
def test_ddp_two_processes_train_together_with_one_mlflow_run(project, cli_env):
    out = run_cli(["train", "-S", "train.devices=2", "-S", "train.strategy=ddp", "-S", "train.max_steps=6",
                   "-S", "train.sample_every_n_steps=0", "-S", "train.checkpoint_every_n_steps=100"],
                  project, cli_env)
    ranks = sorted(rank_lines(out.stdout))
    assert [r[:2] for r in ranks] == [(0, 6), (1, 6)], out.stdout
    assert ranks[0][2] == ranks[1][2], "DDP averages gradients: both ranks end with the same weights"
    assert len(runs("train")[1]) == 1
    assert json.loads((project / "metrics/train.json").read_text())["steps"] == 6


def _node_command(launcher: str, node_rank: int, port: int, overrides: list[str]) -> tuple[list[str], dict]:
    """The command and environment that start node `node_rank` of a 2-node run, as a launcher would."""
    stage = [str(ROOT / "cli.py"), "train", *(arg for o in overrides for arg in ("-S", o))]
    if launcher == "torchrun":
        # torchrun with a static rendezvous: node 0's agent hosts the store at --master-addr:--master-port;
        # each worker gets RANK, LOCAL_RANK, GROUP_RANK, WORLD_SIZE and TORCHELASTIC_RUN_ID, from which
        # Lightning picks its TorchElasticEnvironment.
        run = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        return [*run, *stage], {}
    # A hand-made cluster, as Lightning's docs describe it: MASTER_ADDR, MASTER_PORT, WORLD_SIZE, NODE_RANK
    # on each machine and a plain `python` start. Lightning's default LightningEnvironment reads them; with
    # devices=1 it starts no further process on the node.
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node_rank), "WORLD_SIZE": "2"}
    return [sys.executable, *stage], env


def _run_two_nodes(launcher: str, nodes: list[Path], overrides: list[list[str]], cli_env: dict,
                   log_name: str = "node.log") -> tuple[list[int], list[str]]:
    """Start node r of a 2-node run in folder nodes[r] with overrides[r]; wait for both. (return codes, logs)"""
    port, procs, logs = free_port(), [], [node / log_name for node in nodes]
    try:
        for rank, (node, log) in enumerate(zip(nodes, logs)):
            cmd, env = _node_command(launcher, rank, port, overrides[rank])
            # Output to files, not pipes: a full pipe would block one node, and the other waits for it.
            # One thread per node: the two "machines" share this machine's cores, and two OpenMP threads
            # per process spin against each other (Lightning divides the cores only among the processes
            # it starts on one node itself).
            env = {**cli_env, **env, "OMP_NUM_THREADS": "1"}
            with open(log, "w") as out:
                procs.append(subprocess.Popen(cmd, cwd=node, env=env, stdout=out, stderr=subprocess.STDOUT))
        for proc in procs:
            proc.wait(timeout=240)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [proc.returncode for proc in procs], [log.read_text() for log in logs]


def _second_node(project: Path, tmp_path_factory) -> Path:
    """A project copy for the second "machine" (no shared disk): its data, models and params.yaml."""
    node = tmp_path_factory.mktemp("node1")
    for name in ("data", "models"):
        shutil.copytree(project / name, node / name)
    shutil.copyfile(project / "params.yaml", node / "params.yaml")
    return node


@pytest.mark.timeout(300)
# torchrun costs a third interpreter start per node for the same training path, but it is the launcher the README
# gives, so both run.
@pytest.mark.parametrize("launcher", ["env", "torchrun"])
def test_two_nodes_train_together_and_only_node_zero_writes(launcher, project, tmp_path_factory, cli_env):
    """Two machines, simulated by two processes on localhost with a project copy each (no shared disk),
    joined by gloo: both take the same steps and end with the same weights (ranks read different batches,
    so only averaged gradients keep them equal); only global rank 0 exports, checkpoints and logs to MLflow."""
    nodes = [project, _second_node(project, tmp_path_factory)]
    overrides = ["train.num_nodes=2", "train.devices=1", "train.strategy=ddp", "train.max_steps=4",
                 "train.sample_every_n_steps=0", "train.checkpoint_every_n_steps=100"]
    codes, outs = _run_two_nodes(launcher, nodes, [overrides, overrides], cli_env)
    assert codes == [0, 0], "\n----\n".join(outs)
    (rank0,), (rank1,) = rank_lines(outs[0]), rank_lines(outs[1])
    assert rank0[:2] == (0, 4) and rank1[:2] == (1, 4), outs
    assert rank0[2] == rank1[2], "the two nodes ended with different weights: gradients were not averaged"
    assert "rank 0 of 2" in outs[0] and "rank 1 of 2" in outs[1]

    assert (nodes[0] / "models/diffusion/model.pt").is_file() and not (nodes[1] / "models/diffusion").exists()
    assert json.loads((nodes[0] / "metrics/train.json").read_text())["steps"] == 4
    assert not (nodes[1] / "metrics").exists()
    ckpt = next((nodes[0] / "checkpoints/train").glob("train-*/last.ckpt"))
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 4
    assert not list(nodes[1].glob("checkpoints/train/*/last.ckpt"))
    found = runs("train")[1]
    assert len(found) == 1, "one MLflow run for the execution, not one per node"
    assert found[0].data.params["num_nodes"] == "2"


@pytest.mark.timeout(300)
def test_nodes_that_run_different_parameters_stop_together(project, tmp_path_factory, cli_env):
    """A node started with another learning rate trained apart without a word (each rank exported its own
    weights' digest, rank 0 its model); one with another max_steps left both waiting for ever. Both stop
    before the first step, each saying why in one line."""
    nodes = [project, _second_node(project, tmp_path_factory)]
    overrides = ["train.num_nodes=2", "train.devices=1", "train.strategy=ddp", "train.max_steps=4",
                 "train.sample_every_n_steps=0", "train.checkpoint_every_n_steps=100",
                 "train.out_dir=models/mismatch"]
    codes, outs = _run_two_nodes("env", nodes, [overrides, overrides + ["train.lr=0.01"]], cli_env, "mismatch.log")
    assert codes == [1, 1], outs  # a mistake at launch: exit 1 and one line, as for a missing input
    assert "error: rank 1 runs run" in outs[1] and "same parameters" in outs[1], outs[1]
    assert "error: rank 0: another rank runs another run" in outs[0], outs[0]
    assert not any("Traceback" in out for out in outs), outs
    assert not rank_lines(outs[0]) and not (project / "models/mismatch").exists()


def test_train_stage_reads_its_latents_through_a_url_as_from_the_folder(project, tmp_path_factory, capsys,
                                                                          one_thread):
    """`train.latents_dir` may be the latents folder behind a URL (diffusion.data.locations). Moved out of the
    project and read through `pipe:cat` and over HTTP (curl), it trains exactly the weights the folder does."""
    quick = ("train.max_steps=2", "train.sample_every_n_steps=0", "train.checkpoint_every_n_steps=100")
    train_in_process(project, *quick)
    bucket = tmp_path_factory.mktemp("bucket")
    shutil.move(project / "data/latents", bucket / "latents")  # no local copy is left to fall back on
    train_in_process(project, *quick, f"train.latents_dir=pipe:cat {bucket}/latents/{{}}")
    with serve_folder(bucket) as base:
        train_in_process(project, *quick, f"train.latents_dir={base}/latents")
    out = capsys.readouterr().out
    lines = rank_lines(out)
    assert [line[:2] for line in lines] == [(0, 2)] * 3, out
    assert len({line[2] for line in lines}) == 1, "the same shards in the same order give the same weights"
    # Each location was a run of its own (its shards are part of the run key), so each really trained.
    assert "resuming" not in out and len(list((project / "checkpoints/train").iterdir())) == 3


def test_non_finite_loss_stops_with_the_step_named(project):
    from diffusion.training.nonfinite import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"step \d+"):
        train_in_process(project, "train.lr=1e30", "train.gradient_clip_val=null", "train.warmup_steps=0",
                         "train.log_every_n_steps=1", "train.sample_every_n_steps=0")
    assert not (project / "models/diffusion").exists()


def test_missing_latents_and_bad_parameters_exit_with_clear_errors(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from diffusion.cli import app

    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    missing = CliRunner().invoke(app, ["train"])
    assert missing.exit_code == 1 and "encode-latents" in missing.output
    bad = CliRunner().invoke(app, ["train", "-S", "train.denoising_type=gan"])
    assert bad.exit_code == 2 and "train.denoising_type" in bad.output


def test_the_run_key_covers_what_changes_the_weights():
    """The sample grid's settings only look at the model; compile changes the rounding of every step."""
    from diffusion.run_keys import run_key
    from diffusion.stage_configs import TrainConfig
    from pipeline.train import EXCLUDE

    base = TrainConfig().to_dict()
    key = run_key(base, exclude=EXCLUDE)
    assert run_key({**base, "sample_steps": 7, "sample_guidance": 2.0}, exclude=EXCLUDE) == key
    # Validation reads the EMA weights and draws nothing from the training generators (tests/test_val_loss.py).
    assert run_key({**base, "val_batches": 0, "val_every_n_steps": 7, "val_curve_path": "x.csv"}, exclude=EXCLUDE) == key
    assert run_key({**base, "compile": not base["compile"]}, exclude=EXCLUDE) != key
    assert run_key({**base, "lr_schedule": "linear"}, exclude=EXCLUDE) != key


def test_latents_the_denoiser_cannot_patch_stop_before_the_run(project):
    from diffusion.config import ConfigError

    # The fixture's latents are 16x16: a DiT with 3x3 patches cannot cover them.
    with pytest.raises(ConfigError, match=r"train.dit.patch_size: .* divisible by 3, .* are 16x16"):
        train_in_process(project, "train.denoising_type=dit", "train.dit.patch_size=3", "train.dit.input_size=30")
    assert not runs("train")[1] and not (project / "checkpoints/train").exists()


def _perturb_vae_weight(vae_dir: Path, prefix: str) -> None:
    """Change one weight of the VAE artifact whose name starts with `prefix` (another VAE, as a retrained one is)."""
    state = torch.load(vae_dir / "model.pt", weights_only=True)
    name = next(k for k in sorted(state) if k.startswith(prefix) and state[k].is_floating_point())
    state[name] = state[name] + 1e-3
    torch.save(state, vae_dir / "model.pt")


def test_latents_of_another_vae_stop_the_stage_before_the_run(project):
    """encode_latents records which encoder made the latents; train, given another VAE (train_vae rerun through the
    CLI without encode_latents), refuses them before its run opens. A VAE whose decoder alone changed encodes the
    same latents and is accepted."""
    from diffusion.params import load_section
    from diffusion.stage_configs import TrainConfig
    from diffusion.training.latent_stats import encoder_digest
    from pipeline.train import TrainError, validate

    manifest = json.loads((project / "data/latents/manifest.json").read_text())
    assert manifest["vae"]["encoder_sha256"] == encoder_digest(project / "models/vae")
    cfg = load_section(TrainConfig, project / "params.yaml").replace(
        latents_dir=str(project / "data/latents"), vae_dir=str(project / "models/vae"),
        tokenizer_path=str(project / "data/tokenizer.json"), out_dir=str(project / "models/diffusion"))
    _perturb_vae_weight(project / "models/vae", "decoder.")
    validate(cfg)  # the decoder is not what the latents depend on
    _perturb_vae_weight(project / "models/vae", "encoder.")
    with pytest.raises(TrainError, match=r"train.vae_dir: the latents in .* were encoded by another VAE than the one"):
        train_in_process(project)
    assert not runs("train")[1] and not (project / "checkpoints/train").exists()


@pytest.mark.parametrize("override, message", [
    ("train.dit.in_channels=3", r"train.dit.in_channels: is 3 but must be \d+ \(the latent_dim of the VAE"),
    ("train.dit.context_dim=7", r"train.dit.context_dim: is 7 but must be \d+ \(train.text_encoder.width\)"),
    ("train.text_encoder.pad_token_id=5", r"train.text_encoder.pad_token_id: is 5 but must be 0"),
    ("train.text_encoder.max_length=64", r"train.text_encoder.max_length: is 64 but must be \d+ \(the length"),
])
def test_a_field_that_follows_from_the_inputs_is_refused_before_the_run(project, override, message):
    """The denoiser's channels and context width, the text encoder's vocabulary, length and padding id follow
    from the VAE, the text encoder and the tokenizer: a value that says otherwise stops the stage before its run
    opens (it failed at build time, with the run open and a checkpoint folder made, or trained with padding
    attended: the tokenizer always pads with 0)."""
    from diffusion.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        train_in_process(project, override)
    assert not runs("train")[1] and not (project / "checkpoints/train").exists()


SEED_DENOISERS = {
    "unet": {"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
             "num_heads": 2, "norm_groups": 8},
    "dit": {"hidden_size": 32, "depth": 1, "num_heads": 2},
}


def _tiny_seed_model(denoising_type: str):
    """A tiny LatentDiffusionModel and the seed's dummy dataset, built as the seed API's users do."""
    from diffusion.data import create_dummy_dataset
    from diffusion.models import LatentDiffusionModel

    data = create_dummy_dataset(num_samples=16, image_size=16)
    model = LatentDiffusionModel(
        vocab_size=data.tokenizer.get_vocab_size(), denoising_type=denoising_type,
        text_encoder={"width": 32, "depth": 1, "num_heads": 2, "max_length": 16},
        vae={"base_channels": 8, "norm_groups": 4, "channel_mult": [1, 2], "num_res_blocks": 1},
        denoiser=SEED_DENOISERS[denoising_type],
    )
    return model, data


def test_seed_api_trains_on_a_map_style_dataset():
    from pytorch_lightning import Trainer

    from diffusion.scheduler import DDPMScheduler
    from diffusion.train import train_diffusion_model

    model, data = _tiny_seed_model("unet")
    before = [p.detach().clone() for p in model.denoiser.parameters()]
    vae_before = [p.detach().clone() for p in model.vae.parameters()]
    trainer = train_diffusion_model(model=model, scheduler=DDPMScheduler(num_timesteps=1000), train_dataset=data,
                                    batch_size=4, max_steps=3, enable_progress_bar=False)
    assert isinstance(trainer, Trainer) and trainer.global_step == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, model.denoiser.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(vae_before, model.vae.parameters())), "the VAE stays frozen"


def test_seed_api_shows_the_loss_on_its_progress_bar():
    """Lightning's default bar (rich) showed no loss and "Epoch 8/-2"; the pipeline's bar shows the loss."""
    from diffusion.scheduler import DDPMScheduler
    from diffusion.train import train_diffusion_model
    from diffusion.training.trainer import LossBar

    model, data = _tiny_seed_model("unet")
    trainer = train_diffusion_model(model=model, scheduler=DDPMScheduler(num_timesteps=1000), train_dataset=data,
                                    batch_size=4, max_steps=2)
    bar = trainer.progress_bar_callback
    assert isinstance(bar, LossBar) and float(bar.get_metrics(trainer, trainer.lightning_module)["train/loss"]) > 0
    # No monitor thread starting while the loader forks (pitfall 15): Lightning's bars are made without one.
    assert type(bar.train_progress_bar).monitor_interval == 0


def test_bf16_mixed_trains_with_gradient_clipping_and_the_fused_adamw():
    """Lightning's mixed-precision plugin refuses to clip for a fused optimizer (it assumes a GradScaler);
    bf16-mixed has no scaler, so the system clips itself and the default train config (clip 1.0) runs."""
    from diffusion.scheduler import DDPMScheduler
    from diffusion.train import train_diffusion_model

    model, data = _tiny_seed_model("dit")
    before = [p.detach().clone() for p in model.denoiser.parameters()]
    trainer = train_diffusion_model(model=model, scheduler=DDPMScheduler(num_timesteps=1000), train_dataset=data,
                                    batch_size=4, max_steps=2, precision="bf16-mixed", gradient_clip_val=1.0,
                                    enable_progress_bar=False)
    assert trainer.global_step == 2
    assert trainer.optimizers[0].defaults["fused"] is True
    assert any(not torch.equal(a, b) for a, b in zip(before, model.denoiser.parameters()))


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_system_clips_gradients_of_the_fused_adamw(algorithm):
    from diffusion.scheduler import DDPMScheduler
    from diffusion.training.diffusion_system import DiffusionSystem, OptimSettings

    model, _ = _tiny_seed_model("dit")
    system = DiffusionSystem(model, DDPMScheduler(num_timesteps=1000), OptimSettings())
    opt = system.configure_optimizers()["optimizer"]
    params = [p for group in opt.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    system.configure_gradient_clipping(opt, 0.5, algorithm)
    grads = torch.cat([p.grad.flatten() for p in params])
    if algorithm == "norm":
        assert grads.norm().item() == pytest.approx(0.5, rel=1e-4)
    else:
        assert grads.abs().max().item() == pytest.approx(0.5)


def test_run_key_follows_the_vae_and_tokenizer_contents(tmp_path):
    """A retrained VAE writes latents of the same size; its model.pt (same size, other bytes) must change the key."""
    from diffusion.stage_configs import TrainConfig
    from pipeline.train import _fingerprints

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae/model.pt").write_bytes(b"A" * 100)
    (tmp_path / "tok.json").write_text("{}")
    cfg = TrainConfig(vae_dir=str(tmp_path / "vae"), tokenizer_path=str(tmp_path / "tok.json"))
    first = _fingerprints(cfg, [])
    assert _fingerprints(cfg, []) == first
    (tmp_path / "vae/model.pt").write_bytes(b"B" * 100)
    assert _fingerprints(cfg, [])["inputs"] != first["inputs"]
    assert _fingerprints(cfg, [])["code"] == first["code"]


def test_seed_api_caption_dropout_differs_across_workers_and_epochs():
    """Each loader worker gets a copy of the collate, generator included, every epoch: the drops must still differ
    between workers and between epochs, and repeat for the same seed."""
    from diffusion.train import CaptionDropoutCollate

    data = [(torch.zeros(1, 2, 2), torch.full((3,), i)) for i in range(32)]

    def drops(seed):
        collate = CaptionDropoutCollate(torch.full((3,), -1), 0.5, seed)
        loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2, collate_fn=collate,
                                             generator=torch.Generator().manual_seed(seed))
        return [[tuple((b["tokens"][:, 0] == -1).tolist()) for b in loader] for _ in range(2)]  # 2 epochs x 8 batches

    first = drops(0)
    assert first == drops(0)
    assert first[0] != first[1]
    assert len(set(first[0])) > 2  # not the same pattern in every batch (each worker had one before)


def test_non_finite_loss_on_one_ddp_rank_stops_every_rank():
    """The check reduces the first bad step over the ranks (max of -1 and the step), so a rank whose own losses
    were finite raises too, rather than blocking in the next all-reduce of a rank that stopped."""
    from types import SimpleNamespace

    from diffusion.training.nonfinite import NonFiniteLossCheck, NonFiniteLossError

    check = NonFiniteLossCheck(check_every=1000)
    trainer = SimpleNamespace(global_step=5, world_size=2, strategy=None)
    check.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.5)}, None, 0)  # finite here
    for other_rank_step, raises in ((-1, False), (4, True)):
        trainer.strategy = SimpleNamespace(reduce=lambda t, reduce_op, s=other_rank_step: torch.maximum(t, torch.tensor(s)))
        if raises:
            with pytest.raises(NonFiniteLossError, match="on another rank at step 4"):
                check.check(trainer)
        else:
            check.check(trainer)


def test_system_rejects_what_its_loss_cannot_train():
    from diffusion.scheduler import DDPMScheduler
    from diffusion.training.diffusion_system import DiffusionSystem, OptimSettings

    model, _ = _tiny_seed_model("dit")
    with pytest.raises(ValueError, match="snr_plus_one"):
        DiffusionSystem(model, DDPMScheduler(), OptimSettings(min_snr_gamma=5.0, min_snr_on="snr_plus_one"))
    model.denoiser = type(model.denoiser)(model.denoiser.cfg.replace(learn_sigma=True))
    with pytest.raises(ValueError, match="learn_sigma"):
        DiffusionSystem(model, DDPMScheduler(), OptimSettings())


def test_each_ddp_rank_draws_its_own_timesteps_and_noise(monkeypatch):
    """seed_everything seeds every rank alike; setup offsets the global generator by the rank (rank 0 unchanged),
    so the ranks' diffusion_loss draws differ while each stays reproducible."""
    from diffusion.scheduler import DDPMScheduler
    from diffusion.training.diffusion_system import DiffusionSystem, OptimSettings

    model, _ = _tiny_seed_model("dit")
    system = DiffusionSystem(model, DDPMScheduler(), OptimSettings())
    draws = {}
    for rank in (0, 1, 1):
        monkeypatch.setattr(DiffusionSystem, "global_rank", property(lambda self, r=rank: r))
        torch.manual_seed(7)
        system.setup("fit")
        draws.setdefault(rank, []).append(torch.randn(8))
    assert not torch.equal(draws[0][0], draws[1][0])
    assert torch.equal(draws[1][0], draws[1][1])
    torch.manual_seed(7)
    assert torch.equal(draws[0][0], torch.randn(8))


def test_min_snr_weights_and_lr_schedule():
    from diffusion.training.diffusion_system import min_snr_weight
    from diffusion.training.optim import lr_factor

    snr = torch.tensor([0.5, 5.0, 50.0])
    assert torch.allclose(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    assert torch.allclose(min_snr_weight(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))
    assert torch.allclose(min_snr_weight(snr, 5.0, "sample"), torch.tensor([0.5, 5.0, 5.0]))
    # Capping SNR + 1: z_0 weight min(SNR + 1, 5) = [1.5, 5, 5], so v-prediction keeps weight 1 at high noise.
    plus = {t: min_snr_weight(snr, 5.0, t, on="snr_plus_one") for t in ("v_prediction", "sample")}
    assert torch.allclose(plus["sample"], torch.tensor([1.5, 5.0, 5.0]))
    assert torch.allclose(plus["v_prediction"], torch.tensor([1.0, 5 / 6, 5 / 51]))
    with pytest.raises(ValueError, match="min_snr_on"):
        min_snr_weight(snr, 5.0, "epsilon", on="snr_squared")
    # With eps-prediction, capping SNR + 1 would weigh min(SNR + 1, 5) / SNR: 2e4 at t = 999 of linear betas.
    with pytest.raises(ValueError, match="snr_plus_one.*v_prediction"):
        min_snr_weight(snr, 5.0, "epsilon", on="snr_plus_one")
    assert lr_factor("cosine", 0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor("cosine", 9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor("cosine", 10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor("cosine", 55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor("cosine", 100, 10, 100, 0.1) == pytest.approx(0.1)


def test_ranks_that_disagree_on_resuming_stop_before_training():
    """Only rank 0 writes last.ckpt: nodes without a shared checkpoint folder would resume on rank 0 alone. And a
    rank running another run (other parameters, code or data) trains apart, or waits for ever. Rank 1's view:
    rank 0's (run, resuming, step) comes by broadcast; rank 0 agrees with itself."""
    from types import SimpleNamespace

    from diffusion.training.exact_resume import ExactResume

    def trainer(resuming_here, first, rank=1, others_agree=True):
        strategy = SimpleNamespace(broadcast=lambda obj, src=0: first if rank else obj,
                                   reduce_boolean_decision=lambda ok, all=True: ok and others_agree)
        return SimpleNamespace(world_size=2, global_rank=rank, strategy=strategy,
                               ckpt_path="last.ckpt" if resuming_here else None)

    callback = ExactResume(loader=None, seed=0, steps_per_segment=10, identity="run-a")
    callback.load_state_dict({"global_step": 20})
    callback.on_fit_start(trainer(True, ("run-a", True, 20)), None)
    callback.on_fit_start(trainer(False, ("run-a", False, 0)), None)
    with pytest.raises(RuntimeError, match="did not find the run's last.ckpt .* shared by every node"):
        callback.on_fit_start(trainer(False, ("run-a", True, 20)), None)
    with pytest.raises(RuntimeError, match="shared by every node"):  # both resuming, from other steps
        callback.on_fit_start(trainer(True, ("run-a", True, 30)), None)
    with pytest.raises(RuntimeError, match="rank 1 runs run 'run-a' and rank 0 run 'run-b'.*same parameters"):
        callback.on_fit_start(trainer(False, ("run-b", False, 0)), None)
    with pytest.raises(RuntimeError, match="rank 0: another rank runs another run"):
        callback.on_fit_start(trainer(False, None, rank=0, others_agree=False), None)


def test_the_step_reads_nothing_back_from_the_device_between_logging_steps(project, monkeypatch):
    """No .item() on a step that logs nothing: a metric on the progress bar was converted to a number at every
    batch's end (Lightning builds the bar's metrics then), a GPU wait per step. 8 steps logging every 4: the
    loss is read on the 2 logging steps (the bar, the loss curve), plus the final figures."""
    calls = []
    item = torch.Tensor.item

    def counted(self):
        calls.append(1)
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counted)
    train_in_process(project, "train.max_steps=8", "train.log_every_n_steps=4", "train.checkpoint_every_n_steps=8",
                     "train.sample_every_n_steps=0", "train.sample_prompts=[]")
    assert len(calls) <= 6, f"{len(calls)} .item() calls in 8 steps (14 when the bar converted every batch)"


def test_the_final_checkpoint_keeps_the_live_weights_beside_the_ema(project):
    """last.ckpt at max_steps off the checkpoint grid holds the live weights as the model state (what the AdamW
    moments belong to) and the EMA as the average. It was saved in on_train_end, after the EMA callback had
    copied the average into the module: both were the EMA."""
    train_in_process(project, "train.max_steps=5", "train.checkpoint_every_n_steps=4", "train.sample_every_n_steps=0",
                     "train.sample_prompts=[]")
    (path,) = (project / "checkpoints/train").glob("*/last.ckpt")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 5
    live, ema = ckpt["current_model_state"], ckpt["state_dict"]
    trained = [k for k in live if "denoiser" in k and live[k].is_floating_point()]
    assert trained and any(not torch.equal(live[k], ema[k]) for k in trained)



def test_the_optimizer_runs_at_the_linear_schedules_lr(project):
    """train.lr_schedule: linear reaches the AdamW that Lightning steps. Step k (1-based) runs at lr times the
    factor of step k - 1: (k / 2) over the 2 warm-up steps, then 0.1 + 0.9 * (1 - p), p = (k - 3) / 4, down to
    lr * min_lr_ratio at max_steps 6 (cosine would run step 4 at 0.87 lr, not 0.775). MLflow's train/lr is read
    from the optimizer as each step starts; the final checkpoint holds the LR the scheduler set after step 6."""
    train_in_process(project, "train.lr_schedule=linear", "train.max_steps=6", "train.warmup_steps=2",
                     "train.min_lr_ratio=0.1", "train.log_every_n_steps=1", "train.sample_every_n_steps=0",
                     "train.sample_prompts=[]", "train.val_batches=0")
    client, (run,) = runs("train")
    assert run.data.params["lr_schedule"] == "linear" and run.data.params["min_lr_ratio"] == "0.1"
    peak = float(run.data.params["lr"])
    logged = {m.step: m.value / peak for m in client.get_metric_history(run.info.run_id, "train/lr")}
    assert logged == pytest.approx({1: 0.5, 2: 1.0, 3: 1.0, 4: 0.775, 5: 0.55, 6: 0.325})
    (path,) = (project / "checkpoints/train").glob("*/last.ckpt")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    assert [g["lr"] / peak for g in ckpt["optimizer_states"][0]["param_groups"]] == pytest.approx([0.1, 0.1])

@pytest.mark.parametrize("callback", ["SampleGrid", "NonFiniteLossCheck"])
def test_callbacks_count_optimizer_steps_under_gradient_accumulation(callback):
    """With accumulate_grad_batches 2 the first micro-batch ends at global_step 0: SampleGrid drew a grid of the
    untrained model there, and NonFiniteLossCheck named the step before for a NaN in a group's first batch."""
    import pytorch_lightning as pl

    from diffusion.training import callbacks
    from diffusion.training.nonfinite import NonFiniteLossCheck, NonFiniteLossError

    class Tiny(pl.LightningModule):
        def __init__(self, nan_at: int = -1) -> None:
            super().__init__()
            self.layer, self.nan_at = torch.nn.Linear(2, 1), nan_at

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).pow(2).mean()
            return loss * float("nan") if batch_idx == self.nan_at else loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 2)), batch_size=2)
    trainer_args = dict(max_steps=4, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    if callback == "SampleGrid":
        # final_step: the train stage draws the grid of max_steps itself (samples/final.png), not the callback too.
        for final_step, names in ((None, [2, 4]), (4, [2])):
            grid = callbacks.SampleGrid.__new__(callbacks.SampleGrid)
            grid.every, grid.final_step, drawn = 2, final_step, []
            grid.render = lambda model, drawn=drawn: drawn.append(True)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(callbacks, "log_image", lambda trainer, image, name, drawn=drawn: drawn.append(name))
                mp.setattr(callbacks, "ema_model", lambda trainer, module: module)
                pl.Trainer(callbacks=[grid], **trainer_args).fit(Tiny(), data)
            assert [d for d in drawn if d is not True] == [f"samples/step_{n:07d}.png" for n in names], final_step
            assert drawn.count(True) == len(names)  # rendered only where logged
    else:
        # Micro-batch 4 is the first of optimizer step 3's pair.
        with pytest.raises(NonFiniteLossError, match=r"at step 3 "):
            pl.Trainer(callbacks=[NonFiniteLossCheck(1)], **trainer_args).fit(Tiny(nan_at=4), data)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_the_loss_regresses_the_schedulers_target(pred, monkeypatch):
    """A prediction equal to get_target(x0, noise, t) has loss 0, one off by 1 everywhere has loss 1: the target
    built from swapped arguments trained every stage test's model without a failure."""
    from diffusion.scheduler import DDPMScheduler
    from diffusion.training.diffusion_system import DiffusionSystem, OptimSettings

    model, _ = _tiny_seed_model("dit")
    scheduler = DDPMScheduler(prediction_type=pred)
    system = DiffusionSystem(model, scheduler, OptimSettings())
    latents, tokens = torch.randn(4, 4, 8, 8), torch.randint(4, 20, (4, 6))
    torch.manual_seed(0)  # diffusion_loss draws t, then the noise, from the global generator
    t = torch.randint(0, scheduler.num_timesteps, (4,))
    want = scheduler.get_target(latents, torch.randn_like(latents), t)
    for offset, loss in ((0.0, 0.0), (1.0, 1.0)):
        monkeypatch.setattr(model, "forward", lambda noisy, t_, toks, offset=offset: want + offset)
        torch.manual_seed(0)
        assert system.diffusion_loss(latents, tokens).item() == pytest.approx(loss, abs=1e-6)


def test_weight_decay_only_on_weight_matrices():
    """AdamW's decay on matrices and embeddings, not on biases and norm scales (as in DiT and diffusers)."""
    from diffusion.scheduler import DDPMScheduler
    from diffusion.training.diffusion_system import DiffusionSystem, OptimSettings

    model, _ = _tiny_seed_model("dit")
    optimizer = DiffusionSystem(model, DDPMScheduler(), OptimSettings(weight_decay=0.05)).configure_optimizers()
    groups = optimizer["optimizer"].param_groups
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}
    for group in groups:
        assert all((p.ndim >= 2) == (group["weight_decay"] == 0.05) for p in group["params"])


def test_each_rank_reseeds_its_own_segment():
    """ExactResume reseeds every rank at each segment from (seed, rank, step); without the rank, both ranks of
    a DDP run draw the same timesteps and noise for their different batches (it overrides setup's offset)."""
    from types import SimpleNamespace

    from diffusion.training.exact_resume import ExactResume

    draws = {}
    for rank in (0, 1, 1):
        callback = ExactResume(loader=None, seed=0, steps_per_segment=4)
        callback.on_train_batch_start(SimpleNamespace(global_step=8, global_rank=rank), None, None, 0)
        draws.setdefault(rank, []).append(torch.randn(8))
    assert torch.equal(draws[1][0], draws[1][1]), "reproducible per rank"
    assert not torch.equal(draws[0][0], draws[1][0]), "ranks must not share timesteps and noise"


def test_the_frozen_vae_put_back_is_the_one_training_started_with():
    """Under DDP rank 0's weights are broadcast after the system is built; the VAE put back at the end was each
    rank's own construction-time copy (random where no VAE file was loaded: the ranks ended with different VAEs)."""
    from diffusion.scheduler import DDPMScheduler
    from diffusion.training.diffusion_system import DiffusionSystem, OptimSettings

    model, _ = _tiny_seed_model("dit")
    system = DiffusionSystem(model, DDPMScheduler(), OptimSettings())
    with torch.no_grad():  # what DDP's broadcast does to every rank but 0
        for p in model.vae.parameters():
            p.fill_(0.25)
    system.on_fit_start()
    with torch.no_grad():  # the EMA's rounding drift that restore_frozen_vae undoes
        for p in model.vae.parameters():
            p.add_(1e-3)
    system.restore_frozen_vae(model)
    assert all(p.eq(0.25).all() for p in model.vae.parameters())


def test_sample_grid_has_a_row_per_seed_and_a_column_per_prompt():
    """SampleGrid's layout (its docstring): 3 prompts x 2 seeds is 3 columns and 2 rows."""
    from diffusion.scheduler import DDPMScheduler
    from diffusion.training.callbacks import SampleGrid

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def generate(self, text_tokens, generator, image_size, **kw):
            seed, prompt = generator.initial_seed(), text_tokens[:, 0].float()  # (P,)
            level = (seed * 3 + prompt + 1) * 20 / 255.0
            return level.view(-1, 1, 1, 1).expand(len(text_tokens), 3, *image_size).clone()

    tokens = torch.tensor([[0, 3], [1, 3], [2, 3]])
    grid = SampleGrid(tokens, DDPMScheduler(), image_size=4, every_n_steps=1, seeds=(0, 1))
    image = np.asarray(grid.render(Fake()))
    assert image.shape == (2 * 6 + 2, 3 * 6 + 2, 3)
    for seed in (0, 1):
        for prompt in range(3):
            cell = image[2 + 6 * seed : 6 + 6 * seed, 2 + 6 * prompt : 6 + 6 * prompt]
            assert (cell == (seed * 3 + prompt + 1) * 20).all(), (seed, prompt)


def test_source_fingerprint_follows_the_code_not_its_size(tmp_path):
    """A code change of the same length must change the key (else a rerun resumes a checkpoint of old code);
    files other than .py do not count."""
    from diffusion.run_keys import source_fingerprint

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "notes.txt").write_text("a")
    first = source_fingerprint(pkg, tmp_path / "pkg" / "a.py")
    assert source_fingerprint(pkg, pkg / "a.py") == first
    (pkg / "notes.txt").write_text("b")
    assert source_fingerprint(pkg, pkg / "a.py") == first
    (pkg / "a.py").write_text("x = 2\n")  # same size
    assert source_fingerprint(pkg, pkg / "a.py") != first
