"""Text to images from a trained model folder: the one sampling entry point shared by ``cli.py sample``, the
MLflow pyfunc model (``evaluation/pyfunc_model.py``) and the evaluate stage.

A model folder is what the train stage exports (``pipeline/train.py``)::

    config.json         the LatentDiffusionModel's resolved config (LatentDiffusionModel.from_pretrained)
    model.pt            its EMA weights
    tokenizer.json      the caption tokenizer
    train_config.json   the train section that produced it; its ``scheduler`` is the noise schedule

Usage::

    pipe = TextToImagePipeline.from_pretrained("models/diffusion")
    images = pipe(["a red circle in the top left"], steps=20, guidance=4.0, seed=0)   # list of PIL images

A model trained in Python (``train_diffusion_model``) becomes such a folder through the pipeline, as in
diffusers: ``TextToImagePipeline.from_components(model, tokenizer, scheduler, image_size=32)`` builds one from
the parts in memory, and its ``save_pretrained(folder)`` writes the four files (train_config.json then holds
only what sampling reads: ``scheduler``, ``image_size`` and ``denoising_type``; a pipeline loaded from a train
stage's folder keeps that folder's training settings beside them).

Image to image (SDEdit, Meng et al. 2022; diffusers' ``StableDiffusionImg2ImgPipeline``): ``pipe(prompts,
image=..., strength=0.8)`` starts from the input images' latents noised part of the way, instead of from pure
noise; ``diffusion.input_images`` says how an image is read and resized. Inpainting (Blended Latent Diffusion,
Avrahami et al. 2023; diffusers' ``mask_image``): ``pipe(prompts, image=..., mask_image=..., strength=0.8)``
regenerates the white of the mask and keeps the rest of the image's latents (``diffusion.inpainting``).

Checks happen in two steps so that a bad request fails before any work: ``model_spec.ModelSpec`` reads only
the JSON files and validates the options; then the weights are loaded. Prompt problems (empty, unknown
words, too long) are warnings, not errors: sampling proceeds, as a user of diffusers expects
(``diffusion.prompt_checks``).
"""

from __future__ import annotations

import math
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffusion.model_spec import (
    MODEL_FILES, TRAIN_HINT, ModelNotFoundError, ModelSpec, SampleOptionError, check_components, check_device,
    negative_prompts, read_json,
)
from diffusion.prompt_checks import prompt_warnings


#: diffusers' default image-to-image strength: the last 80% of the schedule runs. Inpainting shares it (diffusers'
#: legacy, latent-blending inpainting pipeline's default too; its newer one defaults to 1, which is the option
#: ``strength=1.0``: the masked region then keeps next to nothing of the input).
DEFAULT_STRENGTH = 0.8


class PromptWarning(UserWarning):
    """A prompt the model will read differently from what the user wrote (it still samples)."""


class LoRAWarning(UserWarning):
    """LoRA adapters merged into a model other than the one they were trained on (it still samples)."""


