"""The training stages' Lightning logger: MLflow's, with the optimizer step as the metrics' step axis.

Importing it does not import MLflow (Lightning's MLFlowLogger does when it is created): the library keeps
its start-up time.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.loggers import MLFlowLogger

from diffusion.tracking import tracking_uri


class StepLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, logging each metric at the optimizer step it was measured after.

    Lightning hands its loggers the number of optimizer steps taken *before* the current batch (its epoch loop's
    ``_batches_that_stepped``, incremented after the batch's hooks and any validation): the loss of optimizer
    step k, and a validation run after step k, landed at MLflow step k-1, while everything else we write says
    k: the checkpoint (``global_step``), the sample grids (``samples/step_k.png``), the loss curve's CSV and the
    final metrics. A validation at the last step and the final one after the fit then sat at two steps, N-1
    and N, with the same weights. Bound to its Trainer (`build_trainer` does), this logger logs at
    ``trainer.global_step``, the optimizer steps taken when the metric was measured, in all of those places.
    """

    trainer: Any = None  # the pl.Trainer, once bound

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.trainer is not None and step is not None:
            step = self.trainer.global_step
        super().log_metrics(metrics, step)


def mlflow_logger(run_id: str) -> StepLogger:
    """The logger of the stage's MLflow run, with the tracking URI passed explicitly (Lightning's own default,
    ``./mlruns``, is a file store MLflow 3 refuses; :func:`diffusion.tracking.tracking_uri`)."""
    return StepLogger(tracking_uri=tracking_uri(), run_id=run_id, log_model=False)
