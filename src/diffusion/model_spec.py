"""A model folder and the sampling options it allows, read and checked without loading any weights.

Sampling checks happen in two steps so that a bad request fails before any work (``cli.py sample`` checks
its options before it reads a weight): :class:`ModelSpec` reads only a model folder's JSON files (the model is
built on the ``meta`` device, which allocates no weights) and validates the options against them; then
:class:`~diffusion.pipeline_model.TextToImagePipeline` loads the weights. The folder's files are listed in
``pipeline_model``'s docstring. A pipeline built from parts in memory has no folder to read: :func:`check_components`
checks that the parts fit together instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Files of a model folder, and the stage that writes them (named in errors).
MODEL_FILES = ("config.json", "model.pt", "tokenizer.json", "train_config.json")
TRAIN_HINT = "run `python cli.py train` (or `dvc repro train`) first"


class ModelNotFoundError(FileNotFoundError):
    """The model folder, or a file in it, is missing; the message names the stage that writes it."""


class SampleOptionError(ValueError):
    """A sampling option is out of range. ``option`` is the keyword (``steps``, ``image_size`` ...)."""

    def __init__(self, option: str, detail: str) -> None:
        super().__init__(f"{option}: {detail}")
        self.option, self.detail = option, detail


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelNotFoundError(f"{path} not found: the model folder {path.parent} is incomplete; {TRAIN_HINT}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelNotFoundError(f"{path}: not valid JSON ({e}); the model folder is damaged; {TRAIN_HINT}") from e


def _training_resolution(train_config: dict[str, Any], vae_factor: int) -> int | None:
    """The image side the model was trained at, or None if nothing records it.

    The model folder does not store it (the denoiser is resolution-agnostic), so it is read from, in order:
    an ``image_size`` key the train stage may record in train_config.json, then the latent shards' manifest
    (``<latents_dir>/manifest.json``, its ``latent_shape`` times the VAE factor; paths in params.yaml are
    relative to the project root, where the CLI and the stages run).
    """
    if train_config.get("image_size"):
        return int(train_config["image_size"])
    manifest = Path(train_config.get("latents_dir", "")) / "manifest.json"
    if train_config.get("latents_dir") and manifest.is_file():
        shape = json.loads(manifest.read_text()).get("latent_shape")
        if shape:
            return int(shape[-1]) * vae_factor
    return None


def check_device(device: str | None) -> str:
    """`device` ("cpu", "cuda", "cuda:1" ...; None or "auto": a GPU if there is one), checked before any weights
    are read. Raises SampleOptionError("device") for a name torch does not know or a device this machine lacks."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SampleOptionError("device", f"{device!r} is not a device name (cpu, cuda, cuda:1 ...): {e}") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise SampleOptionError("device", f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        backend = getattr(torch, dev.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise SampleOptionError("device", f"{device!r}: no {dev.type} device is available here")
    return device


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What sampling must know about a model folder, read without loading its weights.

    Attributes:
        model_dir: the folder; None for a pipeline built in memory (:meth:`TextToImagePipeline.from_components`).
        latent_multiple: image sides must be multiples of this (VAE factor times the denoiser's).
        image_size: the training resolution (the default side), None if unknown.
        num_timesteps: T of the noise schedule (the most sampler steps possible).
    """

    model_dir: Path | None
    latent_multiple: int
    image_size: int | None
    num_timesteps: int

    @classmethod
    def read(cls, model_dir: str | Path, image_size: int | None = None) -> ModelSpec:
        """Read `model_dir`'s JSON files. `image_size` overrides the recorded training resolution."""
        import torch

        from diffusion.models import DENOISERS, LatentDiffusionModel

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file() or not (model_dir / "model.pt").is_file():
            raise ModelNotFoundError(
                f"{model_dir}: no trained model (config.json and model.pt). The train stage writes it: {TRAIN_HINT}"
            )
        config = read_json(model_dir / "config.json")
        if not isinstance(config, dict) or "denoising_type" not in config:  # e.g. the train_vae stage's models/vae
            raise ModelNotFoundError(f"{model_dir}/config.json is not a text-to-image model's (no denoising_type; a "
                                     f"VAE's folder?); {TRAIN_HINT}")
        missing = [name for name in ("tokenizer.json", "train_config.json") if not (model_dir / name).is_file()]
        if missing:  # the weights without what sampling needs beside them
            raise ModelNotFoundError(
                f"{model_dir} holds a model but not {' and '.join(missing)}, which sampling needs (the tokenizer, "
                "the noise schedule): LatentDiffusionModel.save_pretrained writes only config.json and model.pt; "
                "save it with TextToImagePipeline.from_components(model, tokenizer, scheduler).save_pretrained(...), "
                f"or {TRAIN_HINT}")
        train_config = read_json(model_dir / "train_config.json")
        try:
            with torch.device("meta"):  # builds the modules without allocating weights: only shapes are needed
                model = LatentDiffusionModel(**config)
        except (TypeError, ValueError) as e:
            # A denoiser registered by the user's own code is unknown to a process that did not run that code
            # (cli.py imports none): the registry (models.register_denoiser) lives in memory.
            custom = (" A denoiser your code registers must be registered in this process too: sample it from "
                      "Python, after registering it, with TextToImagePipeline.from_pretrained"
                      if config.get("denoising_type") not in DENOISERS else "")
            raise ModelNotFoundError(f"{model_dir}/config.json: cannot build the model ({e}).{custom}") from None
        size = image_size if image_size is not None else _training_resolution(train_config, model.vae.downsample_factor)
        try:
            num_timesteps = int(train_config["scheduler"]["num_timesteps"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelNotFoundError(
                f"{model_dir}/train_config.json: no scheduler.num_timesteps ({type(e).__name__}: {e}); {TRAIN_HINT}"
            ) from e
        return cls(model_dir, model.latent_multiple, size, num_timesteps)

    def check(
        self, *, steps: int, guidance: float, sampler: str, num_images_per_prompt: int = 1,
        image_size: int | Sequence[int] | None = None, seed: int = 0, batch_size: int | None = None,
        guidance_rescale: float = 0.0, strength: float | None = None,
    ) -> tuple[int, int]:
        """Validate sampling options before any work; returns the (H, W) to sample. Raises SampleOptionError.
        `strength` is image to image's (None: text to image), refused outside (0, 1] or where it runs no step."""
        from diffusion.samplers import SAMPLERS
        from diffusion.timesteps import img2img_steps

        def integer(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        if not integer(seed) or not 0 <= seed < 2**64:
            raise SampleOptionError("seed", f"expected an integer in [0, 2**64), got {seed!r}")
        if batch_size is not None and (not integer(batch_size) or batch_size < 1):
            raise SampleOptionError("batch_size", f"expected an integer >= 1 or None (all at once), got {batch_size!r}")

        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= self.num_timesteps:
            raise SampleOptionError("steps", f"expected an integer in [1, {self.num_timesteps}], got {steps!r}")
        if sampler not in SAMPLERS:
            raise SampleOptionError("sampler", f"unknown sampler {sampler!r}; expected one of: {', '.join(SAMPLERS)}")
        if isinstance(guidance, bool) or not (isinstance(guidance, numbers.Real) and math.isfinite(guidance)
                                              and guidance >= 0):
            raise SampleOptionError("guidance", f"expected a finite number >= 0, got {guidance!r}")
        if isinstance(guidance_rescale, bool) or not (isinstance(guidance_rescale, numbers.Real)
                                                      and 0.0 <= guidance_rescale <= 1.0):
            raise SampleOptionError("guidance_rescale", f"expected a number in [0, 1], got {guidance_rescale!r}")
        if (isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, (int, np.integer))
                or num_images_per_prompt < 1):
            raise SampleOptionError("num_images_per_prompt", f"expected an integer >= 1, got {num_images_per_prompt!r}")
        if strength is not None:
            try:
                img2img_steps(int(steps), strength)
            except ValueError as e:
                raise SampleOptionError("strength", str(e).removeprefix("strength: ")) from None
        return self.side_pair(image_size)

    def side_pair(self, image_size: int | Sequence[int] | None = None) -> tuple[int, int]:
        """The (H, W) to sample for `image_size` (an int side or (H, W); None: the training resolution).
        Raises SampleOptionError("image_size") for a size the model cannot sample."""
        from diffusion.models.diffusion_model import image_side_pair

        size = image_size if image_size is not None else self.image_size  # 0 is a (bad) size, not "unset"
        if size is None:
            raise SampleOptionError(
                "image_size", "the training resolution is not recorded with this model; give one explicitly"
            )
        try:
            H, W = image_side_pair(size)
        except TypeError as e:
            raise SampleOptionError("image_size", str(e).removeprefix("image_size: ")) from None
        f = self.latent_multiple
        if H <= 0 or W <= 0 or H % f or W % f:
            raise SampleOptionError(
                "image_size", f"{H}x{W} is not a positive multiple of {f} (the model's latent_multiple: the VAE's "
                f"downsampling factor times the denoiser's); try {max(f, round(H / f) * f)}",
            )
        return int(H), int(W)


def negative_prompts(negative_prompt: str | Sequence[str] | None, num_prompts: int) -> list[str] | None:
    """`negative_prompt` as one string per prompt (None stays None: the null caption). Raises
    SampleOptionError("negative_prompt") for anything but a string or a list of `num_prompts` strings."""
    if negative_prompt is None:
        return None
    if isinstance(negative_prompt, str):
        return [negative_prompt] * num_prompts
    if (not isinstance(negative_prompt, Sequence) or not all(isinstance(p, str) for p in negative_prompt)
            or len(negative_prompt) != num_prompts):
        raise SampleOptionError("negative_prompt", f"expected a string, or a list of {num_prompts} strings (one per "
                                                   f"prompt), got {negative_prompt!r}")
    return list(negative_prompt)


def check_components(model: Any, tokenizer: Any, scheduler: Any) -> None:
    """Refuse parts that cannot sample together, naming the part: the types, and a tokenizer whose vocabulary
    size or padding id differ from the text encoder's, or that pads to more tokens than its position
    embeddings hold (the train stage sizes the text encoder from the tokenizer: ``resolve_derived``)."""
    from tokenizers import Tokenizer

    from diffusion.data.tokenizer import max_length_of
    from diffusion.models import LatentDiffusionModel
    from diffusion.scheduler import DDPMScheduler

    for name, part, kind in (("model", model, LatentDiffusionModel), ("tokenizer", tokenizer, Tokenizer),
                             ("scheduler", scheduler, DDPMScheduler)):
        if not isinstance(part, kind):
            raise TypeError(f"{name}: expected a {kind.__module__}.{kind.__name__}, got {type(part).__name__}")
    try:
        length = max_length_of(tokenizer)
    except ValueError as e:
        raise ValueError(f"tokenizer: {e}") from None
    text, vocab, pad = model.text_encoder.cfg, tokenizer.get_vocab_size(), tokenizer.padding["pad_id"]
    if vocab != text.vocab_size:
        raise ValueError(f"tokenizer: its vocabulary has {vocab} tokens, the model's text encoder embeds "
                         f"{text.vocab_size} (text_encoder.vocab_size): not the tokenizer the model was trained with")
    if pad != text.pad_token_id:
        raise ValueError(f"tokenizer: it pads with id {pad}, the model's text encoder masks id {text.pad_token_id} "
                         "(text_encoder.pad_token_id)")
    if length > text.max_length:
        raise ValueError(f"tokenizer: it pads every caption to {length} tokens, the model's text encoder reads at "
                         f"most {text.max_length} (text_encoder.max_length)")
