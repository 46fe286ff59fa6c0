"""MLflow tracking: where the store is, and one tagged run per stage execution.

- The tracking URI is ``MLFLOW_TRACKING_URI`` if set, else a sqlite file ``mlflow.db`` at the project
  root, so every stage, and every DVC experiment, writes to the same store that ``mlflow ui
  --backend-store-uri sqlite:///mlflow.db`` shows. That includes queued and ``--temp`` experiments, which
  DVC runs in a throw-away copy of the repository under ``<root>/.dvc/tmp/exps/``: a store found there
  would be deleted with the copy, so such a path is mapped back to ``<root>``.
- Each run is tagged with the stage, the git commit and the DVC experiment name (DVC sets ``DVC_STAGE``
  and ``DVC_EXP_NAME`` in a stage's environment) and the machine (``host_*``, ``torch_version``), and carries the stage's resolved parameters, both as
  flattened MLflow params (comparable in the UI) and as a YAML artifact (exactly what ran).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from . import dvcfile

DEFAULT_EXPERIMENT = "diffusion"

#: Where DVC runs queued (``dvc exp run --queue`` + ``dvc queue start``) and ``dvc exp run --temp``
#: experiments: each in a temporary git clone of the repository, ``<root>/.dvc/tmp/exps/tmpXXXX/`` (queued)
#: or ``<root>/.dvc/tmp/exps/standalone/tmpXXXX/`` (--temp), removed once the experiment is saved
#: (dvc/repo/experiments/executor/local.py, TempDirExecutor).
DVC_EXP_TMP_DIR = (".dvc", "tmp", "exps")


def outside_dvc_exp_tmp(path: Path) -> Path:
    """`path`, or the repository it was copied from if it lies in one of DVC's temporary experiment folders.

    ``/repo/.dvc/tmp/exps/tmpab12/src`` -> ``/repo``. The outermost match wins, so a copy inside a copy
    still maps to the real repository.
    """
    parts = Path(os.path.abspath(path)).parts
    n = len(DVC_EXP_TMP_DIR)
    for i in range(len(parts) - n + 1):
        if parts[i:i + n] == DVC_EXP_TMP_DIR:
            return Path(*parts[:i])
    return path


def shared_across_experiments(path: str | Path) -> Path:
    """`path`, or, if it lies inside one of DVC's temporary experiment copies, the same place in the repository
    the copy was made from.

    For a cache meant to outlive the run (evaluate's Inception features): untracked by git and DVC, it is not
    in the copy, and whatever a queued or ``--temp`` experiment writes there is deleted with the copy, so every
    such experiment would compute it anew. ``/repo/.dvc/tmp/exps/standalone/tmpab12/data/fid_cache`` ->
    ``/repo/data/fid_cache``; a relative path is taken from the working folder.
    """
    full = Path(os.path.abspath(path))
    root = outside_dvc_exp_tmp(full)
    if root == full:
        return Path(path)
    rest = full.parts[len(root.parts) + len(DVC_EXP_TMP_DIR):]
    rest = rest[1:] if rest[:1] == ("standalone",) else rest
    return root.joinpath(*rest[1:])  # rest[0]: the copy's own folder, tmpXXXX


def project_root(start: Path | None = None) -> Path:
    """The project root: ``DVC_ROOT`` if DVC is running us, else the git top level, else the cwd.

    Never a temporary experiment folder (`outside_dvc_exp_tmp`). DVC 3 already sets ``DVC_ROOT`` to the
    original repository for queued and ``--temp`` experiments, but the git top level of such a folder is the
    folder itself (a stage run by hand there, or a DVC that leaves ``DVC_ROOT`` alone, would otherwise open
    an ``mlflow.db`` that is deleted with the folder).
    """
    if os.environ.get("DVC_ROOT"):
        return outside_dvc_exp_tmp(Path(os.environ["DVC_ROOT"]))
    start = start or Path.cwd()
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=start, capture_output=True, text=True, check=True
        )
        return outside_dvc_exp_tmp(Path(out.stdout.strip()))
    except (OSError, subprocess.CalledProcessError):
        return outside_dvc_exp_tmp(start)


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else ``sqlite:///<project root>/mlflow.db``.

    Passed explicitly to Lightning's MLFlowLogger too: its own default (``./mlruns``) is a file store that
    MLflow 3 refuses.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{project_root() / 'mlflow.db'}"
    relative = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    if relative and not relative.startswith(("/", ":")):
        # sqlite:///mlflow.db is relative to the working folder, which for a queued or --temp DVC experiment
        # is a copy deleted afterwards: resolve it against the project root instead.
        return f"sqlite:///{project_root() / relative}"
    return uri


def git_commit(root: Path | None = None) -> str:
    """The current commit hash, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or project_root(), capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


#: Tracked files a DVC experiment changes by design (``dvc exp run -S`` writes the params); not "dirty code".
_PARAMS_FILES = ("params.yaml", "profiles/", "dvc.lock")


def git_dirty(cwd: Path | None = None) -> str:
    """"true" if tracked files differ from the commit in `cwd` (the stage's own working folder: a queued DVC
    experiment's copy holds the experiment's changes), "false", or "unknown".

    Not counted: the parameter files, which an experiment changes by design, and the stages' declared
    outputs: the metrics and plots files are tracked in git, and DVC deletes a stage's outputs before it runs
    it, so every stage after the first would have read as dirty code."""
    cwd = cwd or Path.cwd()
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    outputs = dvcfile.outputs(cwd)
    changed = [line[3:].strip() for line in out.splitlines() if line.strip()]
    code = [path for path in changed if not path.startswith(_PARAMS_FILES)
            and not any(path == o or path.startswith(o + "/") for o in outputs)]
    return "true" if code else "false"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become strings (MLflow params are strings)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value) if isinstance(value, (list, tuple)) else value
    return out


