"""Stage `train_judge`: the attribute classifier that `evaluate` reads the generated images with.

`train_judge` (``diffusion.eval_configs.JudgeConfig``) fits the attribute classifier (``evaluation/judge.py``) on
the real train shards and writes ``<out_dir>/`` (weights, config, vocabulary) and ``<metrics_path>`` (its
accuracy on the real val images: the ceiling of prompt adherence). It is its own cached DVC stage, so a new
diffusion model never retrains it. Data without attributes gets an empty judge (``vocab: {}``): evaluate
then reports FID/KID only, and says so.

Outputs are written to a temporary folder beside ``out_dir`` and renamed into place at the end, so a failed
run leaves the previous judge whole. Seeded: the same shards, params and seed give the same judge.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from diffusion.data.locations import read_manifest, require_split
from diffusion.atomic import atomic_write_json, check_replaceable, staged_dir
from diffusion.data.in_memory import load_split
from diffusion.eval_configs import JudgeConfig
from diffusion.tracking import is_finite_number

STAGE = "train_judge"


class TrainJudgeError(RuntimeError):
    """An input of train_judge (the image shards) is missing; nothing was written."""


def _inputs(cfg: JudgeConfig) -> tuple[list[str], list[str]]:
    """The train and val image shards, checked before any work (and the output folder: check_replaceable)."""
    check_replaceable(cfg.out_dir, ("config.json", "model.pt"), "train_judge.out_dir")
    return tuple(require_split(cfg.shards_dir, split, "train_judge.shards_dir", "shard", TrainJudgeError)
                 for split in ("train", "val"))


def run(cfg: JudgeConfig) -> dict[str, Any]:
    """Fit the judge on the real train images, score it on the real val images, write both outputs."""
    from diffusion.evaluation.judge import JudgeTrainSettings, accuracy, build_vocab, train_judge

    train_urls, val_urls = _inputs(cfg)
    start = time.perf_counter()
    train = load_split(train_urls, limit=cfg.max_train_images, seed=cfg.seed)
    vocab = build_vocab((read_manifest(cfg.shards_dir) or {}).get("attributes"), train.attributes)
    # Written beside out_dir and swapped in whole (atomic.staged_dir): a failed or stopped run leaves the
    # previous judge, never a config without its weights.
    with staged_dir(cfg.out_dir) as tmp:
        if not vocab or len(train) == 0:
            print("train_judge: the shards carry no attributes; evaluate will report FID/KID only")
            atomic_write_json(tmp / "config.json", {"vocab": {}, "reason": "no attributes in the train shards"})
            metrics: dict[str, Any] = {"attributes": 0, "train_images": 0}
        else:
            print(f"train_judge: {len(train)} train images, attributes {', '.join(vocab)}; {cfg.steps} steps")
            settings = JudgeTrainSettings(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                                          weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, seed=cfg.seed,
                                          channels=cfg.channels, feature_dim=cfg.feature_dim,
                                          blur_sigma_max=cfg.blur_sigma_max, noise_std=cfg.noise_std)
            judge, losses = train_judge(train, vocab, settings)
            val = load_split(val_urls, limit=cfg.max_val_images, seed=cfg.seed)
            scores = accuracy(judge, val) if len(val) else {}
            judge.save(tmp)
            tail = losses[-20:]
            metrics = {"attributes": len(vocab), "train_images": len(train), "val_images": len(val),
                       "final_loss": sum(tail) / len(tail), **{f"val_{k}": v for k, v in scores.items()}}
    metrics["train_seconds"] = round(time.perf_counter() - start, 1)
    Path(cfg.metrics_path).parent.mkdir(parents=True, exist_ok=True)
    # An attribute no val image names has no accuracy (NaN), which JSON cannot hold: left out, as evaluate does.
    atomic_write_json(cfg.metrics_path, {k: v for k, v in metrics.items() if is_finite_number(v)})
    return metrics


def main(cfg: JudgeConfig) -> dict[str, Any]:
    """The DVC stage `train_judge`, in its own MLflow run."""
    import mlflow

    from diffusion.tracking import stage_run

    _inputs(cfg)  # before the MLflow run is opened
    with stage_run(STAGE, cfg.to_dict()) as active:
        metrics = run(cfg)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if is_finite_number(v)})
        if "val_all_correct" in metrics:
            print(f"train_judge: real val accuracy, all attributes correct: {metrics['val_all_correct']:.3f} "
                  f"({', '.join(f'{k[8:]} {v:.3f}' for k, v in metrics.items() if k.startswith('val_acc_'))})")
        print(f"train_judge: judge -> {cfg.out_dir}; metrics -> {cfg.metrics_path}; MLflow run {active.info.run_id}")
    return metrics