class TextToImagePipeline:
    """A trained model with its tokenizer and noise schedule: prompts in, PIL images out.

    Args:
        model: the LatentDiffusionModel (EMA weights), on its device, in eval mode.
        tokenizer: its `tokenizers.Tokenizer`.
        scheduler: the DDPMScheduler it was trained with.
        spec: its :class:`ModelSpec` (size multiple, training resolution, T): read from the model folder, or
            computed from the parts (:meth:`from_components`).
        train_config: the folder's train_config.json as loaded (None for parts in memory); :meth:`save_pretrained`
            writes its training settings again, so that a copy of a trained model still says how it was trained.

    Build one with :meth:`from_pretrained` (a model folder) or :meth:`from_components` (parts in memory);
    :meth:`save_pretrained` writes the folder that :meth:`from_pretrained` and ``cli.py sample`` read.
    """

    def __init__(self, model: Any, tokenizer: Any, scheduler: Any, spec: ModelSpec,
                 train_config: dict[str, Any] | None = None) -> None:
        self.model, self.tokenizer, self.scheduler, self.spec = model.eval(), tokenizer, scheduler, spec
        self.train_config = dict(train_config or {})

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, *, device: str | None = None, image_size: int | None = None
    ) -> TextToImagePipeline:
        """Load a model folder (see the module docstring) onto `device` (None: CUDA if available, else CPU).
        `image_size` sets the default side where the folder does not record the training resolution."""

        from diffusion.config import ConfigError
        from diffusion.data.tokenizer import load_tokenizer
        from diffusion.models import LatentDiffusionModel
        from diffusion.scheduler import DDPMScheduler, SchedulerConfig

        spec = ModelSpec.read(model_dir, image_size)
        device = check_device(device)
        train_config = read_json(spec.model_dir / "train_config.json")
        try:
            sched_cfg = SchedulerConfig.from_dict(train_config["scheduler"], "scheduler")
        except (KeyError, ConfigError) as e:
            raise ModelNotFoundError(f"{spec.model_dir}/train_config.json: no valid scheduler section ({e})") from e
        try:
            model = LatentDiffusionModel.from_pretrained(spec.model_dir, map_location=device)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as e:  # torch's messages for a bad archive
            # Not torch's own text: for a file that is not a weights-only checkpoint it suggests weights_only=False,
            # which would run whatever the file holds (a model folder may come from anyone, pitfall 14).
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelNotFoundError(f"{spec.model_dir}/model.pt: not a readable weights file ({first[:200]}); "
                                     f"{TRAIN_HINT}") from None
        try:
            tokenizer = load_tokenizer(spec.model_dir / "tokenizer.json")
        except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
            raise ModelNotFoundError(f"{spec.model_dir}/tokenizer.json: not a tokenizer ({e}); {TRAIN_HINT}") from None
        scheduler = DDPMScheduler.from_config(sched_cfg).to(device)
        return cls(model, tokenizer, scheduler, spec, train_config)

    @classmethod
    def from_components(
        cls, model: Any, tokenizer: Any, scheduler: Any, *, image_size: int | None = None
    ) -> TextToImagePipeline:
        """A pipeline from parts in memory, e.g. what ``train_diffusion_model`` trained; no folder is read::

            pipe = TextToImagePipeline.from_components(model, data.tokenizer, scheduler, image_size=32)
            pipe.save_pretrained("models/mine")  # then from_pretrained("models/mine"), cli.py sample --model ...

        Args:
            model: the LatentDiffusionModel, used as it is (not copied; its device is the pipeline's) and put in
                eval mode.
            tokenizer: the `tokenizers.Tokenizer` it was trained with (fixed padding, as ``train_tokenizer``
                builds it; ``create_dummy_dataset(...).tokenizer``).
            scheduler: the DDPMScheduler it was trained with.
            image_size: the default image side, the training resolution (a multiple of ``model.latent_multiple``);
                None: each call must give one (and a saved folder records none).

        Raises TypeError for a part of the wrong kind, ValueError naming the part for parts that do not fit
        together (see ``model_spec.check_components``), SampleOptionError("image_size") for a side the model cannot
        sample.
        """
        check_components(model, tokenizer, scheduler)
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer))):
            raise SampleOptionError("image_size", f"expected an int side (the training resolution) or None, got "
                                                  f"{image_size!r}")
        spec = ModelSpec(None, model.latent_multiple, None if image_size is None else int(image_size),
                         scheduler.num_timesteps)
        if image_size is not None:
            spec.side_pair()  # refused now rather than at the first call
        return cls(model, tokenizer, scheduler, spec)

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write the pipeline as a model folder (the module docstring's four files), which :meth:`from_pretrained`,
        ``cli.py sample --model`` and the evaluate stage read; returns its path. train_config.json holds what
        they read: ``scheduler`` (the noise schedule's config), ``image_size`` (the default side) and
        ``denoising_type``, taken from the pipeline's parts as they are now; beside them, the training settings of
        the folder it was loaded from (the train section: steps, optimizer, data), which parts in memory do not
        know.

        Atomic, as the train stage's export: the files go to a temporary folder beside it that replaces the old
        folder when complete (``atomic.staged_dir``), so an interrupted save leaves the old folder or the
        new one, never part of each. As the whole folder is replaced, one that holds anything else than those
        four files is refused (ConfigError, before anything is written): pointed at ``.`` it would delete it.

        Raises ValueError for a scheduler its config does not describe (a subclass with its own ``make_betas``:
        loaded back from the config, it would be a DDPMScheduler with another schedule).
        """
        from diffusion import atomic
        from diffusion.data.tokenizer import save_tokenizer

        train_config = {**self.train_config, "scheduler": _schedule_config(self.scheduler),
                        "image_size": self.spec.image_size, "denoising_type": self.model.denoising_type}
        atomic.check_replaceable(save_directory, MODEL_FILES, "save_pretrained")
        with atomic.staged_dir(save_directory) as tmp:
            self.model.save_pretrained(tmp)
            save_tokenizer(self.tokenizer, tmp / "tokenizer.json")
            atomic.atomic_write_json(tmp / "train_config.json", train_config)
        return Path(save_directory)

    def load_lora_weights(self, path: str | Path | dict[str, Any], scale: float = 1.0) -> None:
        """Merge the LoRA adapters of a ``train.lora`` run (its ``lora.pt``, the folder holding it, or that file as
        ``models.lora.read_adapters`` read it) into this pipeline's model at `scale`: each adapted layer's weight
        becomes W + scale * alpha / rank * B A. diffusers' ``load_lora_weights`` followed by
        ``fuse_lora(lora_scale=scale)``: merged, sampling costs what it did before; to undo it, load the model again.
        Scale 1 gives the run's exported model; below 1, a model between the base and it (how much of what
        fine-tuning learned, and forgot, to take).

        Raises FileNotFoundError (no file), ValueError naming the file and layer for adapters of another
        architecture or a scale that is not finite, and ValueError when this model has them merged in already (the
        folder it was loaded from is their run's own, with the same lora.pt, or merge-lora's output from them, whose
        ``merged_lora`` records their sha256), before any weight changes; warns (:class:`LoRAWarning`) when this
        model is not the one the adapters were trained on (``models.lora.apply_adapters``)."""
        from diffusion.atomic import file_sha256
        from diffusion.models.lora import ADAPTER_FILE, apply_adapters, read_adapters

        adapters = path if isinstance(path, dict) else read_adapters(path)
        own = None if self.spec.model_dir is None else self.spec.model_dir / ADAPTER_FILE
        if (own is not None and own.is_file() and file_sha256(own) == adapters["sha256"]) or \
                (self.train_config.get("merged_lora") or {}).get("sha256") == adapters["sha256"]:
            raise ValueError(f"{adapters['path']}: these adapters are merged into the model in {self.spec.model_dir} "
                             f"already; merging them again would add them twice (load the base, {adapters['base']})")
        if warning := apply_adapters(self.model, adapters, scale):
            warnings.warn(warning, LoRAWarning, stacklevel=2)

    def check_prompts(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                      guidance: float | None = None, guidance_rescale: float = 0.0, *, image: Any = None,
                      strength: float | None = None) -> list[str]:
        """Warnings for `prompts` and the negative prompts (see :func:`prompt_warnings`), for negative prompts
        or a rescale at `guidance` 1, where there is no unconditional half for them to act on, and for a
        `strength` given (None: not given) without an `image`."""
        # One string is one negative prompt for all: warned about once.
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompts(negative_prompt,
                                                                                                len(prompts)) or []
        out = prompt_warnings(self.tokenizer, prompts) + prompt_warnings(self.tokenizer, negatives, "negative prompt")
        if any(n.strip() for n in negatives) and guidance == 1.0:
            out.append("negative prompts have no effect at guidance 1 (the conditional model alone, no "
                       "unconditional half for them to replace)")
        if guidance_rescale and guidance == 1.0:
            out.append("guidance_rescale has no effect at guidance 1 (the conditional model alone: nothing to rescale)")
        if strength is not None and image is None:
            out.append(f"strength {strength} has no effect without an input image (text to image starts from pure "
                       "noise)")
        return out

    def generate(
        self, prompts: Sequence[str], *, steps: int = 20, guidance: float = 4.0, sampler: str = "dpmpp",
        seed: int = 0, num_images_per_prompt: int = 1, image_size: int | Sequence[int] | None = None,
        progress: bool = True, batch_size: int | None = None, warn: bool = True,
        negative_prompt: str | Sequence[str] | None = None, guidance_rescale: float = 0.0, image: Any = None,
        strength: float = DEFAULT_STRENGTH, mask_image: Any = None,
    ) -> np.ndarray:
        """Like ``__call__``, but returns one (N, H, W, 3) uint8 array, N = len(prompts) * num_images_per_prompt,
        prompt-major (the images of prompt 0 first)."""
        from diffusion import input_images
        from diffusion.data.tokenizer import encode

        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts: expected a list of strings (\"\" for the unconditional model), got {prompts!r}")
        if mask_image is not None and image is None:
            raise SampleOptionError("mask_image", "needs an image= to inpaint (the mask says which of its pixels to "
                                                  "regenerate)")
        H, W = self.spec.check(steps=steps, guidance=guidance, sampler=sampler, seed=seed, batch_size=batch_size,
                               num_images_per_prompt=num_images_per_prompt, image_size=image_size,
                               guidance_rescale=guidance_rescale, strength=None if image is None else strength)
        negatives = negative_prompts(negative_prompt, len(prompts))
        inputs = None if image is None else input_images.read_images(image, len(prompts))  # read before any work
        masks = None if mask_image is None else input_images.read_masks(mask_image, len(prompts))
        if warn:
            asked = None if strength == DEFAULT_STRENGTH else strength  # the default is no request
            for message in self.check_prompts(prompts, negative_prompt, guidance, guidance_rescale, image=image,
                                              strength=asked):
                warnings.warn(message, PromptWarning, stacklevel=2)
        # Empty prompts encode as "", the null caption: guided against itself, that is the unconditional model.
        n = int(num_images_per_prompt)
        tokens = encode(self.tokenizer, [p for p in prompts for _ in range(n)])  # (N, T)
        # Negative prompts take the null caption's place in guidance (all "" is that caption: None keeps the
        # model's one broadcast row, and the default's images, bit for bit).
        uncond = (encode(self.tokenizer, [p for p in negatives for _ in range(n)])
                  if negatives and any(p.strip() for p in negatives) else None)  # (N, T) or None
        size, k = (H, W), len(prompts)
        init = None if inputs is None else input_images.init_latents(self.model, inputs, k, n, size)  # (N, C, h, w)
        mask = None if masks is None else input_images.latent_masks(self.model, masks, k, n, size)  # (N, 1, h, w)
        for message in input_images.mask_warnings(masks, (H, W)) if warn and masks is not None else ():
            warnings.warn(message, PromptWarning, stacklevel=2)
        return self._sample_batches(tokens, uncond, init, mask, size=size, steps=steps, guidance=guidance,
                                    sampler=sampler, seed=seed, guidance_rescale=guidance_rescale, strength=strength,
                                    batch_size=batch_size, progress=progress)

    def _sample_batches(
        self, tokens: Any, uncond: Any, init: Any, mask: Any, *, size: tuple[int, int], steps: int, guidance: float,
        sampler: str, seed: int, guidance_rescale: float, strength: float, batch_size: int | None, progress: bool,
    ) -> np.ndarray:
        """The sampling of :meth:`generate`, its options checked: the images of `tokens` (N, T), `batch_size` at a
        time (None: all at once) from one generator seeded with `seed`, as one (N, H, W, 3) uint8 array. `uncond`
        (N, T), `init` (N, C, h, w) and `mask` (N, 1, h, w) are sliced as the tokens are (None: not used)."""
        import torch

        from diffusion.timesteps import img2img_steps

        H, W = size
        run = steps if init is None else img2img_steps(int(steps), strength)  # the sampler steps each batch runs
        chunk = batch_size or max(len(tokens), 1)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))  # CPU: same x_T on every device
        bar = _progress_bar(run * math.ceil(len(tokens) / chunk), progress)
        out = []
        try:
            for start in range(0, len(tokens), chunk):
                images = self.model.generate(
                    text_tokens=tokens[start : start + chunk], scheduler=self.scheduler,
                    num_inference_steps=int(steps), guidance_scale=float(guidance), image_size=(H, W),
                    sampler=sampler, generator=generator, callback=(lambda *_: bar.update(1)) if bar else None,
                    guidance_rescale=float(guidance_rescale),
                    uncond_tokens=None if uncond is None else uncond[start : start + chunk],
                    init_latents=None if init is None else init[start : start + chunk],
                    strength=1.0 if init is None else float(strength),
                    mask=None if mask is None else mask[start : start + chunk],
                )  # (B, 3, H, W) in [0, 1]
                out.append((images * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
        finally:
            if bar:
                bar.close()
        if not out:
            return np.zeros((0, H, W, 3), np.uint8)
        return torch.cat(out).numpy()  # (N, H, W, 3)

    def __call__(self, prompts: Sequence[str], **options: Any) -> list[Any]:
        """Sample images for `prompts`.

        Options (keywords): steps=20, guidance=4.0 (classifier-free guidance scale), sampler="dpmpp" ("ddpm",
        "ddim", "dpmpp", "euler", "euler_a", "heun"), seed=0, num_images_per_prompt=1, image_size=None (the training
        resolution; an int side or (H, W), multiples of ``spec.latent_multiple``), progress=True (a tqdm bar
        over sampler steps), batch_size=None (all at once), warn=True (PromptWarning for odd prompts),
        negative_prompt=None (a string for every prompt, or one per prompt: what guidance steers away from, in
        place of the null caption; diffusers' ``negative_prompt``), guidance_rescale=0.0 (in [0, 1]: Lin et al.
        2023 sec. 3.4, which keeps the guided prediction's scale at high guidance, for zero-terminal-SNR
        schedules), image=None (image to image, diffusers' ``image``: a PIL image or a path for every prompt, or
        a list of one per prompt, resized to the image size as ``diffusion.input_images`` says), strength=0.8 (in
        (0, 1], with an image: the last int(steps * strength) of the steps run from the image's latents noised to
        the first of them; low stays near the image, 1 all but forgets it: ``timesteps.img2img_timesteps``),
        mask_image=None (inpainting, with an image, diffusers' ``mask_image``: given as `image` is, read as
        grayscale; white (>= 128) is regenerated, the rest of the image's latents kept; ``diffusion.inpainting``).
        The same options and seed give the same images. ``batch_size`` is among the options: the images are
        drawn batch after batch from one seeded generator, so with the ``ddpm`` and ``euler_a`` samplers, which draw
        fresh noise at every step, another batch size gives other (equally valid) images; the others do not
        (each image's starting noise is its own draw of the generator, in order).

        Returns:
            a list of PIL RGB images, prompt-major.
        """
        from PIL import Image

        return [Image.fromarray(a) for a in self.generate(prompts, **options)]


def _schedule_config(scheduler: Any) -> dict[str, Any]:
    """train_config.json's ``scheduler`` section for `scheduler`: its config, which ``from_pretrained`` reads back
    with ``SchedulerConfig.from_dict``. Raises ValueError if that would rebuild another schedule."""
    import torch

    from diffusion.scheduler import DDPMScheduler

    rebuilt = DDPMScheduler.from_config(scheduler.config)
    if not torch.equal(rebuilt.tables()["betas"], scheduler.tables()["betas"]):
        raise ValueError(
            f"scheduler: the betas of this {type(scheduler).__name__} are not those its config gives "
            f"({scheduler.config.beta_schedule!r}: its own make_betas?); a model folder records only the config, so "
            "the folder would load with another schedule. Save it with a DDPMScheduler its config describes")
    return scheduler.config.to_dict()


def _progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar over sampler steps (stderr), or None."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="step", leave=False)


def images_to_grid(images: np.ndarray, num_prompts: int) -> Any:
    """(N, H, W, 3) uint8 images -> one PIL image: the image itself if N == 1, else a grid with a row per
    prompt (or, for one prompt, as square as possible)."""
    import torch
    from PIL import Image

    from diffusion.evaluation.grid import make_grid

    if len(images) == 1:
        return Image.fromarray(images[0])
    per_prompt = len(images) // max(num_prompts, 1)
    nrow = math.ceil(math.sqrt(len(images))) if num_prompts == 1 else per_prompt
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # (N, H, W, 3) -> (N, 3, H, W)
    return make_grid(x, nrow=nrow)
