"""End to end: `dvc repro` of the whole pipeline in a temporary clone, at a tiny size.

Checks that every stage's outputs appear, that MLflow holds one run per stage with its tags, and that a
second `dvc repro` with nothing changed runs nothing (DESIGN.md, Reproducibility).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from test_train_stage import TINY

from diffusion.config import apply_overrides

STAGES = ("shard", "train_vae", "encode_latents", "train", "train_judge", "evaluate")
TINY_EVAL = TINY + [
    "train.sample_every_n_steps=0", "train.max_steps=6",
    "train_judge.steps=10", "train_judge.batch_size=16", "train_judge.channels=[8, 16]",
    "evaluate.num_samples=6", "evaluate.steps=3", "evaluate.batch_size=6", "evaluate.sweep_samples=3",
    "evaluate.sweep=[{sampler: ddim, steps: 2, guidance: 2.0}]", "evaluate.grid_seeds=1",
    "evaluate.grid_prompts=[a red circle in the top left]", "evaluate.kid_subsets=5",
]


def clone(dest: Path) -> Path:
    """A fresh git repository holding the project's tracked files (what a user's clone has)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    params = apply_overrides(yaml.safe_load((dest / "params.yaml").read_text()), TINY_EVAL)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "clone"], cwd=dest, check=True)
    return dest


def dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # `python` in dvc.yaml's commands must be this interpreter (the project's environment).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"dvc {args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.timeout(900)
def test_dvc_repro_runs_every_stage_once_and_then_nothing(tmp_path):
    repo = clone(tmp_path / "repo")
    first = dvc(["repro"], repo)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout, stage
    for path in ("data/shards/manifest.json", "data/tokenizer.json", "models/vae/model.pt", "data/latents/train",
                 "models/diffusion/model.pt", "models/judge", "metrics/eval.json", "reports/samples.png",
                 "plots/train_loss.csv", "dvc.lock"):
        assert (repo / path).exists(), path
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert {"fid", "kid_mean"} <= set(metrics) and any(k.startswith("adherence") for k in metrics), sorted(metrics)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("diffusion").experiment_id])
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["stage"], []).append(run)
    assert {s: len(r) for s, r in by_stage.items()} == {s: 1 for s in STAGES}
    for stage, (run,) in by_stage.items():
        assert run.data.tags["dvc_stage"] == stage, "DVC_STAGE reaches the run's tags"
        assert len(run.data.tags["git_commit"]) == 40

    second = dvc(["repro"], repo)
    assert "Running stage" not in second.stdout, second.stdout
    status = dvc(["status"], repo)
    assert "up to date" in status.stdout.lower(), status.stdout
