"""End to end: `dvc repro` of the whole pipeline in a temporary clone, at a tiny size, then experiments.

Checks that every stage's outputs appear, that MLflow holds one run per stage with its tags, and that a
second `dvc repro` with nothing changed runs nothing (every stage is deterministic). Then, on the same clone
(a second `dvc repro` of everything would cost minutes): a DiT experiment (`dvc exp run -S`) beside the U-Net
baseline in `dvc exp show`, in `dvc plots` and in one MLflow experiment; a `dvc exp run --temp` experiment
whose MLflow run still lands in the repository's own mlflow.db; the trained model as a DVC artifact.
"""

import ast
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

from diffusion.params import apply_overrides

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
    # No MLFLOW_TRACKING_URI (conftest points it at a per-test store): the stages must find the clone's own
    # <root>/mlflow.db by themselves, as they do for a user, temporary experiment folders included.
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"dvc {args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _module_file(name: str) -> Path | None:
    """The project file of a module name (diffusion.* under src/, pipeline.*), or None for other packages."""
    parts = name.split(".")
    base = {"diffusion": ROOT / "src", "pipeline": ROOT}.get(parts[0])
    if base is None:
        return None
    path = base.joinpath(*parts)
    return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.is_file()), None)


def _imports(path: Path) -> set[Path]:
    """Project modules that `path` imports: every import statement, at the top of the module and inside
    functions (the lazy imports that keep ``cli.py --help`` from loading torch run just as surely when the
    stage calls the function). ``from a.b import c`` counts ``a.b`` and ``a.b.c`` when c is a module. Package
    ``__init__`` files are not followed: re-exports would pull in every sibling, and dvc.yaml lists the modules
    a stage uses."""
    found = set()
    for n in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            names = [n.module, *(f"{n.module}.{a.name}" for a in n.names)]
        found |= {f for f in map(_module_file, names) if f is not None and f.name != "__init__.py"}
    return found


#: Imports that do not make the imported module part of what a stage runs for its outputs. stage_configs.py
#: imports the model configs' classes (their modules) only to resolve the annotations of the sections that nest
#: them (``_model_configs``); the stages whose sections do (train_vae, train) list those modules for their code.
NOT_FOLLOWED = {
    ("src/diffusion/stage_configs.py", m) for m in (
        "src/diffusion/models/dit.py", "src/diffusion/models/text_encoder.py", "src/diffusion/models/unet.py",
        "src/diffusion/models/vae.py", "src/diffusion/scheduler.py",
    )
}


