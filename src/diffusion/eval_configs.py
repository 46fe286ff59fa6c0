"""The configuration of the evaluation stages, train_judge and evaluate (sections ``train_judge`` and
``evaluate`` of ``params.yaml``); the other stages' are :mod:`diffusion.stage_configs`, which lists every
stage's config in ``STAGE_CONFIGS``."""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Literal

from diffusion.config import Config, ConfigError, param
from diffusion.data.locations import URL_HELP

#: The samplers a config can name: the keys of ``diffusion.samplers.SAMPLERS`` (a test keeps the two equal).
#: Here, not in samplers.py, because the configs are read without importing torch (``cli.py <stage> --help``).
#: Fields typed with it carry ``noqa: RUF009``: ruff does not see through the alias that the default is immutable.
SamplerName = Literal["ddpm", "ddim", "dpmpp", "euler", "euler_a", "heun"]


@dataclasses.dataclass(frozen=True)
class JudgeConfig(Config):
    """Stage `train_judge`: real train shards -> the attribute classifier that scores prompt adherence.

    Its own cached stage, so a change to the diffusion model (or to evaluate's settings) never retrains it.
    """

    section: ClassVar[str] = "train_judge"

    shards_dir: str = param("data/shards", "image shards from the shard stage: <shards_dir>/{train,val}/*.tar, manifest.json"
                                + URL_HELP)
    out_dir: str = param("models/judge", "where the judge goes: model.pt, config.json (architecture and vocabulary)")
    metrics_path: str = param("metrics/judge.json", "its accuracy on the real val images, for `dvc metrics show`")
    steps: int = param(400, "AdamW steps (warm-up, then cosine decay to zero)", ge=1)
    batch_size: int = param(64, "images per step, drawn with replacement", ge=1)
    lr: float = param(3e-3, "peak learning rate", gt=0.0)
    weight_decay: float = param(1e-4, "AdamW decoupled weight decay (not on biases and norms)", ge=0.0)
    warmup_steps: int = param(30, "linear learning-rate warm-up steps", ge=0)
    channels: tuple[int, ...] = param((16, 32, 64, 128), "widths of the conv blocks; each halves the side until it is 4", ge=1)
    feature_dim: int = param(128, "width of the penultimate layer (the features of the judge's Fréchet distance)", ge=2)
    max_train_images: int | None = param(
        50000, "train images held in memory (uint8): a seeded, uniform choice when the split has more (null: all). "
        "A fit draws steps x batch_size of them", ge=1,
    )
    max_val_images: int | None = param(
        10000, "val images its accuracy is measured on: a seeded, uniform choice when there are more (null: all)", ge=1,
    )
    blur_sigma_max: float = param(
        0.0, "train on copies blurred by a Gaussian of random sigma up to this (px), so soft generated edges "
        "are read by their shape, not penalised for softness", ge=0.0
    )
    noise_std: float = param(0.0, "and with this much added Gaussian noise (images in [-1, 1])", ge=0.0)
    seed: int = param(0, "seed of the weights and the batch order (the fit is deterministic on the CPU)", ge=0)


