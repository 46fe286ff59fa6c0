"""The Lightning Trainer of the training stages (train_vae, train), built from their shared fields.

The fields are ``diffusion.stage_configs.TrainerFields``; :func:`build_trainer` turns them into a
step-based ``pl.Trainer`` with the settings streaming WebDataset loaders need, and resolves
``precision: auto`` (:func:`resolve_precision`) to what this hardware runs fast. Resuming, checkpoints and the
MLflow run are :mod:`diffusion.training.checkpointing`.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
from pytorch_lightning.loggers import MLFlowLogger

from diffusion.config import ConfigError
from diffusion.training.checkpointing import is_launch_rank_zero
from diffusion.training.mlflow_logger import StepLogger
from diffusion.training.step_means import StepMeans


def fast_bf16(accelerator: str) -> bool:
    """Whether bfloat16 autocast pays off where a Trainer with this `accelerator` setting runs.

    On a GPU: when it supports bfloat16 (Ampere and later). On a CPU: only with AMX (Intel Sapphire Rapids
    and later), whose tile instructions run bfloat16 matrix products and convolutions; there the CPU VAE
    trains 1.7x faster in bf16-mixed. Without AMX, bfloat16 costs conversions and gains nothing: the same
    VAE step is 15% slower than float32 on an AVX-512-BF16 CPU without AMX, and CPUs without native
    bfloat16 at all (most laptops) emulate it. ``torch.cpu._is_amx_tile_supported`` is the check Inductor
    uses for its AMX kernels.
    """
    use_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if use_gpu:
        # including_emulation=False: a pre-Ampere GPU (V100, T4) "supports" bf16 by emulation, slower than fp32.
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if accelerator not in ("cpu", "auto"):
        return False  # mps: autocast to bfloat16 there is not what this check is about
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx and amx())


def check_hardware(cfg: Any, section: str) -> None:
    """Refuse, before the stage opens its run or reads data, an accelerator, device count or strategy this
    machine cannot give. Lightning finds out only when the Trainer is built ("No supported gpu backend
    found!"), after the MLflow run and the checkpoint folder exist. Checked here, not when params.yaml loads:
    every stage loads every section, and a CPU machine may well shard for a GPU training run.

    ``devices`` counts per node, so it is compared with this machine's GPUs. Raises ConfigError naming the key.
    """
    accelerator, devices = cfg.accelerator, cfg.devices
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if (accelerator in ("gpu", "cuda") and not cuda and not (accelerator == "gpu" and mps)) or \
            (accelerator == "mps" and not mps):
        raise ConfigError(f"{section}.accelerator: {accelerator!r}, but torch {torch.__version__} finds no such "
                          f"device on this machine; use 'auto' (a GPU if there is one) or 'cpu'")
    on_cuda = cuda and accelerator in ("gpu", "cuda", "auto")
    if on_cuda and isinstance(devices, int) and devices > torch.cuda.device_count():
        raise ConfigError(f"{section}.devices: {devices} per node, but this machine has "
                          f"{torch.cuda.device_count()} CUDA GPU(s)")
    if cfg.strategy == "fsdp" and not on_cuda:
        raise ConfigError(f"{section}.strategy: 'fsdp' runs on CUDA GPUs only (Lightning), and this run would be on "
                          f"the {'MPS device' if accelerator != 'cpu' and mps else 'CPU'}; use 'ddp' or 'auto'")
    if devices == -1 and not on_cuda and not (mps and accelerator != "cpu"):
        raise ConfigError(f"{section}.devices: -1 means every GPU, and this run would be on the CPU: set the number "
                          "of processes (1, or more with strategy 'ddp')")
    _check_launcher(cfg, section)


def _check_launcher(cfg: Any, section: str) -> None:
    """The process layout must match the launcher's: Lightning checks it when the Trainer is built (after the run
    has opened), and a run with ``num_nodes`` > 1 and no launcher waits half an hour for nodes that never come."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env and "LOCAL_WORLD_SIZE" in env:  # started by torchrun
        local, world = int(env["LOCAL_WORLD_SIZE"]), int(env.get("WORLD_SIZE", env["LOCAL_WORLD_SIZE"]))
        if cfg.devices not in (local, "auto", -1):
            raise ConfigError(f"{section}.devices: {cfg.devices}, but torchrun started {local} process(es) on this "
                              f"node (--nproc-per-node): set {section}.devices={local}")
        if cfg.num_nodes * local != world:
            raise ConfigError(f"{section}.num_nodes: {cfg.num_nodes}, but torchrun started {world} processes in all, "
                              f"{local} per node (--nnodes {world // max(local, 1)}): set "
                              f"{section}.num_nodes={world // max(local, 1)}")
    elif _under_srun():  # Lightning's SLURMEnvironment checks the same, but only once the run has opened
        for var, key, flag in (("SLURM_NTASKS_PER_NODE", "devices", "--ntasks-per-node"),
                               ("SLURM_NNODES", "num_nodes", "--nodes")):
            slurm, value = env.get(var, ""), getattr(cfg, key)
            if slurm.isdigit() and isinstance(value, int) and value not in (-1, int(slurm)):
                raise ConfigError(f"{section}.{key}: {value}, but SLURM runs {flag}={slurm} (one task per process): "
                                  f"set {section}.{key}={slurm}")
    launched = any(k in env for k in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "MASTER_ADDR", "WORLD_SIZE"))
    if cfg.num_nodes > 1 and not launched:
        raise ConfigError(f"{section}.num_nodes: {cfg.num_nodes} machines, but nothing here starts or joins them: run "
                          "it under torchrun or srun, or set MASTER_ADDR, MASTER_PORT, NODE_RANK and WORLD_SIZE "
                          "on every machine (README, Several GPUs and machines)")