def test_every_stage_depends_on_the_modules_its_code_imports():
    """dvc.yaml's deps are written by hand; a module a stage imports but does not list would not rerun the
    stage when it changes (a stale output). The import closure of each stage's module, lazy imports inside
    functions included (a module imported by a function the stage never calls is listed too: a rerun of a
    deterministic stage costs its time, a missing dep a stale output), must be listed."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGES)
    unused = set(NOT_FOLLOWED)
    for name, stage in stages.items():
        deps = [str(d).rstrip("/") for d in stage["deps"]]
        todo, seen = [ROOT / "pipeline" / f"{name}.py"], set()
        while todo:
            path = todo.pop()
            if path not in seen:
                seen.add(path)
                for module in _imports(path):
                    edge = (str(path.relative_to(ROOT)), str(module.relative_to(ROOT)))
                    unused.discard(edge)
                    if edge not in NOT_FOLLOWED:
                        todo.append(module)
        needed = {str(p.relative_to(ROOT)) for p in seen}
        missing = sorted(n for n in needed if not any(n == d or n.startswith(d + "/") for d in deps))
        assert not missing, f"dvc.yaml: stage {name} imports {missing} but does not list them in deps"
    assert not unused, f"NOT_FOLLOWED names imports no stage makes any more: {sorted(unused)}"


@pytest.mark.timeout(900)
def test_dvc_repro_runs_every_stage_once_and_then_nothing_then_experiments(tmp_path):
    """One clone for all of it: the experiments reuse what the first `dvc repro` made (its stages cached)."""
    repo = clone(tmp_path / "repo")
    first = dvc(["repro"], repo)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout, stage
    for path in ("data/shards/manifest.json", "data/tokenizer.json", "models/vae/model.pt", "data/latents/train",
                 "models/diffusion/model.pt", "models/judge", "metrics/eval.json", "reports/samples.png",
                 "plots/train_loss.csv", "plots/val_loss.csv", "dvc.lock"):
        assert (repo / path).exists(), path
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert {"fid", "kid_mean"} <= set(metrics) and any(k.startswith("adherence") for k in metrics), sorted(metrics)

    client = mlflow_client(repo)
    runs = client.search_runs([client.get_experiment_by_name("diffusion").experiment_id])
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["stage"], []).append(run)
    assert {s: len(r) for s, r in by_stage.items()} == {s: 1 for s in STAGES}
    for stage, (run,) in by_stage.items():
        assert run.data.tags["dvc_stage"] == stage, "DVC_STAGE reaches the run's tags"
        assert len(run.data.tags["git_commit"]) == 40
        import torch  # the machine it ran on, for comparing figures across hosts
        from diffusion.tracking import cpu_model
        assert run.data.tags["host_cpu"] == cpu_model()
        assert (run.data.tags["host_gpu"] == "none") == (not torch.cuda.is_available())
        assert run.data.tags["torch_version"] == torch.__version__

    second = dvc(["repro"], repo)
    assert "Running stage" not in second.stdout, second.stdout
    status = dvc(["status"], repo)
    assert "up to date" in status.stdout.lower(), status.stdout

    # What a user does next: commit the results as the baseline, then experiment on top of it.
    baseline = commit_baseline(repo)
    check_model_artifact(repo)
    check_plots_html(repo)
    check_unet_experiment(repo, baseline)
    check_temp_experiment(repo, baseline)
    check_exp_show_and_plots_diff(repo, baseline)


def mlflow_client(repo: Path):
    """A client on the store the stages wrote to by default: <repo>/mlflow.db."""
    from mlflow.tracking import MlflowClient

    assert (repo / "mlflow.db").is_file(), "the stages' MLflow store is at the repository root"
    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def git(args: list[str], repo: Path) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def commit_baseline(repo: Path) -> str:
    """Commit dvc.lock, the metrics and the plots (what `dvc exp show` reads for the baseline); returns the sha.

    `git add -A` as a user would: .gitignore keeps the resumable checkpoints (not a DVC output, so DVC does
    not git-ignore them itself) out of the commit, and DVC's own .gitignore files the cached outputs."""
    git(["add", "-A"], repo)
    git(["commit", "-qm", "baseline: U-Net"], repo)
    tracked = git(["ls-files"], repo).split()
    assert {"dvc.lock", "metrics/eval.json", "plots/train_loss.csv", "plots/val_loss.csv"} <= set(tracked)
    assert not [f for f in tracked if f.startswith("checkpoints/") or f.endswith((".pt", ".ckpt", ".tar"))], tracked
    return git(["rev-parse", "HEAD"], repo)


