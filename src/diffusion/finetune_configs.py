"""The fine-tuning subsections of the train stage's config, ``train.lora`` and ``train.replay``
(:class:`diffusion.stage_configs.TrainConfig` nests them; ``train.init_from`` names the model they fine-tune)."""

from __future__ import annotations

import dataclasses

from diffusion.config import Config, param


@dataclasses.dataclass(frozen=True)
class LoRAConfig(Config):
    """Fine-tuning with low-rank adapters (LoRA, Hu et al. 2021; diffusers' ``train_text_to_image_lora.py``):
    the model in ``train.init_from`` stays frozen and each targeted layer learns W + (alpha / rank) B A
    (models/lora.py). The exported model has the products merged in: an ordinary model."""

    rank: int = param(0, "the adapters' rank r (4-64 is usual; needs init_from); 0: off, every weight trains", ge=0)
    alpha: float | None = param(None, "the update's scale is alpha / rank (null: alpha = rank, scale 1, as diffusers)",
                                gt=0.0)
    targets: tuple[str, ...] = param(
        ("to_q", "to_kv", "to_qkv", "out"), "the nn.Linear layers adapted, by name or the end of their dotted name "
        "(default: the attention projections, diffusers' choice; also e.g. fc1, fc2, adaLN_modulation.1)")
    text_encoder: bool = param(False, "adapt the text encoder's targets too (false: it stays frozen, as diffusers')")


@dataclasses.dataclass(frozen=True)
class ReplayConfig(Config):
    """Rehearsal while fine-tuning: a share of the training samples drawn from other latents, typically the data
    the ``train.init_from`` model learned from, so that training on new data alone does not make it forget the old
    (catastrophic forgetting, McCloskey & Cohen 1989; the replay of continual learning, and DreamBooth's prior
    preservation, Ruiz et al. 2023, which mixes in images of the model's own class). Mixed sample by sample in the
    loader (data/loader.py)."""

    latents_dir: str | None = param(None, "latent shards to mix in (<latents_dir>/train/*.tar, encoded by the same "
                                    "VAE), e.g. the pipeline's data/latents when fine-tuning on your own; null: none")
    fraction: float = param(0.0, "the share of training samples drawn from replay.latents_dir (0: none)", ge=0.0,
                            lt=1.0)