# No tqdm monitor thread for Lightning's bars (pitfall 15). tqdm starts it with the first bar, which Lightning
# creates just before the first batch, when the loader forks its workers: a thread starting during a fork can
# leave the worker deadlocked before it runs a line (CPython gh-112275, Python <= 3.11.7), and the run hangs.
# The monitor only redraws a bar that has not moved in 10 s.
Tqdm.monitor_interval = 0


class LossBar(TQDMProgressBar):
    """Lightning's progress bar with the training loss: the last logging window's mean (`StepMeans`).

    Not a metric logged with ``prog_bar=True``: Lightning converts those to Python numbers at every batch's end
    (its logger connector builds the bar's metrics then, whatever the refresh rate), an ``.item()``, so on a GPU a
    wait for the device, at every step. `StepMeans` reads its means back once per window, and the bar shows them.
    """

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        means = next((cb for cb in trainer.callbacks if isinstance(cb, StepMeans)), None)
        if means is not None and "loss" in means.last:
            items["train/loss"] = f"{means.last['loss']:.4g}"
        return items


def resolve_precision(value: Any, accelerator: str) -> str:
    """Lightning's precision string for a config value: ``32`` -> "32-true"; "auto" -> "bf16-mixed" where
    :func:`fast_bf16`, else "32-true"; anything else as it is."""
    if str(value) == "auto":
        return "bf16-mixed" if fast_bf16(accelerator) else "32-true"
    return "32-true" if str(value) in ("32", "32-true") else str(value)


def _precision(cfg: Any) -> str:
    """The resolved precision; said on the console when it was "auto"."""
    precision = resolve_precision(cfg.precision, cfg.accelerator)
    if str(cfg.precision) == "auto" and is_launch_rank_zero():
        print(f"precision auto: {precision} ({'fast' if precision == 'bf16-mixed' else 'no fast'} bfloat16 here)")
    return precision


def _attach_logger(trainer: pl.Trainer, logger: Any) -> None:
    """Bind the stage's `StepLogger` to its Trainer (metrics at the optimizer step they follow: its docstring),
    and tag the MLflow run with the precision the Trainer runs in (``trainer_precision``: a tag, not a param,
    because a run resumed on other hardware may differ). Lightning's, not ours: it turns ``16-mixed`` on a CPU
    into ``bf16-mixed`` (float16 autocast is a GPU feature) with a warning."""
    if isinstance(logger, StepLogger):
        logger.trainer = trainer
    if isinstance(logger, MLFlowLogger):
        logger.experiment.set_tag(logger.run_id, "trainer_precision", trainer.precision)


def _under_srun() -> bool:
    """Whether srun started this process as one of the run's tasks, as Lightning decides it (SLURM_NTASKS set, a job
    name other than 'bash' or 'interactive'), and no torchrun inside it: torchrun's environment comes first in
    Lightning's own choice (``srun torchrun ...``: one task per node, torchrun starts its processes)."""
    from pytorch_lightning.plugins import environments

    return environments.SLURMEnvironment.detect() and not environments.TorchElasticEnvironment.detect()


