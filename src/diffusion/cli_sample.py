"""What `cli.py sample` does once typer has parsed its options (the command's signature is in ``diffusion.cli``).

Kept apart from the stage commands so that they, which DVC runs, do not import it: reading the model folder or an
MLflow model URI, the input image and mask, the checks made before any weights are loaded, and the summary line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer

from diffusion.cli import _fail, _train_config
from diffusion.config import ConfigError
from diffusion.params import load_section

#: The command-line flag of each sampling option, so an error from the pipeline names what the user typed.
_SAMPLE_FLAGS = {"steps": "--steps", "sampler": "--sampler", "guidance": "--guidance",
                 "num_images_per_prompt": "--num-images", "image_size": "--size", "device": "--device",
                 "guidance_rescale": "--guidance-rescale", "strength": "--strength", "mask_image": "--mask"}


def _is_mlflow_uri(model: str) -> bool:
    """`models:/name@alias`, `runs:/<id>/path`, `mlflow-artifacts:/...` (an existing folder is a folder)."""
    return ":/" in model and not Path(model).exists()


def _sample_model_dir(model: str | None, params: Path, overrides: list[str] | None) -> tuple[Path, int | None]:
    """The model folder to sample from and the training resolution its MLflow model records (else None).

    Default: train.out_dir of params.yaml. An MLflow model URI is downloaded (weights are not loaded yet).
    """
    if model is None:
        try:
            return Path(load_section(_train_config(), params, overrides or []).out_dir), None
        except ConfigError as e:
            _fail(f"{e} (or pass --model DIR or an MLflow model URI)", 2)
    if overrides:  # they only choose the model folder (train.out_dir); with --model they would be ignored
        _fail(f"-S {overrides[0]}: sample reads params only for train.out_dir, the default model; not with --model", 2)
    if not _is_mlflow_uri(model):
        return Path(model), None
    from mlflow.exceptions import MlflowException

    from diffusion.evaluation.pyfunc import download_model_dir

    try:
        return download_model_dir(model)
    except (MlflowException, OSError) as e:
        _fail(f"--model {model}: cannot load this MLflow model ({e})", 1)
    raise AssertionError("unreachable")


def _check_out_image(out: Path) -> None:
    """Exit 2 unless `out` is a path an image can be written to, before any model is read."""
    from PIL import Image

    if out.suffix.lower() not in Image.registered_extensions():  # PIL picks the format by the extension
        _fail(f"--out {out}: {out.suffix or 'no extension'!r} is not an image format Pillow writes (.png, .jpg ...)", 2)
    if out.is_dir() or any(parent.is_file() for parent in out.parents):
        _fail(f"--out {out}: a folder, or under a file; expected the path of an image file", 2)


def _steps(n: int) -> str:
    return f"{n} step" + ("" if n == 1 else "s")


def _read_input_image(image: Path | None, strength: float | None, num_prompts: int,
                      mask: Path | None = None) -> dict[str, Any]:
    """The pipeline's image-to-image and inpainting options for ``--image``, ``--strength`` and ``--mask`` ({}
    without an image): the image and the mask read now, before any model is. Exit 1 naming the file if one cannot
    be read (a missing input, as a missing model is), 2 for ``--mask`` without ``--image``; ``--strength`` alone
    only warns, once the model is loaded (``check_prompts``)."""
    from diffusion.input_images import read_images, read_masks
    from diffusion.model_spec import SampleOptionError
    from diffusion.pipeline_model import DEFAULT_STRENGTH

    if mask is not None and image is None:
        _fail(f"--mask {mask}: needs --image, the picture to inpaint (the mask says which of its pixels to "
              "regenerate)", 2)
    if image is None:
        return {}
    try:
        inputs = read_images(image, num_prompts)
        masks = None if mask is None else read_masks(mask, num_prompts)
    except SampleOptionError as e:
        _fail(f"{_SAMPLE_FLAGS.get(e.option, '--' + e.option)} {e.detail}", 1)
    return {"image": inputs, "strength": DEFAULT_STRENGTH if strength is None else strength, "mask_image": masks}


def read_lora(lora: str, flag: str = "--lora") -> dict[str, Any]:
    """The adapters' file `lora` (a lora.pt, the folder holding it, or an MLflow artifact URI such as
    ``runs:/<id>/model/lora.pt``, fetched from the project's tracking store), read and checked
    (``models.lora.read_adapters``) before any model is loaded; its ``path`` is `lora` as given. Exit 1 naming
    `flag` and it when it cannot be read, as for a missing model."""
    from diffusion.models.lora import read_adapters

    if not _is_mlflow_uri(lora):
        try:
            return read_adapters(lora)
        except (OSError, ValueError) as e:
            _fail(f"{flag} {e}", 1)
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    from diffusion.tracking import tracking_uri

    if not mlflow.is_tracking_uri_set():  # the project's store, as --model's URIs (pyfunc.download_model_dir)
        mlflow.set_tracking_uri(tracking_uri())
    with tempfile.TemporaryDirectory() as tmp:  # read into memory, then removed
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=lora, dst_path=tmp)
            return {**read_adapters(local), "path": lora}  # named as given, not by the temporary copy
        except MlflowException as e:
            _fail(f"{flag} {lora}: cannot download this MLflow artifact ({e})", 1)
        except (OSError, ValueError) as e:
            _fail(f"{flag} {lora}: {str(e).split(': ', 1)[-1]}", 1)
    raise AssertionError("unreachable")


def adapters_base(adapters: dict[str, Any], flag: str = "--lora") -> str:
    """The model the adapters were trained on (their run's train.init_from, a path as given there: relative to the
    folder the run ran in), the default --model with --lora. Exit 1 when that folder is not here."""
    if not Path(adapters["base"]).is_dir():
        _fail(f"{flag} {adapters['path']}: its base model {adapters['base']} (the run's train.init_from, from the "
              "folder the run ran in) is not here; pass --model, the model folder or MLflow model URI to merge the "
              "adapters into", 1)
    return adapters["base"]


def check_scale(scale: float, flag: str) -> None:
    """Exit 2 for a scale that is not a finite number (nan and inf parse as floats)."""
    if not math.isfinite(scale):
        _fail(f"{flag}: expected a finite number, got {scale}", 2)


def merge_adapters(pipe: Any, adapters: dict[str, Any], scale: float, flag: str = "--lora") -> None:
    """``pipe.load_lora_weights(adapters, scale)``; exit 2 when they do not fit its model (another architecture) or
    are merged in it already. A model other than their base only warns (``warning: ...``, as the project's warnings
    print: ``cli_text.show_warnings_plainly``)."""
    try:
        pipe.load_lora_weights(adapters, scale)
    except ValueError as e:
        _fail(f"{flag} {e}", 2)


def run(prompts: list[str], *, num_images: int, steps: int, guidance: float, negative_prompt: str,
        guidance_rescale: float, sampler: str, seed: int, out: Path, model: str | None, size: int | None, device: str,
        image: Path | None, strength: float | None, mask: Path | None, lora: str | None, lora_scale: float,
        params: Path, set_: list[str] | None) -> None:
    """`cli.py sample` with its options parsed: check them, load the model, sample, write the image, summarise."""
    from diffusion.model_spec import ModelNotFoundError, ModelSpec, SampleOptionError, check_device
    from diffusion.pipeline_model import TextToImagePipeline, images_to_grid

    _check_out_image(out)
    img2img = _read_input_image(image, strength, len(prompts), mask)
    check_scale(lora_scale, "--lora-scale")
    adapters = read_lora(lora) if lora is not None else None
    if adapters is not None and model is None:
        if set_:  # they would choose train.out_dir, which --lora's default model is not
            _fail(f"-S {set_[0]}: sample reads params only for train.out_dir, the default model; not with --lora, "
                  "whose default is the adapters' base (choose another with --model)", 2)
        model = adapters_base(adapters)
    model_dir, recorded_size = _sample_model_dir(model, params, set_)
    options = dict(steps=steps, guidance=guidance, sampler=sampler, num_images_per_prompt=num_images, image_size=size,
                   guidance_rescale=guidance_rescale)
    try:
        # before any weights are read
        ModelSpec.read(model_dir, recorded_size).check(**options, strength=img2img.get("strength"))
        pipe = TextToImagePipeline.from_pretrained(model_dir, device=check_device(device), image_size=recorded_size)
    except ModelNotFoundError as e:
        _fail(str(e), 1)
    except SampleOptionError as e:
        _fail(f"{_SAMPLE_FLAGS.get(e.option, e.option)}: {e.detail}", 2)
    if adapters is not None:
        merge_adapters(pipe, adapters, lora_scale)
    elif lora_scale != 1.0:
        typer.echo(f"warning: --lora-scale {lora_scale:g} has no effect without --lora (no adapters to scale)", err=True)
    messages = pipe.check_prompts(prompts, negative_prompt, guidance, guidance_rescale, image=image, strength=strength)
    if img2img.get("mask_image"):
        from diffusion.input_images import mask_warnings

        messages += mask_warnings(img2img["mask_image"], pipe.spec.side_pair(size))
    for message in messages:
        typer.echo(f"warning: {message}", err=True)
    images = pipe.generate(prompts, seed=seed, warn=False, negative_prompt=negative_prompt,
                           **options, **img2img)  # (N, H, W, 3) uint8; warned above
    out.parent.mkdir(parents=True, exist_ok=True)
    images_to_grid(images, len(prompts)).save(out)
    h, w = images.shape[1:3]
    extra = _sample_details(negative_prompt, guidance_rescale, steps, image, img2img.get("strength"), mask)
    extra += f", LoRA {adapters['path']} at scale {lora_scale:g}" if adapters is not None else ""
    typer.echo(f"sample: {len(images)} image(s) of {w}x{h} ({sampler}, {steps} steps, guidance {guidance}{extra}, "
               f"seed {seed}) -> {out}")


def _sample_details(negative_prompt: str, guidance_rescale: float, steps: int, image: Path | None,
                    strength: float | None, mask: Path | None) -> str:
    """The summary line's options beyond the defaults: negative prompt, rescale, input image and mask."""
    from diffusion.timesteps import img2img_steps

    extra = f", negative prompt {negative_prompt!r}" if negative_prompt.strip() else ""
    extra += f", guidance rescale {guidance_rescale}" if guidance_rescale else ""
    if image is not None:
        extra += f", from {image} at strength {strength}: {_steps(img2img_steps(steps, strength))} run"
    return extra + (f", regenerating the white of {mask}" if mask is not None else "")