def check_model_artifact(repo: Path) -> None:
    """dvc.yaml declares models/diffusion as a model artifact, and `dvc artifacts get` fetches a registered
    version of it (a GTO git tag `<name>@v<semver>`: how DVC's model registry records versions)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        artifact = dvc_repo.artifacts.read()["dvc.yaml"]["diffusion-model"]
    assert (artifact.path, artifact.type) == ("models/diffusion", "model")
    assert artifact.desc and artifact.labels

    git(["tag", "-a", "diffusion-model@v0.1.0", "-m", "the U-Net baseline"], repo)
    out = repo.parent / "artifact"
    dvc(["artifacts", "get", str(repo), "diffusion-model", "-o", str(out)], repo)
    assert (out / "model.pt").read_bytes() == (repo / "models/diffusion/model.pt").read_bytes()
    assert (out / "config.json").is_file()


def check_plots_html(repo: Path) -> None:
    """`dvc plots show` writes an HTML page with the titled loss curve and sampler sweep."""
    out = repo.parent / "dvc_plots"
    dvc(["plots", "show", "-o", str(out)], repo)
    html = (out / "index.html").read_text()
    assert "Diffusion training loss" in html and "Sampler sweep" in html


def check_unet_experiment(repo: Path, baseline: str) -> None:
    """`dvc exp run -S train.denoising_type=unet` (the default is the DiT) reruns only what the denoiser
    changes, and MLflow holds its runs beside the baseline's in one experiment, comparable in the UI."""
    run = dvc(["exp", "run", "-n", "unet", "-S", "train.denoising_type=unet"], repo)
    for stage in ("train", "evaluate"):
        assert f"Running stage '{stage}'" in run.stdout, stage
    for stage in ("shard", "train_vae", "encode_latents", "train_judge"):
        assert f"Stage '{stage}' didn't change, skipping" in run.stdout, stage

    client = mlflow_client(repo)
    # Every run of the store, baseline and experiment alike, is in the one MLflow experiment the UI compares.
    experiment = client.get_experiment_by_name("diffusion").experiment_id
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.info.experiment_id for r in runs} == {experiment}
    unet_runs = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("dvc_exp_name") == "unet"}
    assert sorted(unet_runs) == ["evaluate", "train"], sorted(unet_runs)
    assert all(r.data.tags["git_commit"] == baseline for r in unet_runs.values())
    dit_runs = {r.data.tags["stage"]: r for r in runs if not r.data.tags.get("dvc_exp_name")}
    # The same params (but each denoiser's own section) and metric names, the same sample grid artifact: the UI
    # lines them up side by side.
    for stage, grid in (("train", "samples/final.png"), ("evaluate", "samples.png")):
        a, b = dit_runs[stage], unet_runs[stage]
        shared = [{k for k in r.data.params if not k.startswith(("dit.", "unet."))} for r in (a, b)]
        assert shared[0] == shared[1] and set(a.data.metrics) == set(b.data.metrics), stage
        if stage == "train":
            assert {k.split(".")[0] for k in set(a.data.params) - shared[0]} == {"dit"}
            assert {k.split(".")[0] for k in set(b.data.params) - shared[1]} == {"unet"}
        for r in (a, b):
            assert grid in artifact_paths(client, r.info.run_id), (stage, r.info.run_id)
    assert [r.data.params["denoising_type"] for r in (dit_runs["train"], unet_runs["train"])] == ["dit", "unet"]


def check_temp_experiment(repo: Path, baseline: str) -> None:
    """`dvc exp run --temp` runs in a throw-away copy under .dvc/tmp/exps/, yet its MLflow run is in the
    repository's mlflow.db (the copy's would be deleted with it), tagged with the experiment's name.

    An evaluate-only change reruns evaluate only: the copy has what git tracks and DVC caches, and no
    checkpoints, which therefore must not be stage outputs (as outputs they read "deleted" there, and
    train_vae and train retrained from scratch)."""
    manifest = (repo / "data/shards/manifest.json").read_bytes()
    run = dvc(["exp", "run", "--temp", "-n", "eval-temp", "-S", "evaluate.guidance=3.0"], repo)
    assert "Running stage 'evaluate'" in run.stdout, run.stdout
    # The real images' Inception features the workspace's evaluate cached (untracked, so not in the copy).
    assert f"real images from {repo / 'data/fid_cache'}" in run.stdout, run.stdout
    for stage in ("shard", "train_vae", "encode_latents", "train_judge", "train"):
        assert f"Stage '{stage}' didn't change, skipping" in run.stdout, (stage, run.stdout)
    # It ran elsewhere: the workspace's parameters and data are untouched.
    assert yaml.safe_load((repo / "params.yaml").read_text())["evaluate"]["guidance"] != 3.0
    assert (repo / "data/shards/manifest.json").read_bytes() == manifest

    client = mlflow_client(repo)
    (evaluate,) = [r for r in client.search_runs([client.get_experiment_by_name("diffusion").experiment_id])
                   if r.data.tags.get("dvc_exp_name") == "eval-temp"]
    assert evaluate.data.tags["stage"] == "evaluate" and evaluate.data.params["guidance"] == "3.0"
    assert evaluate.data.tags["git_commit"] == baseline
    # Its artifacts went beside the root store too, not into the deleted copy.
    assert evaluate.info.artifact_uri.startswith((repo / "mlartifacts").as_uri()), evaluate.info.artifact_uri