def _slurm_without_requeue() -> dict[str, Any]:
    """Under SLURM (:func:`_under_srun`), Lightning's cluster environment with its own requeue turned off (else
    nothing). Passed as a plugin, it replaces Lightning's choice, so not under torchrun: there it gave every torchrun
    worker of a node the node's one SLURM task's rank.

    Lightning's default there saves hpc_ckpt_N.ckpt on SIGUSR1 at whatever step it arrives and requeues the job
    itself; that file, preferred on restart when there is no last.ckpt, breaks exact resume (its step is off the
    segment grid) and opens a second MLflow run. Our last.ckpt and sbatch's --requeue already resume a job.
    """
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    return {"plugins": [SLURMEnvironment(auto_requeue=False)]} if _under_srun() else {}


#: Set once this process receives SIGTERM while a Trainer trains (:class:`NoteSigterm`); read by ``cli.run_stage``.
SIGTERM_RECEIVED = threading.Event()


class NoteSigterm(Callback):
    """Record that SIGTERM arrived, before Lightning's own handler runs.

    Lightning answers SIGTERM by broadcasting it from rank 0 inside the signal handler, then stopping every rank at a
    batch's end with its SIGTERMException, which ``cli.run_stage`` turns into exit 143 and "run it again to resume".
    When a scheduler's preemption (SLURM, Kubernetes) signals every rank at once, a rank may instead fail in a
    collective whose peer has already left (gloo: "Connection closed by peer"), and would exit 1 with that traceback.
    This flag lets ``run_stage`` say what happened there too. Wrapped around Lightning's handler once it is installed
    (after ``on_fit_start``); Lightning puts the handler it found back when training ends, which drops this wrapper.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous) or threading.current_thread() is not threading.main_thread():
            return  # no Python handler to wrap (Lightning installs one in the main thread only)

        def note(signum: int, frame: Any) -> None:
            SIGTERM_RECEIVED.set()
            previous(signum, frame)

        signal.signal(signal.SIGTERM, note)


def build_trainer(
    cfg: Any,
    *,
    callbacks: Sequence[Callback],
    logger: Any,
    manual_optimization: bool = False,
    default_root_dir: str | Path | None = None,
    loss_curve: str | Path | None = None,
    **overrides: Any,
) -> pl.Trainer:
    """A Lightning Trainer from the shared training fields (``diffusion.stage_configs.TrainerFields``).

    Step-based: ``max_steps`` ends training, validation runs every ``val_every_n_steps`` batches across
    epochs (``check_val_every_n_epoch=None``, as streaming loaders need). ``use_distributed_sampler=False``:
    the WebDataset loader splits data across ranks itself (pitfall 1).

    Args:
        cfg: a config with the TrainerFields (precision, devices, num_nodes, strategy, accelerator,
            max_steps, log_every_n_steps, val_every_n_steps, accumulate_grad_batches, gradient_clip_val).
        callbacks, logger: passed through (``logger=False`` disables logging).
        manual_optimization: the system steps its optimizers itself; then Lightning refuses accumulation
            and clipping flags (pitfall 13), so they must be at their defaults.
        default_root_dir: where Lightning puts anything without an explicit path (the run folder).
        loss_curve: the loss curve's CSV, written by the `StepMeans` put first among the callbacks (None: none).
        overrides: any other ``pl.Trainer`` argument, e.g. ``limit_val_batches``.
    """
    accumulate, clip = cfg.accumulate_grad_batches, cfg.gradient_clip_val
    if manual_optimization and (accumulate != 1 or clip):
        key = "accumulate_grad_batches" if accumulate != 1 else "gradient_clip_val"
        raise ConfigError(
            f"{key}: Lightning's manual optimization (the GAN's two optimizers) cannot accumulate or clip gradients; "
            f"got accumulate_grad_batches={accumulate}, gradient_clip_val={clip}"
        )
    kwargs: dict[str, Any] = dict(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=_precision(cfg),
        max_steps=cfg.max_steps,
        max_epochs=-1,
        log_every_n_steps=cfg.log_every_n_steps,
        val_check_interval=cfg.val_every_n_steps,
        check_val_every_n_epoch=None,
        callbacks=[StepMeans(cfg.log_every_n_steps, loss_curve), *callbacks,
                   LossBar(refresh_rate=cfg.log_every_n_steps), NoteSigterm()],
        logger=logger,
        enable_progress_bar=True,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=str(default_root_dir) if default_root_dir else None,
    )
    if not manual_optimization:
        kwargs.update(accumulate_grad_batches=accumulate, gradient_clip_val=clip)
    kwargs.update(_slurm_without_requeue())
    kwargs.update(overrides)
    trainer = pl.Trainer(**kwargs)
    _attach_logger(trainer, logger)
    return trainer