@dataclasses.dataclass(frozen=True)
class SweepEntry(Config):
    """One sampler setting of evaluate's sweep."""

    sampler: SamplerName = param("dpmpp", "the sampler (diffusion.samplers.SAMPLERS)")  # noqa: RUF009
    steps: int | None = param(20, "denoising steps (null: every training timestep, the full DDPM chain)", ge=1)
    guidance: float = param(4.0, "classifier-free guidance scale (1: none)", ge=0.0)

    def label(self) -> str:
        return f"{self.sampler}-{'all' if self.steps is None else self.steps}-g{self.guidance:g}"


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(Config):
    """Stage `evaluate`: the EMA model + the judge + real val images -> adherence, FID/KID, FD, a grid, a sweep.

    Prompts are the val set's own captions by default (``prompts: caption``): the generated set then has the
    real val images' attribute distribution and phrasing, so FID/KID compare like with like, and adherence
    tests the phrasings the model was trained on. ``canonical`` uses one fixed phrasing per attribute set.
    """

    section: ClassVar[str] = "evaluate"

    model_dir: str = param("models/diffusion", "the EMA model from train (config.json, model.pt, tokenizer.json)")
    judge_dir: str = param("models/judge", "the judge from train_judge")
    shards_dir: str = param("data/shards", "real images: <shards_dir>/val/*.tar (prompts, FID reference, judge ceiling)"
                                + URL_HELP)
    metrics_path: str = param("metrics/eval.json", "flat figures for `dvc metrics show`")
    sweep_path: str = param("plots/eval_sweep.csv", "the sweep table (one row per setting) for `dvc plots show`")
    samples_path: str = param("reports/samples.png", "the grid: one column per grid prompt, one row per seed")
    prompts: Literal["caption", "canonical"] = param(
        "caption", "val prompts: the val captions, or canonical captions of the val attributes"
    )
    num_samples: int = param(500, "val prompts (a seeded choice; all if fewer) generated for the main setting", ge=2)
    sampler: SamplerName = param("dpmpp", "sampler of the main setting")  # noqa: RUF009
    steps: int | None = param(20, "sampler steps of the main setting (null: every training timestep)", ge=1)
    guidance: float = param(4.0, "classifier-free guidance of the main setting", ge=0.0)
    batch_size: int = param(50, "images generated per batch (ddim, dpmpp, euler and heun draw the same images at any "
                                "batch size; ddpm and euler_a, which draw noise at every step, do not)", ge=1)
    seed: int = param(0, "seed of the prompt choice and of the sampling noise", ge=0)
    fid: bool = param(True, "compute Inception FID/KID for the main setting (~95 ms per image on 2 CPU cores)")
    fid_batch_size: int = param(16, "images per Inception forward pass", ge=1)
    fid_cache_dir: str | None = param(
        "data/fid_cache", "where the real images' Inception features are kept, by content, for the next run "
        "against the same images (null: recomputed every run)"
    )
    kid_subsets: int = param(100, "KID: random subsets averaged (Binkowski et al. 2018)", ge=1)
    kid_subset_size: int = param(1000, "KID: images per subset (capped at half the sample count)", ge=2)
    sweep: tuple[SweepEntry, ...] = param(
        (SweepEntry("ddim", 50, 4.0), SweepEntry("dpmpp", 20, 4.0), SweepEntry("dpmpp", 10, 4.0),
         SweepEntry("dpmpp", 20, 1.0), SweepEntry("dpmpp", 20, 3.0), SweepEntry("dpmpp", 20, 6.0)),
        "sampler settings compared by adherence, judge FD and speed (add {sampler: ddpm, steps: null} for the full chain)",
    )
    sweep_samples: int = param(200, "prompts per sweep setting (the first of the main setting's prompts)", ge=2)
    grid_prompts: tuple[str, ...] = param(
        ("a red circle in the top left", "a large blue square in the center", "a small green triangle in the bottom right",
         "a yellow star in the top right", "a purple triangle in the center"),
        "prompts of reports/samples.png, one column each",
    )
    grid_seeds: int = param(4, "rows of reports/samples.png: one seed each", ge=1)
    device: Literal["cpu", "cuda", "auto"] = param("cpu", "where sampling and the judge run ('auto': a GPU if present)")
    register: bool = param(True, "log the pipeline as an MLflow pyfunc model and register it")
    registered_model_name: str = param("diffusion-shapes", "MLflow registered model name")
    registered_model_alias: str = param("candidate", "alias set on the new model version ('latest' is reserved)")

    def __post_init__(self) -> None:
        if not self.grid_prompts:  # the grid is a stage output: with none, the last model's grid stayed in place
            raise ConfigError(f"grid_prompts: empty, but the stage writes {self.samples_path} from them")
        # MLflow's own rules, checked here rather than after sampling and FID, where registering would refuse them.
        alias = self.registered_model_alias
        if not re.fullmatch(r"[A-Za-z0-9_-]+", alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
            raise ConfigError(f"registered_model_alias: expected letters, digits, '_' or '-', not 'latest' and not "
                              f"a version such as 'v1' (MLflow reserves those), got {alias!r}")
        name = self.registered_model_name
        if not name.strip() or any(c in name for c in "/:%"):
            raise ConfigError(f"registered_model_name: expected a non-empty name without '/', ':' or '%', got {name!r}")

    def main_setting(self) -> SweepEntry:
        return SweepEntry(self.sampler, self.steps, self.guidance)
