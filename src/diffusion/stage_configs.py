"""The configuration of the training stages, train_vae and train: one frozen dataclass per section of ``params.yaml``.

Each class names its section (``section = "train"``), and every field carries its help text and bounds
(:func:`diffusion.config.param`), which ``python cli.py <stage> --help`` prints. How a config is built and
validated is :mod:`diffusion.config`, how params.yaml, profiles and ``-S key=value`` layer is
:mod:`diffusion.params`. Here: the Trainer fields the training stages share, train_vae's and train's sections, and
:data:`STAGE_CONFIGS`, every stage's class by its section; shard's and encode_latents' are in
:mod:`diffusion.data_configs`, train_judge's and evaluate's in :mod:`diffusion.eval_configs`, train's fine-tuning
subsections (``lora``, ``replay``) in :mod:`diffusion.finetune_configs`. Model shapes nest
their own configs (``VAEConfig``, ``UNetConfig``, ``DiTConfig``, ...), which live beside their models and are
imported lazily (see :func:`_model_configs`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar

from diffusion.config import Config, ConfigError, param
from diffusion.data.locations import URL_HELP
from diffusion.data_configs import EncodeLatentsConfig, ShardConfig
from diffusion.eval_configs import EvaluateConfig, JudgeConfig, SamplerName
from diffusion.finetune_configs import LoRAConfig, ReplayConfig

T = TypeVar("T", bound="TrainerFields")

#: The learning-rate schedules after the warm-up (diffusion.training.optim.LR_SCHEDULES, which imports torch; a test
#: keeps the two equal). Named as diffusers' get_scheduler names them; ``constant`` is its ``constant_with_warmup``.
LRSchedule = Literal["cosine", "linear", "constant"]
LR_SCHEDULE_HELP = ("the LR after the linear warm-up: cosine (half a cosine down to lr * min_lr_ratio at max_steps; "
                    "SGDR), linear (a straight line down to it), constant (lr to the end; min_lr_ratio unused)")


# --------------------------------------------------------------------------------------------------
# Training stages: shared Trainer fields; stage: train_vae
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainerFields(Config):
    """Fields every Lightning training stage shares (``diffusion.training.trainer.build_trainer``).

    A stage config inherits them, so they sit flat in its section (``-S train_vae.max_steps=100``).
    """

    seed: int = param(0, "seed of weights, noise and data order (the run is reproducible from it)", ge=0)
    max_steps: int = param(1_000, "optimizer steps to train for (training ends there)", ge=1)
    precision: Literal[32, "32", "bf16-mixed", "16-mixed", "auto"] = param(
        32, "32 (float32), 'bf16-mixed' (autocast to bfloat16, weights float32), '16-mixed' (float16 with a "
        "loss scaler; prefer bf16, whose float32 range cannot overflow), or 'auto': bf16-mixed where the hardware runs bfloat16 "
        "fast (a CUDA GPU that supports it, a CPU with AMX), else 32"
    )
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = param("auto", "Lightning accelerator")
    devices: int | Literal["auto"] = param(1, "devices per node (-1 or 'auto': all)", ge=-1)
    num_nodes: int = param(1, "machines (launched by torchrun or SLURM)", ge=1)
    # Not ddp_spawn: its worker processes hand back the weights but not the loop's step count or the callbacks'
    # state, which the stages export (steps, the loss curve, the last losses).
    strategy: Literal["auto", "ddp", "ddp_find_unused_parameters_true", "fsdp"] = param(
        "auto", "Lightning distribution strategy (DDP for several devices; FSDP needs GPUs, cannot clip gradients by "
        "norm, and the train stage refuses it: its EMA cannot average sharded weights)"
    )
    accumulate_grad_batches: int = param(1, "batches whose gradients are averaged per optimizer step", ge=1)
    gradient_clip_val: float | None = param(None, "clip the gradient norm to this (null: no clipping)", gt=0)
    num_workers: int = param(0, "data-loading worker processes per device (0: in the main process)", ge=0)
    log_every_n_steps: int = param(10, "log training metrics every N steps (Lightning's default 50 hides short runs)", ge=1)
    val_every_n_steps: int = param(
        250, "validate every N training batches (train_vae: PSNR, SSIM) or optimizer steps (train: the EMA weights' "
        "held-out and seen loss, train.val_batches; also after the last step)", ge=1)
    checkpoint_every_n_steps: int = param(
        100, "save <checkpoint_dir>/<stage>-<key>/last.ckpt every N steps; also the length of the seeded segments "
        "of data and noise that make a resumed run end as an uninterrupted one (so a change starts afresh)", ge=1)
    checkpoint_dir: str = param(
        "checkpoints", "resumable checkpoints, one folder per parameter set (kept across runs; not a DVC output)"
    )

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str | None = None) -> T:
        _model_configs()  # the stages' nested model configs, for their annotations (see _model_configs)
        return super().from_dict(data, prefix)

    def __post_init__(self) -> None:
        if self.devices == 0:
            raise ConfigError("devices: expected -1, 'auto' or at least 1, got 0")
        if self.strategy == "fsdp" and self.gradient_clip_val is not None:
            raise ConfigError(
                "gradient_clip_val: Lightning cannot clip gradients by norm under strategy 'fsdp' "
                "(its shards hold parts of each tensor); set it to null or use ddp"
            )


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig(Config):
    """The optional PatchGAN of the VAE's adversarial loss (VQGAN, Esser et al. 2021; LDM's first stage)."""

    enabled: bool = param(False, "train with the adversarial loss (needs manual optimization: no accumulation or clipping)")
    start_step: int = param(1_000, "step from which the discriminator trains and its loss counts", ge=0)
    weight: float = param(0.5, "factor on the adaptively weighted generator loss (LDM's disc_weight)", ge=0.0)
    loss: Literal["hinge", "vanilla"] = param("hinge", "discriminator loss: 'hinge' (LDM) or 'vanilla' (softplus)")
    num_layers: int = param(3, "stride-2 conv layers (images must be at least 3 * 2**num_layers px)", ge=1, le=6)
    channels: int = param(64, "width of the first discriminator layer", ge=1)
    lr: float | None = param(None, "discriminator learning rate (null: the autoencoder's)", gt=0.0)


def _model_configs() -> None:
    """Put the model configs that the training stages nest (``VAEConfig``, ``TextEncoderConfig``, ``UNetConfig``,
    ``DiTConfig``, ``SchedulerConfig``) into this module's namespace.

    They live beside their models, whose modules import torch, which a command line call such as
    ``cli.py shard --help`` should not pay for. So they are imported on first use: just before a training
    config is built, for ``typing.get_type_hints``, which resolves the string annotations (``model: VAEConfig``)
    in this module's namespace.
    """
    from diffusion.models.dit import DiTConfig
    from diffusion.models.text_encoder import TextEncoderConfig
    from diffusion.models.unet import UNetConfig
    from diffusion.models.vae import VAEConfig
    from diffusion.scheduler import SchedulerConfig

    globals().update(VAEConfig=VAEConfig, TextEncoderConfig=TextEncoderConfig, UNetConfig=UNetConfig,
                     DiTConfig=DiTConfig, SchedulerConfig=SchedulerConfig)


def _nested(name: str, help: str) -> Any:
    """A nested model-config field whose class is imported on first use (:func:`_model_configs`)."""

    def factory() -> Config:
        _model_configs()
        return globals()[name]()

    return dataclasses.field(default_factory=factory, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainVAEConfig(TrainerFields):
    """Stage `train_vae`: image shards -> the KL autoencoder, its latent scale and shift, ``models/vae/``."""

    section: ClassVar[str] = "train_vae"

    shards_dir: str = param("data/shards", "image shards from the shard stage: <shards_dir>/{train,val}/*.tar" + URL_HELP)
    tokenizer_path: str = param("data/tokenizer.json", "the shard stage's tokenizer (the loader encodes captions)")
    out_dir: str = param("models/vae", "where the VAE artifact goes: model.pt, config.json (with latent scale/shift)")
    metrics_path: str = param("metrics/vae.json", "final metrics for `dvc metrics show`")
    model: VAEConfig = _nested("VAEConfig", "the autoencoder's shape (diffusion.models.vae.VAEConfig)")  # noqa: F821
    batch_size: int = param(16, "images per batch per device", ge=1)
    lr: float = param(2e-4, "peak learning rate (AdamW)", gt=0.0)
    beta1: float = param(0.5, "AdamW beta1 (LDM/VQGAN use 0.5)", ge=0.0, lt=1.0)
    beta2: float = param(0.9, "AdamW beta2 (LDM/VQGAN use 0.9)", ge=0.0, lt=1.0)
    weight_decay: float = param(0.0, "AdamW decoupled weight decay", ge=0.0)
    warmup_steps: int = param(100, "linear learning-rate warm-up steps, then lr_schedule", ge=0)
    lr_schedule: LRSchedule = param("cosine", LR_SCHEDULE_HELP)  # noqa: RUF009
    min_lr_ratio: float | None = param(
        None, "lr_schedule cosine or linear decay to lr * min_lr_ratio at max_steps, which settles a short run's "
        "weights (the CPU profile); null: no decay, a constant LR after warm-up whatever lr_schedule (as 1.0; "
        "LDM's schedule, which lr_schedule: constant also names)", ge=0.0, le=1.0
    )
    l1_weight: float = param(1.0, "weight of the L1 reconstruction loss (mean over pixels)", ge=0.0)
    mse_weight: float = param(0.0, "weight of the squared-error reconstruction loss (mean over pixels)", ge=0.0)
    kl_weight: float = param(
        1e-6, "weight of KL(q(z|x) || N(0, I)) per pixel value; LDM's 1e-6 keeps detail (larger blurs)", ge=0.0
    )
    discriminator: DiscriminatorConfig = param(DiscriminatorConfig(), "the optional adversarial loss")
    shuffle_buffer: int = param(1_000, "samples in the loader's shuffle buffer", ge=0)
    val_batches: int = param(
        4, "validation batches for PSNR, SSIM and the grid: a seeded, uniform choice of the val images", ge=1
    )
    grid_images: int = param(8, "originals shown beside their reconstructions in the MLflow grid", ge=1)
    scale_batches: int = param(
        50, "train batches over which the latent scale and shift are measured (Rombach et al. 2022, sec. 4.3.2): a "
        "seeded, uniform choice of the train images", ge=1
    )
    checkpoint_dir: str = param(
        "checkpoints/train_vae", "resumable checkpoints, one folder per parameter set (kept across runs; not a DVC output)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l1_weight == 0.0 and self.mse_weight == 0.0:
            raise ConfigError("l1_weight: l1_weight and mse_weight are both 0; nothing would train the decoder")
        if self.model.in_channels != 3:  # the shard stage stores every image as RGB
            raise ConfigError(f"model.in_channels: the shards hold RGB images (3 channels), got {self.model.in_channels}")
        if self.discriminator.enabled:
            # GAN training steps two optimizers by hand; Lightning refuses these flags then (pitfall 13).
            if self.accumulate_grad_batches != 1:
                raise ConfigError(
                    f"accumulate_grad_batches: must be 1 with discriminator.enabled (manual optimization cannot "
                    f"accumulate gradients), got {self.accumulate_grad_batches}"
                )
            if self.gradient_clip_val is not None:
                raise ConfigError(
                    f"gradient_clip_val: must be null with discriminator.enabled (manual optimization cannot "
                    f"clip gradients), got {self.gradient_clip_val}"
                )
            several = self.devices != 1 or self.num_nodes > 1  # 'auto' and -1 may mean several
            if self.strategy == "ddp" or (self.strategy == "auto" and several):
                # The generator's backward leaves the discriminator's parameters without gradients (and the
                # other way round), which plain DDP (also what 'auto' picks for several devices) refuses on the
                # first step.
                raise ConfigError(
                    f"strategy: {self.strategy!r} with discriminator.enabled and devices {self.devices!r}, num_nodes "
                    f"{self.num_nodes} fails on the first step (each optimizer's backward leaves the other network's "
                    "parameters unused); use 'ddp_find_unused_parameters_true'"
                )


# --------------------------------------------------------------------------------------------------
# Stage: train (the denoiser and the text encoder)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig(TrainerFields):
    """Stage `train`: latent shards + tokenizer + VAE -> the text encoder and denoiser, ``models/diffusion/``.

    The denoiser's input channels and context width, and the text encoder's vocabulary and length, are not
    parameters: they follow from the VAE and the tokenizer, which the stage reads.
    """

    section: ClassVar[str] = "train"

    latents_dir: str = param("data/latents", "latent shards from encode_latents: <latents_dir>/{train,val}/*.tar" + URL_HELP)
    tokenizer_path: str = param("data/tokenizer.json", "the shard stage's tokenizer")
    vae_dir: str = param("models/vae", "the VAE from train_vae (decodes samples; its latent scale and shift), or a "
                         "model folder from train (its VAE: fine-tuning it, train.init_from)")
    out_dir: str = param("models/diffusion", "where the EMA weights, the config and the tokenizer are exported")
    metrics_path: str = param("metrics/train.json", "final figures for `dvc metrics show`")
    loss_curve_path: str = param("plots/train_loss.csv", "the loss curve (step, loss) for `dvc plots show`")
    val_curve_path: str = param(
        "plots/val_loss.csv", "the validation curve for `dvc plots show`: step, loss, seen_loss and the loss in each "
        "quarter of the timesteps (training/val_loss.py)")
    init_from: str | None = param(
        None, "fine-tune: a model folder the train stage wrote (e.g. an earlier run's models/diffusion) whose text "
        "encoder and denoiser weights this run starts from (fresh optimizer, schedule and EMA); its tokenizer, VAE and "
        "architecture must be this run's, checked before any work (training/init_from.py). null: random weights")
    lora: LoRAConfig = param(LoRAConfig(), "fine-tune with low-rank adapters (LoRA) instead of every weight")
    replay: ReplayConfig = param(ReplayConfig(), "mix a share of other latents (the old data) into training")
    denoising_type: str = param("unet", "the denoiser: a key of diffusion.models.DENOISERS ('unet', 'dit', ...)")
    text_encoder: TextEncoderConfig = _nested("TextEncoderConfig", "the text encoder's shape")  # noqa: F821
    unet: UNetConfig = _nested("UNetConfig", "the U-Net's shape (denoising_type: unet)")  # noqa: F821
    dit: DiTConfig = _nested("DiTConfig", "the DiT's shape (denoising_type: dit)")  # noqa: F821
    dit_preset: str | None = param(
        None, "a DiT preset ('DiT-S/2' ... 'DiT-XL/8'); sets dit.depth, hidden_size, num_heads and patch_size"
    )
    scheduler: SchedulerConfig = _nested("SchedulerConfig", "the noise schedule and prediction type")  # noqa: F821
    batch_size: int = param(32, "latents per batch per device", ge=1)
    lr: float = param(3e-4, "peak learning rate (AdamW)", gt=0.0)
    beta1: float = param(0.9, "AdamW beta1", ge=0.0, lt=1.0)
    beta2: float = param(0.999, "AdamW beta2", ge=0.0, lt=1.0)
    weight_decay: float = param(0.01, "AdamW decoupled weight decay (not on biases and norms)", ge=0.0)
    warmup_steps: int = param(100, "linear warm-up steps, then lr_schedule", ge=0)
    lr_schedule: LRSchedule = param("cosine", LR_SCHEDULE_HELP)  # noqa: RUF009
    min_lr_ratio: float = param(0.1, "lr_schedule cosine or linear ends at lr * min_lr_ratio", ge=0.0, le=1.0)
    ema_decay: float = param(0.999, "EMA decay per optimizer step (the exported and sampled weights)", ge=0.0, lt=1.0)
    ema_warmup: bool = param(True, "warm the EMA decay up as diffusers' EMAModel: update n uses min(ema_decay, "
                                   "(1 + n) / (10 + n)); false: ema_decay from the first update")
    caption_dropout: float = param(
        0.1, "probability a caption is replaced by the null caption at load time (classifier-free guidance)",
        ge=0.0, le=1.0,
    )
    min_snr_gamma: float | None = param(None, "Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is usual; null: off)", gt=0.0)
    min_snr_on: Literal["snr", "snr_plus_one"] = param(
        "snr", "what Min-SNR caps: snr (the paper: z_0 weight min(SNR, gamma)) | snr_plus_one (min(SNR + 1, gamma): "
        "weight 1 at high noise, where layout is decided; see diffusion_system)"
    )
    noise_offset: float = param(
        0.0, "offset noise (Guttenberg 2023; diffusers' --noise_offset, 0.05-0.1 usual): eps + noise_offset * n, n one "
        "constant per sample and channel, so the model learns to change a whole image's tone; 0: off", ge=0.0)
    input_perturbation: float = param(
        0.0, "input perturbation (Ning et al. 2023; diffusers' --input_perturbation, 0.1 usual): z_t made from "
        "eps + gamma * xi while the target is eps, against exposure bias; 0: off", ge=0.0)
    random_flip: bool = param(
        False, "mirror half the samples left to right (diffusers' --random_flip): the latents must be encoded with "
        "encode_latents.flip, which stores each train image's mirrored posterior too")
    flip_swaps: tuple[tuple[str, str], ...] = param(
        (), "word pairs a mirrored sample's caption swaps, e.g. [['left', 'right']] where captions say which side")
    shuffle_buffer: int = param(2_000, "samples in the loader's shuffle buffer", ge=0)
    val_batches: int = param(
        4, "batches (of batch_size) of held-out latents the validation loss is measured on, every val_every_n_steps "
        "with the EMA weights, beside as many train latents (seen_loss): a seeded, uniform choice of the val split, "
        "fixed timesteps and noise (training/val_loss.py); the whole split if it is smaller (warned under one batch). "
        "0: no validation", ge=0)
    sample_every_n_steps: int = param(500, "log a grid of samples for sample_prompts every N steps (0: only the final grid; sample_prompts [] for none)", ge=0)
    sample_prompts: tuple[str, ...] = param(
        ("a red circle in the top left", "a large blue square in the center", "a small green triangle in the bottom right",
         "a yellow star in the top right"),
        "fixed prompts of the sample grids",
    )
    sample_sampler: SamplerName = param("dpmpp", "sampler of the grids")  # noqa: RUF009
    sample_steps: int = param(20, "sampler steps of the grids", ge=1)
    sample_guidance: float = param(4.0, "classifier-free guidance scale of the grids", ge=0.0)
    checkpoint_dir: str = param(
        "checkpoints/train", "resumable checkpoints, one folder per parameter set (kept across runs; not a DVC output)"
    )
    compile: bool = param(
        False, "torch.compile the denoiser's training forward (faster steps on a GPU after a compile of about a "
        "minute; docs/performance.md)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from diffusion.models import DENOISERS, DIT_PRESETS

        if self.denoising_type not in DENOISERS:
            raise ConfigError(f"denoising_type: expected one of {', '.join(map(repr, DENOISERS))}, got {self.denoising_type!r}")
        if self.strategy == "fsdp":
            # Lightning's WeightAveraging copies the unsharded module before FSDP wraps it, then averages the
            # wrapped module's parameters, which are this rank's shard of each tensor ("sharded models do not
            # work with weight averaging", its docs): the EMA this stage exports cannot be made that way.
            raise ConfigError("strategy: 'fsdp' shards the weights, and the EMA (ema_decay), which this stage "
                              "samples with and exports, cannot average sharded weights; use 'ddp'")
        if self.dit_preset is not None and self.dit_preset not in DIT_PRESETS:
            raise ConfigError(f"dit_preset: expected one of {', '.join(DIT_PRESETS)} or null, got {self.dit_preset!r}")
        if self.dit_preset is not None:
            # Resolved here, so that `dit` (what to_dict() logs to MLflow and keys checkpoints by) holds the
            # sizes that build the network rather than the section's values that the preset replaces.
            object.__setattr__(self, "dit", self.dit.replace(**DIT_PRESETS[self.dit_preset]))
        if not self.sample_prompts and self.sample_every_n_steps:
            raise ConfigError("sample_prompts: empty, but sample_every_n_steps asks for sample grids")
        if self.min_snr_gamma is not None and self.min_snr_on == "snr_plus_one" and \
                self.scheduler.prediction_type == "epsilon":
            raise ConfigError("min_snr_on: 'snr_plus_one' needs scheduler.prediction_type 'v_prediction' or "
                              "'sample'; with 'epsilon' its weight min(SNR + 1, gamma) / SNR is unbounded at high noise")
        if self.sample_steps > self.scheduler.num_timesteps:
            raise ConfigError(f"sample_steps: at most scheduler.num_timesteps ({self.scheduler.num_timesteps}), "
                              f"got {self.sample_steps}")
        if self.lora.rank and self.init_from is None:
            raise ConfigError("lora.rank: LoRA adapts a trained model, and train.init_from is null; name the model "
                              "to fine-tune (train.init_from) or set train.lora.rank to 0")
        if (self.replay.fraction > 0) != (self.replay.latents_dir is not None):
            raise ConfigError(f"replay: latents_dir {self.replay.latents_dir!r} with fraction {self.replay.fraction}: "
                              "set both (a folder and a share above 0) or neither")
        words = [w for pair in self.flip_swaps for w in pair]
        if any(not w or a == b for a, b in self.flip_swaps for w in (a, b)) or len(set(words)) < len(words):
            raise ConfigError(f"flip_swaps: expected pairs of two different words, each word in one pair only, got "
                              f"{[list(p) for p in self.flip_swaps]}")
        if self.denoising_type == "dit" and self.dit.learn_sigma:
            raise ConfigError("dit.learn_sigma: the training loss has no variance term (DiT's L_vlb); set it false")

    @classmethod
    def check_explicit(cls, data: Mapping[str, Any], explicit: Mapping[str, str]) -> None:
        """A DiT preset sets the DiT's sizes over the section's: one that a profile or an override also set
        would be replaced without a word (``-S profile=gpu -S train.dit.depth=2`` trained 12 blocks). Refused,
        unless it is the preset's own value."""
        from diffusion.models import DIT_PRESETS

        name = data.get("dit_preset")
        preset = DIT_PRESETS.get(name) if isinstance(name, str) else None  # an unknown one: from_dict says so
        dit = data.get("dit") if isinstance(data.get("dit"), Mapping) else {}
        for key, source in explicit.items():
            field = key.removeprefix("dit.")
            if preset and key.startswith("dit.") and field in preset and dit.get(field) != preset[field]:
                raise ConfigError(f"{cls.section}.{key}: set by {source}, but dit_preset {name} sets the DiT's "
                                  f"{', '.join(preset)} ({field} {preset[field]}); set {cls.section}.dit_preset=null "
                                  "to choose them yourself")

    def denoiser_config(self) -> Config:
        """The chosen denoiser's config, with the DiT preset applied."""
        if self.denoising_type == "dit" and self.dit_preset:
            from diffusion.models import DIT_PRESETS

            return self.dit.replace(**DIT_PRESETS[self.dit_preset])
        return getattr(self, self.denoising_type)


#: Every stage's config class by its params.yaml section, in pipeline order.
STAGE_CONFIGS: dict[str, type[Config]] = {
    cls.section: cls for cls in (ShardConfig, EncodeLatentsConfig, TrainVAEConfig, TrainConfig, JudgeConfig, EvaluateConfig)
}


def check_every_section(path: Any, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Load every stage section present in the params file (profile and overrides applied): a mistake in any of
    them, in params.yaml or in the profile's file, stops whichever stage runs first, before it works, rather than
    the stage that reads it, hours into a pipeline. Raises the ConfigError of the first bad section."""
    from diffusion.params import load_params, load_section

    present = load_params(path, overrides)
    for section, cls in STAGE_CONFIGS.items():
        if section in present:
            load_section(cls, path, overrides)
