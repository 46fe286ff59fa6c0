"""The training values that the logs, the loss curve and the final metrics report: means over each logging window.

A diffusion loss is the denoising error at one random timestep per sample, so one batch's loss scatters widely
from step to step (with epsilon prediction the error near t = 0 is many times that near t = T). Lightning's
``self.log(..., on_step=True)`` reports the batch that happens to fall on every ``log_every_n_steps``-th step, on
global rank 0 alone and, under gradient accumulation, only the last micro-batch of that step: a curve whose noise
hides its trend, drawn from a fraction of the batches trained on. diffusers' training scripts report every
process's loss (``accelerator.gather(loss).mean()``) averaged over the accumulation window; here the window is the
whole logging interval.

`StepMeans` sums each scalar the training step returns on its device at every micro-batch (an addition, no host
sync), and at every ``log_every_n_steps``-th optimizer step adds the sums and the micro-batches counted over the ranks
in one collective, divides, logs the means (``train/<name>``, to the Trainer's loggers) and keeps the loss's as a
point of the curve that ``dvc plots`` draws; the steps after the last multiple, when training ends, make a last
window. Its sums and points travel in the checkpoint, so a resumed run logs what an uninterrupted one logs, to the
bit.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


def step_values(trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> dict[str, torch.Tensor]:
    """The scalar tensors a training step returned (a tensor is its loss; a dict may add others), detached, with
    the loss as the step computed it: under automatic optimization Lightning hands back
    loss / accumulate_grad_batches."""
    if isinstance(outputs, torch.Tensor):
        outputs = {"loss": outputs}
    if not isinstance(outputs, Mapping):
        return {}
    values = {k: v.detach() for k, v in outputs.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
    if "loss" in values and pl_module.automatic_optimization:
        values["loss"] = values["loss"].float() * trainer.accumulate_grad_batches  # not in bf16 (bf16-true)
    return values


def batch_size(batch: Any) -> int | None:
    """The samples in a batch: the length of its first tensor (a batch's own, or the first in a dict or sequence:
    images, latents and tokens all lead with it), or None if it holds none."""
    if isinstance(batch, torch.Tensor):
        return len(batch) if batch.ndim else None
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, Sequence) else ()
    return next((len(v) for v in items if isinstance(v, torch.Tensor) and v.ndim), None)


class StepMeans(Callback):
    """Logs ``train/<name>``, the mean of each scalar the training step returns over the micro-batches of the last
    `every_n_steps` optimizer steps and over every rank, at each multiple of `every_n_steps` (where Lightning's own
    logging would), and over the steps after the last multiple when training ends.

    Also ``train/samples_per_second``: the samples of the window on every rank over its wall-clock time, measured
    between two window ends, where the means' read-back waits for the device anyway (so no extra sync, and the time
    is the device's too). It counts whatever the window held: data loading, checkpoints, sample grids. And
    ``train/lr``: the learning rate the window's last step ran at (the first optimizer's first parameter group; a
    Python number, read as the step starts, before a scheduler stepped inside it can change it).

    Args:
        every_n_steps: the window, in optimizer steps: the Trainer's ``log_every_n_steps`` (0: nothing is logged).
        curve_path: where :meth:`write` puts the loss's means as ``step,loss`` CSV rows (None: kept, not written).
        clock: seconds, for the throughput (a test's own clock).

    Attributes:
        points: ``(step, mean loss)`` of every window so far, a resumed run's included.
        last: the last window's means by name (floats), e.g. a stage's final training metrics.
    """

    def __init__(self, every_n_steps: int, curve_path: str | Path | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.every = every_n_steps
        self.clock = clock
        self._samples, self._since = 0, 0.0  # this process's samples in the window, and when it opened
        self.path = Path(curve_path) if curve_path is not None else None
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.points: list[tuple[int, float]] = []
        self.last: dict[str, float] = {}
        self._step_before = 0
        self._lr: float | None = None
        self._strategy: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._strategy = trainer.strategy  # for state_dict, which Lightning calls without the Trainer

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._samples, self._since = 0, self.clock()
        # Sums restored from a checkpoint (which Lightning loads before this hook) come on the CPU: to the device the
        # values and the collective are on.
        self.sums = {k: v.to(trainer.strategy.root_device) for k, v in self.sums.items()}

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._step_before = trainer.global_step
        if trainer.optimizers:
            self._lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any = None,
                           *args: Any) -> None:
        self._samples += batch_size(batch) or 0
        for name, value in step_values(trainer, pl_module, outputs).items():
            value = value.float().reshape(())
            # A key may come and go within a window (the GAN's terms start at discriminator.start_step): each
            # value is averaged over the micro-batches that had it.
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
            self.counts[name] = self.counts.get(name, 0) + 1
        step = trainer.global_step
        # Only a batch that made an optimizer step (the last micro-batch of an accumulation window). The steps after
        # the last multiple of every_n_steps make a last, shorter window at max_steps, so that the curve and the
        # final figures reach the end of training; closed here, before the final checkpoint is written (a rerun of
        # the finished run resumes from it and runs no training hook at all).
        final = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        if self.every and step != self._step_before and (step % self.every == 0 or final) and self._open(trainer):
            self._close_window(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training that stopped before max_steps (max_epochs, a requested stop): its steps since the last window.
        if self.every and self._open(trainer):
            self._close_window(trainer)
        if trainer.is_global_zero and self.path is not None:
            self.write()

    def _stacked(self, names: list[str], device: Any) -> torch.Tensor:
        """This rank's sums of `names`, then their counts, as one tensor for one collective; a value this rank did
        not return counts as a sum of 0 over 0 micro-batches."""
        zero = torch.zeros((), device=device)
        counts = torch.tensor([float(self.counts.get(n, 0)) for n in names]).to(device)  # one copy to the device
        return torch.cat([torch.stack([self.sums.get(n, zero) for n in names]), counts])

    def _open(self, trainer: pl.Trainer) -> bool:
        """Whether there is a window to close: values to average, or, under DDP, possibly on another rank (the
        close is a collective, which every rank must enter or none)."""
        return bool(self.sums) or trainer.world_size > 1

    def _close_window(self, trainer: pl.Trainer) -> None:
        """Average the open window over its micro-batches and every rank (a collective: every rank calls this at the
        same step), log the means, keep them as `last` and the loss's as a point of the curve; open a new window.

        Logged to the Trainer's loggers here, not through ``self.log``: this runs first among the callbacks, so a
        checkpoint saved at this step (ModelCheckpoint runs last) never holds a point that MLflow lacks. Through
        Lightning the metrics reached the logger after the checkpoint, and a kill between the two lost the point."""
        names = _names_on_every_rank(sorted(self.sums), trainer.world_size)
        if not names:  # no rank returned a value in this window (the same answer on every rank)
            return
        totals = trainer.strategy.reduce(self._stacked(names, trainer.strategy.root_device), reduce_op="sum")
        # Each value's sum over every rank's micro-batches that returned it, over their number: the mean of the
        # ranks' means when they agree (the same count on each), and right when some ranks lack the value.
        means = totals[:len(names)] / totals[len(names):]
        self.last = dict(zip(names, means.tolist()))  # one host sync per window, where Lightning's logging had one
        if "loss" in self.last:
            self.points.append((trainer.global_step, self.last["loss"]))
        self.sums, self.counts = {}, {}
        metrics = {f"train/{n}": v for n, v in self.last.items()}
        now = self.clock()
        if self._samples and now > self._since:  # every rank's batches are as large (the loaders' full batches)
            metrics["train/samples_per_second"] = self._samples * trainer.world_size / (now - self._since)
        self._samples, self._since = 0, now
        if self._lr is not None:
            metrics["train/lr"] = self._lr
        for logger in trainer.loggers:  # Lightning's loggers write on global rank 0 only
            logger.log_metrics(metrics, step=trainer.global_step)

    def recent_loss(self, windows: int = 10) -> float | None:
        """The mean loss over the last `windows` windows' steps (None before the first). Each point is the mean of
        the steps since the one before it, so they are weighted by those steps: a last, shorter window (max_steps
        off the grid) counts for the steps it has, not as a whole window."""
        if not self.points:
            return None
        ends = self.points[-windows:]
        previous = self.points[-windows - 1][0] if len(self.points) > windows else 0
        total = weight = 0.0
        for step, loss in ends:
            total, weight, previous = total + (step - previous) * loss, weight + (step - previous), step
        return total / weight

    def write(self) -> None:
        """The loss curve as CSV (``step,loss``), replaced atomically."""
        if self.path is None:
            raise ValueError("StepMeans.write: no curve_path was given")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "loss"])
            writer.writerows((s, f"{v:.6f}") for s, v in self.points)
        tmp.replace(self.path)

    def state_dict(self) -> dict[str, Any]:
        """The curve, the last means and the open window: a run resumed from a checkpoint between two logging steps
        continues its sums.

        Under DDP each rank's open sums differ and only rank 0's checkpoint is written, so the checkpoint holds their
        mean over the ranks, and their counts' (a collective: Lightning builds the checkpoint on every rank), which
        every rank resumes from. The window's mean, sum_r (S/W + R_r) / sum_r (C/W + c_r) = (S + R) / (C + c), S and C
        the sums and counts of every rank before the checkpoint, is then what it would have been uninterrupted, up to
        the order of floating-point additions; on one process it is the same to the bit."""
        names = _names_on_every_rank(sorted(self.counts), getattr(self._strategy, "world_size", 1))
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, float] = {}
        if names:
            local = self._stacked(names, self._strategy.root_device if self._strategy is not None else None)
            if self._strategy is not None:
                local = self._strategy.reduce(local, reduce_op="mean")
            local = local.cpu()
            sums = dict(zip(names, local[:len(names)]))
            counts = {n: int(c) if float(c).is_integer() else float(c) for n, c in zip(names, local[len(names):])}
        return {"points": list(self.points), "last": dict(self.last), "counts": counts, "sums": sums}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = [tuple(p) for p in state_dict["points"]]
        self.last = dict(state_dict.get("last", {}))
        self.counts = dict(state_dict.get("counts", {}))
        self.sums = dict(state_dict.get("sums", {}))


def _names_on_every_rank(names: list[str], world_size: int) -> list[str]:
    """The union of every rank's value names, sorted. The collectives that follow stack one sum and one count per
    name, and a rank whose stack is shorter (a training step that returns a value on some ranks only, e.g. a term
    computed when a batch holds some kind of sample) would leave the others waiting forever; with the union every
    rank stacks the same names. One small gather of the names per window, where the means are read back anyway;
    none on one process (or on a strategy with one rank, whose reduce is no collective)."""
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return names
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, names)
    return sorted(set().union(*(g or () for g in gathered)))


def step_means(trainer: pl.Trainer) -> StepMeans:
    """The Trainer's `StepMeans` (`build_trainer` adds one to every Trainer it builds)."""
    found = [cb for cb in trainer.callbacks if isinstance(cb, StepMeans)]
    if len(found) != 1:
        raise ValueError(f"expected one StepMeans among the Trainer's callbacks, found {len(found)}")
    return found[0]