def check_exp_show_and_plots_diff(repo: Path, baseline: str) -> None:
    """`dvc exp show` lists the baseline and both experiments with their own params and metrics, and
    `dvc plots diff` draws the U-Net's and the DiT's loss curves on one plot, once per definition."""
    rows = exp_rows(repo)
    base, unet, temp = rows[baseline], rows["unet"], rows["eval-temp"]
    assert [r["params"]["train"]["denoising_type"] for r in (base, unet)] == ["dit", "unet"]
    assert temp["params"]["evaluate"]["guidance"] == 3.0
    for row in (base, unet):
        assert {"fid", "kid_mean", "adherence"} <= set(row["metrics"]["metrics/eval.json"])
    # Different networks: the experiment's metric is its own, not the baseline's carried over.
    assert (unet["metrics"]["metrics/train.json"]["parameters_denoiser"]
            != base["metrics"]["metrics/train.json"]["parameters_denoiser"])

    # Each plot once, from the top-level definitions (not a second time from the stage outputs).
    plots = json.loads(dvc(["plots", "diff", "HEAD", "unet", "--json"], repo).stdout)["data"]
    assert set(plots) == {"train_loss", "val_loss", "eval_sweep", "reports/samples.png"}, sorted(plots)
    (loss,) = plots["train_loss"]
    assert sorted(loss["revisions"]) == ["HEAD", "unet"]
    spec = loss["content"]
    assert spec["encoding"]["x"]["field"] == "step" and spec["title"]["text"].startswith("Diffusion training loss")
    assert {p["rev"] for p in spec["data"]["values"]} == {"HEAD", "unet"}, "a curve per revision"
    (val,) = plots["val_loss"]  # held out and seen, a line each per revision
    assert {(p["rev"], p["field"]) for p in val["content"]["data"]["values"]} == \
        {(rev, field) for rev in ("HEAD", "unet") for field in ("loss", "seen_loss")}
    (sweep,) = plots["eval_sweep"]
    assert [sweep["content"]["encoding"][axis]["field"] for axis in "xy"] == ["images_per_second", "adherence"]


def exp_rows(repo: Path) -> dict[str, dict]:
    """`dvc exp show --json` as {baseline sha or experiment name: {"params": ..., "metrics": ...}}."""
    shown = json.loads(dvc(["exp", "show", "--json"], repo).stdout)
    rows = {}

    def row(entry: dict) -> dict:
        data = entry["data"]
        return {"params": data["params"]["params.yaml"]["data"],
                "metrics": {path: m["data"] for path, m in data["metrics"].items()}}

    for commit in shown:
        if commit["rev"] != "workspace":
            rows[commit["rev"]] = row(commit)
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                rows[rev["name"]] = row(rev)
    return rows


def artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out += artifact_paths(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def test_project_root_is_never_a_temporary_experiment_folder(tmp_path, monkeypatch):
    """Queued and --temp experiments run in <root>/.dvc/tmp/exps/[standalone/]tmpXXXX, a git clone deleted
    afterwards: the MLflow store must still be <root>/mlflow.db, whether DVC_ROOT or git names the copy."""
    from diffusion.tracking import project_root, shared_across_experiments, tracking_uri

    root = tmp_path / "repo"
    copy = root / ".dvc/tmp/exps/standalone/tmpab12cd"
    copy.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    monkeypatch.setenv("DVC_ROOT", str(copy))
    assert project_root() == root
    assert tracking_uri() == f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(root))
    assert project_root() == root

    monkeypatch.delenv("DVC_ROOT")
    assert project_root(copy) == root, "the copy's git top level maps back too"
    monkeypatch.chdir(copy)
    assert tracking_uri() == f"sqlite:///{root / 'mlflow.db'}"
    # A folder that merely looks alike is left alone.
    other = tmp_path / "other/.dvc/tmp/cache"
    other.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=other, check=True)
    assert project_root(other) == other
    # A cache kept across experiments (evaluate.fid_cache_dir) is the repository's, not the copy's.
    assert shared_across_experiments("data/fid_cache") == root / "data/fid_cache"  # cwd: the copy
    assert shared_across_experiments(root / ".dvc/tmp/exps/tmpab12cd/data/x") == root / "data/x"  # queued
    assert shared_across_experiments(other / "x") == other / "x"
    assert shared_across_experiments("data/fid_cache") != Path("data/fid_cache")
    monkeypatch.chdir(root)
    assert shared_across_experiments("data/fid_cache") == Path("data/fid_cache")


def test_a_relative_sqlite_uri_is_the_project_roots_store(tmp_path, monkeypatch):
    """sqlite:///mlflow.db is relative to the working folder; inside a queued or --temp experiment's copy that
    store would be deleted with it, so it is resolved against the project root. Absolute URIs are kept."""
    from diffusion.tracking import tracking_uri

    root = tmp_path / "repo"
    copy = root / ".dvc/tmp/exps/tmpab12cd"
    copy.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(copy))
    monkeypatch.chdir(copy)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    assert tracking_uri() == f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    assert tracking_uri() == f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    assert tracking_uri() == "http://localhost:5000"


def test_git_dirty_tag_ignores_the_parameter_files_and_stage_outputs(tmp_path, monkeypatch):
    from diffusion.tracking import git_dirty

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "metrics").mkdir()
    for name in ("code.py", "metrics/train.json", "metrics.py", "metrics/moved.json"):
        (tmp_path / name).write_text("a: 1\n")
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "c"], cwd=tmp_path, check=True)
    assert git_dirty(tmp_path) == "false"
    # dvc.yaml's output paths are params.yaml's keys: an experiment that moves the metrics file
    # (`dvc exp run -S train.metrics_path=...`) makes that file the output, and the default one plain tracked.
    (tmp_path / "metrics/moved.json").unlink()
    assert git_dirty(tmp_path) == "true"
    params["train"]["metrics_path"] = "metrics/moved.json"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))  # what `dvc exp run -S` does
    assert git_dirty(tmp_path) == "false"
    (tmp_path / "metrics/moved.json").write_text("a: 1\n")
    params["train"]["metrics_path"] = "metrics/train.json"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "metrics/train.json").unlink()  # what DVC does to a stage's outputs before running it
    assert git_dirty(tmp_path) == "false"
    (tmp_path / "metrics.py").write_text("a: 3\n")  # beside an output's path, not under it
    assert git_dirty(tmp_path) == "true"
    (tmp_path / "metrics.py").write_text("a: 1\n")
    assert git_dirty(tmp_path) == "false"
    (tmp_path / "code.py").write_text("a: 3\n")
    assert git_dirty(tmp_path) == "true"