def is_finite_number(value: Any) -> bool:
    """Whether `value` is a metric MLflow and ``dvc metrics`` can take: an int or float, finite, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: The params profile a stage ran with (``cli.run_stage`` sets it; launched DDP processes inherit it): a tag, since
#: MLflow's params hold only the values the profile set.
PROFILE_ENV = "DIFFUSION_PROFILE"


def stage_tags(stage: str) -> dict[str, str]:
    """Tags every stage run carries, so runs can be filtered by stage, commit and experiment.

    In a DVC experiment the commit is the experiment's baseline (``DVC_EXP_BASELINE_REV``, set by DVC): a
    queued experiment may run after the repository's HEAD has moved on.
    """
    return {
        "stage": stage,
        "git_commit": os.environ.get("DVC_EXP_BASELINE_REV") or git_commit(),
        "git_dirty": git_dirty(),  # code not in that commit ran (parameter files aside)
        "dvc_stage": os.environ.get("DVC_STAGE", ""),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "profile": os.environ.get(PROFILE_ENV, ""),  # empty: run from Python, not cli.py
    }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what :mod:`platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def host_tags() -> dict[str, str]:
    """The machine a stage ran on: float results differ across CPU and GPU models (another BLAS kernel
    sums in another order), so two runs of one commit and params.yaml agree to the bit only on the same
    kind of machine, with the same torch and thread count. Tagged on every execution, so a run resumed
    elsewhere says where it ended."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {
        "host_cpu": cpu_model(),
        "host_cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the ATen kernels' ISA (AVX512 ...)
        "host_threads": str(torch.get_num_threads()),
        "host_gpu": ", ".join(f"{gpus.count(name)} x {name}" for name in dict.fromkeys(gpus)) or "none",
        "torch_version": torch.__version__,
    }


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite store (``<dir>/mlartifacts``).

    MLflow's default for a database store is ``./mlruns`` relative to the *current* folder, which scatters
    artifacts wherever a stage or a test happens to run. A server (http URI) decides for itself: None.
    """
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def ensure_experiment(name: str) -> str:
    """Make `name` the active experiment, creating it (with its artifact location) if needed."""
    import mlflow

    existing = mlflow.get_experiment_by_name(name)
    if existing is None:
        try:
            mlflow.create_experiment(name, artifact_location=artifact_location(mlflow.get_tracking_uri()))
        except mlflow.exceptions.MlflowException:
            pass  # created meanwhile by another process
    return mlflow.set_experiment(name).experiment_id


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock beside a sqlite store (``<db>.lock``) while the store is first opened.

    MLflow creates a new store's tables on the first client, without a lock of its own: two stages started at
    once on a fresh store (``dvc queue start -j 2``) collided ("table _alembic_tmp_experiments already
    exists"). Other stores, and systems without ``fcntl``, go unlocked.
    """
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is None or not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri[len("sqlite:///"):] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def stage_run(
    stage: str, params: Mapping[str, Any], *, run_id: str | None = None, experiment: str | None = None
) -> Iterator[Any]:
    """Open (or, with ``run_id``, resume) the MLflow run of one stage execution.

    Args:
        stage: the stage name (``shard``, ``train`` ...), used as tag and run name.
        params: the stage's resolved parameters (its config's ``to_dict()``).
        run_id: an existing run to continue (a resumed training run); its params are not logged again,
            since MLflow refuses to change a logged param (pitfall 11).
        experiment: the MLflow experiment; default ``MLFLOW_EXPERIMENT_NAME`` or "diffusion".
    Yields:
        the active ``mlflow.ActiveRun``.
    """
    import mlflow  # imported here: the library must import without MLflow's start-up cost

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):  # the first client of a new sqlite store creates its tables
        experiment_id = ensure_experiment(experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
    end_killed_runs(experiment_id, stage)
    # A continued run keeps the tags of the execution that opened it (its experiment name, its commit).
    tags = None if run_id else stage_tags(stage)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else stage, tags=tags) as run:
        if run_id is None:
            mlflow.log_params(flatten(params))
            mlflow.log_text(yaml.safe_dump({stage: dict(params)}, sort_keys=False), f"params/{stage}.yaml")
        mlflow.set_tags({**host_tags(), "hostname": platform.node(), "process_id": str(os.getpid())})
        yield run


def end_killed_runs(experiment_id: str, stage: str) -> list[str]:
    """Mark KILLED the runs of `stage` left RUNNING by a process of this machine that no longer exists.

    A run ends itself as FINISHED or FAILED, Ctrl-C included; a process killed outright (SIGKILL, the kernel's
    out-of-memory killer, a lost node) leaves it RUNNING for ever in the MLflow UI. Each execution tags its
    hostname and process id, so the next execution of the stage on that machine can tell. (Containers given one
    hostname and sharing a store see each other's processes as gone: a live run marked so is set FINISHED or
    FAILED again when it ends.) Returns their ids.
    """
    from mlflow.tracking import MlflowClient

    from diffusion.atomic import pid_alive

    client, host, ended = MlflowClient(), platform.node(), []
    running = client.search_runs([experiment_id], f"tags.stage = '{stage}' and attributes.status = 'RUNNING'")
    for run in running:
        pid = run.data.tags.get("process_id", "")
        if run.data.tags.get("hostname") == host and pid.isdigit() and int(pid) != os.getpid() \
                and not pid_alive(int(pid)):
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended
