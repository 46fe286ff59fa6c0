"""The configuration of the data stages, shard and encode_latents: one frozen dataclass per params.yaml section.

As :mod:`diffusion.stage_configs` (the training stages') and :mod:`diffusion.eval_configs` (train_judge's and
evaluate's): each class names its section, and every field carries its help text and bounds
(:func:`diffusion.config.param`), which ``python cli.py <stage> --help`` prints.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from diffusion.config import Config, ConfigError, param
from diffusion.data.locations import URL_HELP


# --------------------------------------------------------------------------------------------------
# Stage: shard
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShapesConfig(Config):
    """The built-in procedural dataset (`diffusion.data.shapes`): coloured shapes with captions."""

    num_train: int = param(10_000, "training images to generate", ge=1)
    num_val: int = param(500, "validation images to generate", ge=1)
    level: Literal["single", "pair"] = param(
        "single", "'single': one object per image; 'pair': two objects and a spatial relation"
    )
    holdout: tuple[str, ...] = param(
        (),
        "attribute combinations kept out of the training split, as 'colour shape' (e.g. 'purple triangle'); "
        "they appear only in val, to measure compositional generalisation",
    )
    holdout_val_fraction: float = param(
        0.2, "fraction of val images drawn from the held-out combinations (when there are any)", ge=0.0, le=1.0
    )


@dataclasses.dataclass(frozen=True)
class ShardConfig(Config):
    """Stage `shard`: a source of images and captions -> WebDataset shards, a tokenizer and a manifest."""

    section: ClassVar[str] = "shard"

    source: Literal["shapes", "folder", "webdataset"] = param(
        "shapes", "'shapes' (built in), 'folder' (your images), or 'webdataset' (existing .tar shards)"
    )
    path: str | None = param(
        None, "the folder ('folder' source), or the tar files as one glob or brace pattern, e.g. "
        "'shards/{00000..00099}.tar' ('webdataset' source)")
    folder_layout: Literal["auto", "metadata", "captions", "classes"] = param(
        "auto",
        "'metadata': metadata.jsonl with file_name/text; 'captions': side-car .txt per image; "
        "'classes': one subfolder per class; 'auto' picks in that order",
    )
    caption_template: str = param("a photo of a {label}", "caption for class-folder images; {label} is the class")
    resolution: int = param(64, "side of the square images written (resized, centre-cropped)", ge=8)
    val_fraction: float = param(
        0.05, "fraction of a user source held out for validation, by a hash of each image's path (not used for "
        "a folder split into train/ and test/: folder_splits)", ge=0.0, lt=1.0)
    # Hugging Face imagefolder datasets come split: hashing their test/ images into either split trains on a
    # held-out set. `ignore` is the way back to one hashed split (a folder merely named `test`, images beside).
    folder_splits: Literal["auto", "ignore"] = param(
        "auto", "'auto': a folder source whose root holds train/ and test/ (or validation/, val/, valid/, dev/) "
        "subfolders is split by them, as Hugging Face datasets are (val_fraction unused); 'ignore': those are "
        "ordinary folders, every image hashed into train or val",
    )
    samples_per_shard: int = param(2_000, "samples in each .tar shard", ge=1)
    image_format: Literal["png", "jpg"] = param("png", "encoding of images in the shards: png (lossless) or jpg")
    workers: int | None = param(
        None, "threads that read, decode and resize a folder's or tars' images and encode the images written "
        "(null: one per CPU core); the shards are the same bytes whatever it is", ge=1,
    )
    seed: int = param(0, "seed for generation and the train/val split", ge=0)
    out_dir: str = param("data/shards", "where {train,val}/*.tar and manifest.json are written")
    tokenizer_path: str = param("data/tokenizer.json", "where the trained tokenizer is written")
    vocab_size: int = param(1_000, "tokenizer vocabulary size (BPE, trained on the train captions)", ge=16)
    max_length: int = param(32, "tokens per caption, begin/end included (longer captions are truncated)", ge=4)
    shapes: ShapesConfig = param(ShapesConfig(), "the built-in dataset's options (source: shapes)")

    def __post_init__(self) -> None:
        if self.source != "shapes" and not self.path:
            raise ConfigError(f"path: required for source {self.source!r} (a folder or tar files)")
        if self.source == "shapes" and self.path:
            # Setting path but forgetting source would otherwise shard the built-in dataset without a word.
            raise ConfigError(f"path: {self.path!r} is set but source is 'shapes', the built-in dataset, which "
                              "reads no files: set source to 'folder' (or 'webdataset') to use it, or path to null")
        if "{label}" not in self.caption_template:
            raise ConfigError(f"caption_template: must contain {{label}}, got {self.caption_template!r}")
        try:
            self.caption_template.format(label="x")
        except (KeyError, IndexError, ValueError) as error:
            raise ConfigError(f"caption_template: only {{label}} may be used in {self.caption_template!r} "
                              f"(write {{{{ and }}}} for literal braces); {type(error).__name__}: {error}") from None


# --------------------------------------------------------------------------------------------------
# Stage: encode_latents
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncodeLatentsConfig(Config):
    """Stage `encode_latents`: image shards + the frozen VAE -> latent shards (posterior mean and log-variance)."""

    section: ClassVar[str] = "encode_latents"

    shards_dir: str = param("data/shards", "the image shards to encode: <shards_dir>/{train,val}/*.tar" + URL_HELP)
    vae_dir: str = param("models/vae", "the trained VAE (weights, config, latent scale/shift), or a model folder from "
                         "train (its VAE: to fine-tune that model on these images, train.init_from)")
    out_dir: str = param("data/latents", "where {train,val}/*.tar and manifest.json are written")
    batch_size: int = param(64, "images per VAE forward pass", ge=1)
    flip: bool = param(
        False, "also encode each train image mirrored left to right, for train.random_flip (twice the train split's "
        "encoding time and latent bytes); the val split as it is")
    samples_per_shard: int | None = param(
        None, "samples per latent shard; null: one latent shard per image shard, same name and size", ge=1
    )
    device: Literal["auto", "cpu", "cuda"] = param(
        "cpu", "where the VAE runs: 'cpu' (byte-identical reruns on one machine), 'cuda', or 'auto' (a GPU if present)"
    )
    checkpoint_dir: str = param(
        "checkpoints/encode_latents", "finished latent shards are kept in <checkpoint_dir>/encode_latents-<key>/ until "
        "the output is complete: a killed run resumes there (samples_per_shard null only)"
    )
