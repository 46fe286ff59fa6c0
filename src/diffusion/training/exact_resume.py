"""Exact resume: a training run killed and resumed from its checkpoint ends as if never stopped.

Shared by train_vae and train (``pipeline/<stage>.py`` adds :class:`ExactResume` to the Trainer's callbacks);
the checkpoints themselves, their run keys and the MLflow run beside them are :mod:`.checkpointing`.
"""

from __future__ import annotations

import hashlib
import random
import time
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


def segment_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the training segment that starts after optimizer step `step` on `rank` (< 2**32, so numpy
    takes it too): a hash, so that neighbouring (seed, rank, step) give unrelated streams."""
    digest = hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def run_identity(key: str, cfg: Any) -> str:
    """What every DDP rank must agree on: the run key and the logging and validation cadence, which the key
    leaves out (a rerun may change them) but which decide where ranks meet in collectives."""
    return f"{key} (log every {cfg.log_every_n_steps}, validate every {cfg.val_every_n_steps})"


class RanksDisagreeError(RuntimeError):
    """The processes of a multi-node run are not running the same run (parameters, code, data, or the step
    they resume from); each rank's message says what its own view is. A user's mistake at launch, not a bug:
    the command line prints it as one line, as it does a bad parameter."""


class ExactResume(Callback):
    """Make a run killed and resumed from a checkpoint end with the weights of the run that was never stopped.

    What a checkpoint does not hold is the random state: the global generators (timesteps and noise, the VAE's
    posterior samples, dropout) and the position in the data stream, which WebDataset cannot seek to. So
    training is cut into **segments** of `steps_per_segment` optimizer steps, the checkpoint interval, and each
    segment starts from a fixed state that depends on nothing before it:

    - the loader's epoch is one segment long (the stage sets ``epoch_steps`` to it), and segment k reads
      pass k of the stream, seeded by (seed, rank, worker, k) (``diffusion.data.loader``);
    - before its first batch, the global generators (torch on every device, numpy, random) are seeded from
      (seed, rank, step) (:func:`segment_seed`); the loader's own DataLoader seed comes from its own generator,
      so creating its iterator draws nothing from them.

    Every periodic checkpoint falls on a segment boundary, so a resumed run sets the loader to the segment the
    checkpoint ends and reseeds at the same point as the uninterrupted run. The rank is in the seed: each DDP
    rank draws its own timesteps and noise.

    Under DDP it also checks, before the first step, that every rank runs the same run: the same `identity`
    (the run key: parameters, code and data) from the same checkpoint step. Ranks that differ train apart
    without a word (another learning rate on one node) or wait for each other for ever (another max_steps).

    Args:
        loader: the training loader, with ``set_epoch(int)`` (``diffusion.data.loader.StreamLoader``).
        seed: the stage's seed.
        steps_per_segment: optimizer steps per segment: the stage's ``checkpoint_every_n_steps``.
        identity: what must be equal on every rank (the stage's run key and its cadence settings).
    """

    def __init__(self, loader: Any, seed: int, steps_per_segment: int, identity: str = "") -> None:
        self.loader = loader
        self.seed = seed
        self.steps_per_segment = steps_per_segment
        self.identity = identity
        self.global_step = 0
        self._seeded_at: int | None = None  # the step whose segment seed is in effect (not saved: see below)
        self._seconds_before = 0.0  # training time of the executions before this one (from the checkpoint)
        self._started: float | None = None
        self._max_steps: int | None = None
        self._final: float | None = None  # the time saved with the checkpoint of the last step

    @property
    def train_seconds(self) -> float:
        """Wall-clock training time up to now, over every execution of this run (each one's time up to the
        checkpoint it left: the steps a killed execution took after that were lost with it, and redone). Once the
        last step's checkpoint is saved, the time saved with it: a rerun of the finished run (which resumes that
        checkpoint and trains no step) then reports the same figure, not one short by the checkpoint's write."""
        if self._final is not None:
            return self._final
        return self._seconds_before + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started, self._max_steps = time.perf_counter(), trainer.max_steps

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # The first micro-batch after a boundary step (under gradient accumulation global_step stays put for
        # the rest of the group). A resumed run starts with _seeded_at None, so it reseeds at its first batch,
        # which is where the uninterrupted run reseeded too.
        step = trainer.global_step
        if step % self.steps_per_segment == 0 and step != self._seeded_at:
            self._seeded_at = step
            seed = segment_seed(self.seed, trainer.global_rank, step)
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)  # the CPU and every CUDA device

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.global_step = trainer.global_step

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            self._check_ranks_agree(trainer)

    def _check_ranks_agree(self, trainer: pl.Trainer) -> None:
        """Every rank runs rank 0's run from rank 0's step, or every rank raises (no rank is left waiting).

        Every rank looks for last.ckpt on its own disk, and only global rank 0 writes one: without a checkpoint
        folder shared by all nodes, after a restart rank 0 resumes at step N and the others start at 0, with
        other optimizer, schedule and EMA states, until their collectives stop matching (an error, or a hang).
        Here callbacks are restored (``self.global_step`` is the checkpoint's), the training loop not yet.
        """
        resuming = trainer.ckpt_path is not None
        mine = (self.identity, resuming, self.global_step if resuming else 0)
        first = trainer.strategy.broadcast(mine, src=0)
        if trainer.strategy.reduce_boolean_decision(mine == first, all=True):
            return
        if mine == first:
            raise RanksDisagreeError(f"rank {trainer.global_rank}: another rank runs another run than rank 0 (its own "
                               "error says how)")
        if mine[0] != first[0]:
            problem = (f"runs run {mine[0]!r} and rank 0 run {first[0]!r}: every node must run the same code "
                       "with the same parameters (params.yaml, profile and -S) and the same data")
        else:
            problem = (f"{'found' if resuming else 'did not find'} the run's last.ckpt (step {mine[2]}) and rank 0 "
                       f"{'did' if first[1] else 'did not'} (step {first[2]}): checkpoint_dir must be one folder "
                       "shared by every node")
        raise RanksDisagreeError(f"rank {trainer.global_rank} {problem}")

    def state_dict(self) -> dict[str, Any]:
        seconds = self.train_seconds
        if self._max_steps is not None and 0 < self._max_steps <= self.global_step:
            self._final = seconds
        return {"global_step": self.global_step, "steps_per_segment": self.steps_per_segment,
                "train_seconds": seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Restored before Lightning creates the training iterator, so the first pass read is this segment's.
        self.global_step = int(state_dict.get("global_step", 0))
        self._seconds_before = float(state_dict.get("train_seconds", 0.0))
        segment, rest = divmod(self.global_step, self.steps_per_segment)
        if rest and self.global_step:
            # Only a checkpoint saved off the grid (the final one, at max_steps) lands here; a finished run
            # trains no further, so nothing depends on it. Anything else continues on a fresh pass.
            segment += 1
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(segment)
