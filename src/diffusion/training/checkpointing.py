"""Resumable training runs, shared by the training stages (train_vae, train): keys, checkpoints, MLflow.

A training stage killed half way (a preempted job, a SIGKILL, a power cut) and started again with the
same parameters continues where it stopped; started with *changed* parameters, it starts afresh. That
is decided by a **run key**, a short hash of everything that determines the result:

- the stage's resolved config, minus the fields that do not change the trained weights (logging and
  validation frequency, output paths: the `exclude` list, per stage). The loader worker count stays in: each
  worker draws its own seeded stream and the loader interleaves them, so 2 workers feed other batches than
  1, and a run resumed with another count would end with weights that neither count gives uninterrupted.
  So does the checkpoint interval, which cuts training into the seeded segments of :class:`.exact_resume.ExactResume`;
- `extra` inputs the config does not capture: a fingerprint of the input data (shard names and sizes)
  and of the code (a checkpoint of different code is not the same run). So `dvc repro` after a change
  to the data or to the code never resumes, or re-exports, a checkpoint made before it.

The keys and fingerprints are in :mod:`diffusion.run_keys` (encode_latents keys its resumable shards with them).

Layout (kept across runs and never cached; not a DVC output, see .gitignore)::

    <checkpoint_dir>/<stage>-<key>/last.ckpt          Lightning's full state: weights, optimizers, loops
                                   mlflow_run_id.txt   the MLflow run this checkpoint belongs to
                                   run_key.json        what the key was computed from (for people)

Resume protocol (pitfalls 11 and 12):
1. ``last.ckpt`` exists in the key's folder -> ``trainer.fit(..., ckpt_path=last.ckpt)``: the global step,
   optimizer, schedulers and callback states continue. ``ModelCheckpoint(dirpath=...)`` is explicit.
2. The MLflow run id stored beside it is continued (``stage_run(run_id=...)`` and
   ``MLFlowLogger(run_id=...)``): its params equal ours because the key matched, so MLflow's refusal to
   change a logged param never triggers. No checkpoint (or a run that no longer exists in the store):
   a new run.
3. Every write is atomic: Lightning writes checkpoints to a temporary file and moves it into place
   (``lightning_fabric.utilities.cloud_io._atomic_save``); our small files use ``os.replace``.

Only global rank 0 opens the MLflow run: under DDP, Lightning starts the other ranks by re-running the
stage script, which must not open runs of their own (one run per stage execution).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from diffusion.atomic import atomic_write_json, atomic_write_text
from diffusion.run_keys import DEFAULT_EXCLUDE, run_key

LAST_CHECKPOINT = "last.ckpt"
RUN_ID_FILE = "mlflow_run_id.txt"
KEY_FILE = "run_key.json"


# --------------------------------------------------------------------------------------------------
# Digests of the trained weights
# --------------------------------------------------------------------------------------------------


def weights_digest(module: torch.nn.Module) -> str:
    """A short hash of `module`'s parameters and buffers (names, dtypes, shapes and bytes).

    Under DDP every rank holds a full copy of the weights and applies the same averaged gradients, so
    every rank must report the same digest; a different one means the ranks trained apart.
    """
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        t = tensor.detach().cpu().contiguous().reshape(-1)  # (numel,): a 0-d tensor cannot change dtype view
        h.update(t.view(torch.uint8).numpy().tobytes())  # raw bytes: bfloat16 has no numpy dtype
    return h.hexdigest()[:12]


def rank_report(stage: str, trainer: pl.Trainer, module: torch.nn.Module) -> str:
    """The line each rank prints when training ends: its global rank, its optimizer steps and, where the
    strategy keeps a full copy of the weights on every rank (DDP, one device), their digest. Under DDP
    unequal steps would mean a hang or lost data, unequal digests ranks that did not average gradients.
    FSDP and DeepSpeed shard the weights, so their ranks hold different parts and print no digest."""
    from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy

    line = f"{stage}: rank {trainer.global_rank} of {trainer.world_size} took {trainer.global_step} optimizer steps"
    # The exact class: DeepSpeedStrategy is a subclass of DDPStrategy, and it shards the weights.
    if type(trainer.strategy) in (DDPStrategy, SingleDeviceStrategy):
        line += f"; weights {weights_digest(module)}"
    return line


def print_rank_report(stage: str, trainer: pl.Trainer, module: torch.nn.Module) -> None:
    """Print :func:`rank_report`'s line in one write. The ranks print theirs at the same moment into one pipe, and
    with unbuffered output (``PYTHONUNBUFFERED``) ``print`` writes the text and its newline separately, so one rank's
    line could land between another's text and newline; one write of a short line to a pipe is atomic (POSIX,
    under PIPE_BUF bytes)."""
    sys.stdout.write(rank_report(stage, trainer, module) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------------
# The run folder and the MLflow run beside the checkpoint
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumePoint:
    """Where a keyed run keeps its checkpoints, and what a restart continues from.

    Attributes:
        stage, key: the stage name and the run key.
        dir: ``<checkpoint_dir>/<stage>-<key>``.
        ckpt_path: ``dir/last.ckpt`` if it exists (pass to ``trainer.fit(ckpt_path=...)``), else None.
        run_id: the MLflow run stored beside the checkpoint, or None.
    """

    stage: str
    key: str
    dir: Path
    ckpt_path: Path | None
    run_id: str | None

    @property
    def resuming(self) -> bool:
        return self.ckpt_path is not None


class CheckpointError(RuntimeError):
    """The run's last.ckpt cannot be read; the message names it and what to delete."""