def test_dvc_tracks_the_paths_params_yaml_names(tmp_path):
    """dvc.yaml's data paths are params.yaml's keys, resolved by DVC itself: with the defaults the stages chain
    (each data dependency is the output of the stage that writes it), every interpolated key is a config field
    whose default is params.yaml's value, and moving an output with params.yaml (what `dvc exp run -S` writes)
    moves what DVC tracks and what the next stage depends on."""
    from dvc.repo import Repo

    from diffusion.params import load_params
    from diffusion.dvcfile import interpolated_keys
    from diffusion.eval_configs import EvaluateConfig, JudgeConfig
    from diffusion.data_configs import EncodeLatentsConfig, ShardConfig
    from diffusion.stage_configs import TrainConfig, TrainVAEConfig

    for name in ("dvc.yaml", "params.yaml", "profiles/cpu.yaml", "profiles/gpu.yaml"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    Repo.init(str(tmp_path), no_scm=True)
    params = load_params(tmp_path / "params.yaml")
    configs = {cls.section: cls for cls in (ShardConfig, EncodeLatentsConfig, TrainVAEConfig, TrainConfig,
                                             JudgeConfig, EvaluateConfig)}
    keys = interpolated_keys(tmp_path)
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        written = [e if isinstance(e, str) else next(iter(e)) for kind in ("outs", "metrics", "plots")
                   for e in stage.get(kind, [])]
        read = [d for d in stage["deps"] if not d.startswith(("src/", "pipeline/", "cli.py"))]
        assert all(p.startswith("${" + name + ".") for p in written + read), (name, written + read)
    for key in keys:
        section, field = key.split(".")
        default = configs[section].from_dict({}, section)
        assert getattr(default, field) == params[section][field], key

    def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
        stages = Repo(str(tmp_path)).index.stages
        outs = {s.name: {o.def_path for o in s.outs} for s in stages}
        deps = {s.name: {d.def_path for d in s.deps} for s in stages}
        producer = {path: name for name, paths in outs.items() for path in paths}
        return outs, {name: {producer[d] for d in paths if d in producer} for name, paths in deps.items()}

    outs, upstream = graph()
    assert upstream == {"shard": set(), "train_vae": {"shard"}, "encode_latents": {"shard", "train_vae"},
                        "train": {"shard", "train_vae", "encode_latents"}, "train_judge": {"shard"},
                        "evaluate": {"shard", "train", "train_judge"}}
    assert outs["train"] == {"models/diffusion", "plots/train_loss.csv", "plots/val_loss.csv", "metrics/train.json"}

    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["train"]["out_dir"] = raw["evaluate"]["model_dir"] = "models/big"
    raw["train"]["metrics_path"] = "metrics/big.json"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    moved, moved_upstream = graph()
    assert moved["train"] == {"models/big", "plots/train_loss.csv", "plots/val_loss.csv", "metrics/big.json"}
    assert moved_upstream == upstream


def test_a_run_left_running_by_a_killed_process_is_marked_killed(tmp_path, monkeypatch):
    """A stage killed outright (SIGKILL, the out-of-memory killer) left its MLflow run RUNNING for ever; the next
    execution of the stage on the machine marks it KILLED. A live process's run, another stage's and another
    machine's are left alone."""
    import platform

    import mlflow
    from mlflow.tracking import MlflowClient

    from diffusion.tracking import ensure_experiment, stage_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client, exp = MlflowClient(), ensure_experiment("diffusion")
    here = platform.node()
    left = {name: client.create_run(exp, tags={"stage": stage, "hostname": host, "process_id": str(pid)}).info.run_id
            for name, stage, host, pid in (("killed", "shard", here, dead.pid), ("live", "shard", here, os.getppid()),
                                           ("other stage", "train", here, dead.pid),
                                           ("other host", "shard", "elsewhere", dead.pid))}
    with stage_run("shard", {"a": 1}) as active:
        assert client.get_run(active.info.run_id).data.tags["process_id"] == str(os.getpid())
    status = {name: client.get_run(run_id).info.status for name, run_id in left.items()}
    assert status == {"killed": "KILLED", "live": "RUNNING", "other stage": "RUNNING", "other host": "RUNNING"}


def test_flatten_names_every_level():
    from diffusion.tracking import flatten

    assert flatten({"a": {"b": {"c": 1}, "d": 2}, "l": [1, 2], "s": "x"}) == {
        "a.b.c": 1, "a.d": 2, "l": "[1, 2]", "s": "x"}