def find_resume(checkpoint_dir: str | Path, stage: str, key: str) -> ResumePoint:
    """Look in ``<checkpoint_dir>/<stage>-<key>/`` for a checkpoint and its MLflow run id.

    A checkpoint that is not a readable archive (a copy cut short, a disk that filled up; Lightning's own saves
    are atomic) raises CheckpointError before the stage opens its MLflow run: resuming it would fail inside
    ``trainer.fit`` on every rerun. Only the archive's index is read here, not the weights.
    """
    folder = Path(checkpoint_dir) / f"{stage}-{key}"
    last = folder / LAST_CHECKPOINT
    if last.is_file():
        try:
            zipfile.ZipFile(last).close()  # torch.save's format: the index sits at the end, so a cut file fails
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{last}: damaged checkpoint ({e}); delete the folder {folder} to train this run "
                                  "afresh (its MLflow run stays in the store)") from None
    id_file = folder / RUN_ID_FILE
    run_id = (id_file.read_text().strip() or None) if id_file.is_file() else None
    return ResumePoint(stage, key, folder, last if last.is_file() else None, run_id)


def record_run(point: ResumePoint, run_id: str, params: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
    """Write the MLflow run id (and what the key hashes) into the run folder, atomically."""
    point.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(point.dir / RUN_ID_FILE, run_id + "\n")
    atomic_write_json(point.dir / KEY_FILE, {"stage": point.stage, "key": point.key, "params": params, "extra": extra})


def is_launch_rank_zero() -> bool:
    """Whether this process is global rank 0, judged from the launcher's environment *before* the Trainer
    exists: Lightning's DDP launcher sets LOCAL_RANK/NODE_RANK in the processes it starts; torchrun sets
    RANK; SLURM sets SLURM_PROCID. The process that launches the others has none of them (or zeros)."""
    keys = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in keys)


def _run_to_continue(run_id: str | None, params: Mapping[str, Any]) -> bool:
    """Whether the checkpoint's MLflow run can be continued: a live run of this store, in the experiment the
    stage logs to now, whose logged params are `params`. A run of another experiment cannot be resumed under
    this one (MLflow refuses); and a parameter the run key ignores (``log_every_n_steps``, an output path) may
    have changed, which MLflow could not record in the old run (params cannot change): both get a new run."""
    if not run_id:
        return False
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from diffusion.tracking import DEFAULT_EXPERIMENT, flatten, tracking_uri

    client = MlflowClient(tracking_uri())
    try:
        run = client.get_run(run_id)
        experiment = client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
    except MlflowException:
        return False
    if run.info.lifecycle_stage != "active" or experiment is None or run.info.experiment_id != experiment.experiment_id:
        return False
    return run.data.params == {k: str(v) for k, v in flatten(params).items()}


@dataclass
class StageRun:
    """What :func:`resumable_stage_run` yields.

    Attributes:
        point: the run folder and the checkpoint to resume from (``point.ckpt_path``).
        run_id: the stage's MLflow run (None on ranks other than 0).
        logger: the Lightning logger for the Trainer (``False`` on ranks other than 0).
        active: the ``mlflow.ActiveRun`` (None on ranks other than 0).
    """

    point: ResumePoint
    run_id: str | None
    logger: Any
    active: Any = None


@contextlib.contextmanager
def resumable_stage_run(
    stage: str,
    params: Mapping[str, Any],
    checkpoint_dir: str | Path,
    *,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    extra: Mapping[str, Any] | None = None,
) -> Iterator[StageRun]:
    """Open (or continue) the MLflow run of one training-stage execution and find its checkpoint.

    The MLflow run is continued only together with a checkpoint of the same key (module docstring); the
    run id is written beside the checkpoints before training starts, so a kill at any point leaves it.
    """
    from diffusion.tracking import stage_run
    from diffusion.training.mlflow_logger import mlflow_logger

    extra = dict(extra or {})
    key = run_key(params, exclude=exclude, extra=extra)
    point = find_resume(checkpoint_dir, stage, key)
    if not is_launch_rank_zero():
        yield StageRun(point, None, False)
        return
    run_id = point.run_id if point.resuming and _run_to_continue(point.run_id, params) else None
    if point.resuming and run_id is None:
        warnings.warn(f"{stage}: resuming {point.ckpt_path} in a new MLflow run (run {point.run_id} is not in this "
                      "store and experiment, or was logged with other values of parameters the run key ignores)")
    with stage_run(stage, params, run_id=run_id) as active:
        if point.resuming and run_id is None:  # said on the run too, not only on stderr
            import mlflow

            mlflow.set_tags({"resumed_from_checkpoint": str(point.ckpt_path),
                             **({"resumed_from_run": point.run_id} if point.run_id else {})})
        record_run(point, active.info.run_id, params, extra)
        yield StageRun(point, active.info.run_id, mlflow_logger(active.info.run_id), active)


def log_image(trainer: pl.Trainer, image: Any, artifact_file: str) -> bool:
    """Log a PIL image to the Trainer's MLflow run as an artifact (rank 0 only). False if there is no
    MLflow logger (e.g. ``logger=False``)."""
    logger = trainer.logger
    run_id = getattr(logger, "run_id", None)
    if not trainer.is_global_zero or run_id is None:
        return False
    logger.experiment.log_image(run_id, image, artifact_file=artifact_file)
    return True


# --------------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------------


class _LastStepCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that always saves ``last.ckpt`` at the end of training.

    Lightning saves at the end only when no checkpoint was saved during the run (``on_train_end``), so with
    ``max_steps`` not a multiple of the interval (1300 steps, every 250) ``last.ckpt`` would hold step 1250:
    a rerun with the same parameters would train the last 50 steps again, with a reseeded generator, and
    export other weights. The final step is saved like the others, at its batch's end (after the EMA's update:
    Lightning orders checkpoint callbacks last); a diverged run is never saved (NonFiniteLossCheck checks
    before every save).
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        # The final step is saved here, at its batch's end like every other, not in on_train_end: by then the
        # EMA callback (whose on_train_end runs first) has copied the average into the module, and the
        # checkpoint would hold the EMA as the live weights beside the live weights' AdamW moments.
        if self.save_last and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            self._save_final(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last:  # a run that ended before max_steps (max_epochs, a stop): its last step
            self._save_final(trainer)

    def _save_final(self, trainer: pl.Trainer) -> None:
        if getattr(self, "_last_global_step_saved", -1) != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def checkpoint_callback(dirpath: str | Path, every_n_steps: int) -> ModelCheckpoint:
    """Save ``<dirpath>/last.ckpt`` every `every_n_steps` optimizer steps and at the end of training.

    Only ``last.ckpt`` is kept (``save_top_k=0``: nothing is monitored, a resume needs the latest state
    only); ``enable_version_counter=False`` so a resumed run overwrites it rather than writing
    ``last-v1.ckpt``.
    """
    return _LastStepCheckpoint(
        dirpath=str(dirpath),
        every_n_train_steps=every_n_steps,
        save_top_k=0,
        save_last=True,
        enable_version_counter=False,
    )
