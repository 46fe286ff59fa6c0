"""The trained pipeline as an MLflow pyfunc model ("models from code"), registered under a name and alias.

Why pyfunc from code, not ``mlflow.pytorch.log_model``: the latter saves one ``nn.Module`` (by default
through torch.export, which needs a batch > 1 input example) while a text-to-image model is a tokenizer, a
noise schedule and a sampling loop around three networks. Here the model is the
train stage's folder, logged as an artifact, and ``pyfunc_model.py`` (the code file) rebuilds a
:class:`~diffusion.pipeline_model.TextToImagePipeline` from it. Nothing is pickled.

The logged model:

- input: the prompts, as a list of strings, a Series, a dict ``{"prompt": [...]}`` or a DataFrame (its
  ``prompt`` column, else its first column); a None prompt is the empty one, the unconditional model. Beside
  the prompts, optional columns (DataFrame columns, dict keys) ``image`` and ``mask`` hold one input image per
  prompt, for image to image (``strength``), and one inpainting mask (white: regenerate), as
  ``TextToImagePipeline.generate(image=..., mask_image=...)`` takes them. Over JSON an image is its file's bytes
  (PNG, JPEG, ... as Pillow reads them), base64-encoded, in a string (a ``data:image/png;base64,`` prefix is
  allowed); locally also the bytes themselves, a PIL image or a uint8 array (H, W), (H, W, 3) or (H, W, 4).
  Never a path: a served model opens no file a request names. Images and masks are read as the pipeline reads
  them (``diffusion.input_images``: EXIF orientation, 16-bit, RGB or grayscale, resized to the image size).
  Each column is all or nothing: an image on every row or on none, a mask on every row or on none, and a mask
  only beside an image. One request is one sampling run (one seed, images drawn in order from one generator,
  as the pipeline's), so rows without an image are a separate request, not a silent second run. Columns
  other than these three are ignored with a warning, as MLflow ignores extra inputs; rows count from 1 in
  errors, which name the row and the column (:func:`read_request`);
- no input schema in the signature, on purpose: MLflow's column schemas cannot say "one unnamed column, or
  named columns of which two are optional". A schema of one unnamed string column (what models logged before
  images were read declare) keeps a DataFrame's first column only, so the image would be dropped; MLflow
  refuses unnamed optional columns; a named schema with a required ``prompt`` refuses a plain list of prompts
  (its column is ``0``); one with every column optional silently drops that ``0`` column, and the prompts with
  it. Without an input schema the input reaches :func:`read_request` as the caller sent it (the scoring server
  still parses ``dataframe_split``, ``dataframe_records`` and ``inputs`` into a DataFrame, a dict or an array),
  and it checks what MLflow would have;
- params (a ParamSchema, so ``predict(prompts, params={...})`` is validated): :data:`PARAMS` below;
- output: one numpy array (N, H, W, 3) uint8, N = prompts * num_images_per_prompt, prompt-major. A single
  array passes through MLflow's output handling unchanged (no output schema is declared, so nothing is
  coerced) and serialises to JSON as nested lists when served;
- the ``diffusion`` package itself (``code_paths``), so the model loads with the code that trained it, and
  an explicit, pinned requirements list, so logging never asks pip or the network to infer one;
- model_config :data:`MODEL_CONFIG_KEYS`: ``serving_image_size`` (the training resolution, the default size)
  and ``serving_device`` (None: CUDA if available); override at load with
  ``mlflow.pyfunc.load_model(uri, model_config={"serving_device": "cpu"})``. MLflow also logs the model_config
  as params of the run the model is logged in (evaluate's), where ``device`` is already evaluate's own
  device: a plain ``device`` key clashed with it ("Changing param values is not allowed"), hence the prefix.

Usage::

    uri = log_and_register("models/diffusion", "text2image", "champion")   # "models:/text2image@champion"
    model = mlflow.pyfunc.load_model(uri)
    images = model.predict(["a red circle in the top left"], params={"steps": 20, "seed": 0})
    with open("sketch.png", "rb") as f:   # image to image; add "mask": [...] to inpaint
        sketch = base64.b64encode(f.read()).decode()
    edited = model.predict({"prompt": ["a blue square in the center"], "image": [sketch]},
                           params={"strength": 0.6})
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import os
import shutil
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from diffusion.model_spec import SampleOptionError
from diffusion.pipeline_model import DEFAULT_STRENGTH

#: The code file MLflow executes to build the model (it calls ``mlflow.models.set_model``).
CODE_FILE = Path(__file__).with_name("pyfunc_model.py")
#: The artifact key of the model folder inside the logged model.
ARTIFACT_KEY = "model_dir"
#: model_config keys -> the TextToImagePipeline.from_pretrained argument each sets. Prefixed, because MLflow
#: logs them as params of the active run, and a stage param of the same name (evaluate's ``device``) with
#: another value makes that logging fail.
MODEL_CONFIG_KEYS = {"serving_image_size": "image_size", "serving_device": "device"}
#: predict() params and their defaults; image_size 0 means the training resolution, negative_prompt "" the null
#: caption, strength acts only with an input image (TextToImagePipeline.generate's options and defaults).
PARAMS: dict[str, Any] = {
    "steps": 20, "guidance": 4.0, "sampler": "dpmpp", "seed": 0, "num_images_per_prompt": 1, "image_size": 0,
    "negative_prompt": "", "guidance_rescale": 0.0, "strength": DEFAULT_STRENGTH,
}
#: The input columns read: the prompts, and optionally an input image and an inpainting mask per prompt.
COLUMNS = ("prompt", "image", "mask")
#: What loading and sampling import (checked with ``sys.modules`` after a fresh load), pinned at log time.
REQUIREMENTS = ("torch", "numpy", "pillow", "tokenizers", "tqdm", "pyyaml", "mlflow")


def serving_options(model_config: dict[str, Any] | None) -> dict[str, Any]:
    """A logged model's model_config -> ``{"image_size": ..., "device": ...}`` for TextToImagePipeline.
    Models registered before the keys were prefixed carry the plain names; those are read too."""
    config = model_config or {}
    return {arg: config.get(key, config.get(arg)) for key, arg in MODEL_CONFIG_KEYS.items()}


def signature() -> Any:
    """Params: :data:`PARAMS`; input and output undeclared (the module docstring says why the input is)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    kinds = {int: "long", float: "double", str: "string"}
    return ModelSignature(params=ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in PARAMS.items()]))


def pip_requirements() -> list[str]:
    """The installed versions of :data:`REQUIREMENTS`, pinned (a local label such as ``+cpu`` dropped, since
    PyPI has no such wheel)."""
    out = []
    for dist in REQUIREMENTS:
        try:
            out.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            out.append(dist)
    return out


@dataclasses.dataclass(frozen=True)
class Request:
    """A predict input, read: the prompts, and None or one PIL image (and mask) per prompt."""

    prompts: list[str]
    images: list[Any] | None = None
    masks: list[Any] | None = None


def read_request(model_input: Any) -> Request:
    """The prompts, images and masks of what ``PyFuncModel.predict`` hands over (the module docstring's input).

    Raises SampleOptionError naming the column ("prompt", "image", "mask") and the row (counted from 1) for an
    image that is not base64, not an image, or of a kind not read; for a mask on a row without an image; for a
    column with an image (or mask) on some rows only; for columns of different lengths."""
    columns = _columns(model_input)
    prompts = _prompts(columns.pop("prompt"), one_per_row=bool(columns))
    for name, values in columns.items():
        if len(values) != len(prompts):
            raise SampleOptionError(name, f"{len(values)} rows, the prompt column has {len(prompts)}: give one "
                                          f"{name} per prompt")
    given = {name: [r for r, v in enumerate(columns.get(name, ()), 1) if not _missing(v)] for name in ("image", "mask")}
    orphans = sorted(set(given["mask"]) - set(given["image"]))
    if orphans:
        raise SampleOptionError("mask", f"{_rows(orphans)}: a mask needs an image on its row (white marks which of "
                                        "the image's pixels to regenerate)")
    for name, rows in given.items():
        article = "an" if name == "image" else "a"
        if rows and len(rows) < len(prompts):
            without = [r for r in range(1, len(prompts) + 1) if r not in rows]
            raise SampleOptionError(name, f"{_rows(without)} without one beside {_rows(rows)} with one: give "
                                          f"{article} {name} on every row or on none (one request is one sampling run, "
                                          f"one seed; send the rows without {article} {name} as another request)")
    decoded = {name: [decode_image(v, name, r) for r, v in enumerate(columns[name], 1)] if rows else None
               for name, rows in given.items()}
    return Request(prompts, decoded["image"], decoded["mask"])


def _columns(model_input: Any) -> dict[str, list[Any]]:
    """A predict input -> ``{"prompt": [...], "image": [...], "mask": [...]}`` (image and mask where given), the
    values as sent. A list of dicts is records (the scoring server's ``inputs`` in records form)."""
    import pandas as pd

    if isinstance(model_input, str):
        return {"prompt": [model_input]}
    if isinstance(model_input, list) and model_input and all(isinstance(r, dict) for r in model_input):
        model_input = pd.DataFrame([{k: _scalar(v) for k, v in r.items()} for r in model_input])
    if isinstance(model_input, pd.DataFrame):
        table = {c: model_input[c].tolist() for c in model_input.columns}
    elif isinstance(model_input, dict):
        table = {k: _cells(v) for k, v in model_input.items()}
    else:  # a list, array or Series of prompts
        return {"prompt": list(model_input)}
    # The prompts: the "prompt" column, else the first other one (MLflow's one-column schema kept the first).
    prompt = "prompt" if "prompt" in table else next((c for c in table if c not in COLUMNS), None)
    if prompt is None:
        raise SampleOptionError("prompt", f"no prompt column: the input's columns are {list(table)}, expected "
                                          f"'prompt' beside the optional {COLUMNS[1:]}")
    ignored = [c for c in table if c not in COLUMNS and c != prompt]
    if ignored:
        warnings.warn(f"input columns {ignored} are ignored: the model reads {list(COLUMNS)}", UserWarning,
                      stacklevel=3)
    return {"prompt": table[prompt], **{c: table[c] for c in COLUMNS[1:] if c in table}}


def _cells(value: Any) -> list[Any]:
    """A dict's value -> its rows: a list (array, Series) is one per row; one string, bytes, image or numeric
    array is one row (a one-prompt request); so is a 0-d array (the scoring server's ``inputs`` form)."""
    from PIL import Image

    if value is None or isinstance(value, (str, bytes, bytearray, Image.Image)):
        return [value]
    if isinstance(value, np.ndarray) and (value.ndim == 0 or value.dtype.kind in "uifb"):
        return [_scalar(value)]  # one image as an array; several are a list of arrays
    return [_scalar(v) for v in value]


def _scalar(value: Any) -> Any:
    """A 0-d array (what the scoring server makes of a JSON string in ``inputs``) -> its item."""
    return value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value


def _prompts(values: list[Any], *, one_per_row: bool) -> list[str]:
    """The prompt column -> strings; a missing prompt (None, NaN) is "" (the unconditional model). A cell holding
    a list is several prompts (a dict ``{"prompt": [...]}`` arrives as one such row through a one-column
    schema, that of models logged before images were read), unless images sit beside it (`one_per_row`)."""
    prompts: list[str] = []
    for row, p in enumerate(values, 1):
        p = _scalar(p)
        if isinstance(p, (list, tuple, np.ndarray)):
            if one_per_row:
                raise SampleOptionError("prompt", f"row {row}: expected one prompt (a string) per row, got a list")
            prompts.extend("" if _missing(q) else str(q) for q in p)
        else:
            prompts.append("" if _missing(p) else str(p))
    return prompts


def _missing(value: Any) -> bool:
    """None, NaN or pandas' NA: what a DataFrame holds where a row has no value."""
    import pandas as pd

    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _rows(rows: list[int]) -> str:
    """``row 2`` or ``rows 1, 3`` (at most 10 named)."""
    named = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
    return f"row {named}" if len(rows) == 1 else f"rows {named}"


def decode_image(value: Any, column: str, row: int) -> Any:
    """One cell of the image or mask column -> a PIL image, fully decoded: base64 text of an image file (a
    ``data:`` URL prefix allowed), the file's bytes, a PIL image, or a uint8 array (H, W), (H, W, 3), (H, W, 4).
    The pipeline then reads it as any image (``input_images``). Raises SampleOptionError(`column`) naming `row`."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or not (value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (3, 4))):
            raise SampleOptionError(column, f"row {row}: expected a uint8 array (H, W), (H, W, 3) or (H, W, 4), got "
                                            f"{value.dtype} of shape {value.shape}")
        return Image.fromarray(value)
    if isinstance(value, str):
        data = _base64(value, column, row)
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        raise SampleOptionError(column, f"row {row}: expected an image file's bytes, base64-encoded (PNG, JPEG, ...), "
                                        f"got {type(value).__name__}")
    try:
        im = Image.open(io.BytesIO(data))
        im.load()  # a truncated file fails here, not mid-sampling
    except UnidentifiedImageError:
        raise SampleOptionError(column, f"row {row}: its {len(data)} bytes are not an image file Pillow reads (PNG, "
                                        "JPEG, WebP, ...)") from None
    except (Image.DecompressionBombError, OSError, ValueError) as e:  # truncated, too large
        raise SampleOptionError(column, f"row {row}: cannot read it as an image ({e})") from None
    return im


def _base64(text: str, column: str, row: int) -> bytes:
    """Base64 text (line breaks allowed, as ``base64`` wraps it; a ``data:...;base64,`` prefix dropped) -> bytes."""
    body = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        compact = "".join(body.split())
        # The URL-safe alphabet too (RFC 4648 section 5: "-" and "_" for "+" and "/"), which often comes unpadded.
        url_safe = "-" in compact or "_" in compact
        if url_safe:
            compact += "=" * (-len(compact) % 4)
        return base64.b64decode(compact, altchars=b"-_" if url_safe else None, validate=True)
    except (binascii.Error, ValueError) as e:  # ValueError: characters outside ASCII
        hint = " (a served model reads no files: send the file's bytes)" if "." in body[-6:] else ""
        raise SampleOptionError(column, f"row {row}: not base64 ({e}){hint}") from None


def _package_copy(tmp: Path) -> Path:
    """A copy of the ``diffusion`` package without bytecode caches, for ``code_paths``."""
    import diffusion

    dst = tmp / "diffusion"
    shutil.copytree(Path(diffusion.__file__).parent, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def model_args(model_dir: Path, image_size: int | None, code_dir: Path) -> dict[str, Any]:
    """The arguments of ``mlflow.pyfunc.log_model`` (or ``save_model``, as the tests use it) for the model folder
    `model_dir`, with a copy of the ``diffusion`` package made in `code_dir` (a temporary folder)."""
    return {
        "python_model": str(CODE_FILE),
        "artifacts": {ARTIFACT_KEY: str(model_dir)},
        "code_paths": [str(_package_copy(code_dir))],
        "signature": signature(),
        "pip_requirements": pip_requirements(),
        "model_config": {"serving_image_size": image_size, "serving_device": None},
    }


def _log(model_dir: Path, name: str, image_size: int | None) -> Any:
    """Log the pyfunc model into the active run and register it under `name`. Returns the ModelInfo."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # No input example on purpose: MLflow would run predict (a full sampling loop) to validate it.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        return mlflow.pyfunc.log_model(name="text_to_image", registered_model_name=name,
                                       **model_args(model_dir, image_size, Path(tmp)))


def log_and_register(model_dir: str | Path, name: str, alias: str, *, run_id: str | None = None) -> str:
    """Log the model folder as a pyfunc model, register a new version of `name` and point `alias` at it.

    Args:
        model_dir: a trained model folder (the train stage's out_dir); checked before anything is logged.
        name: the registered model name.
        alias: set on the new version (e.g. "champion"); moves if it pointed at an older one.
        run_id: the run to log into; default the active run, else a new run named "register_model".
    Returns:
        ``models:/<name>@<alias>``, loadable with ``mlflow.pyfunc.load_model``.
    """
    import mlflow
    from mlflow import MlflowClient

    from diffusion.model_spec import ModelSpec
    from diffusion.tracking import DEFAULT_EXPERIMENT, ensure_experiment, tracking_uri

    spec = ModelSpec.read(model_dir)  # a missing or incomplete folder fails here, before any logging
    active = mlflow.active_run()
    if active is not None and run_id in (None, active.info.run_id):
        info = _log(spec.model_dir, name, spec.image_size)
    else:
        if active is None:
            mlflow.set_tracking_uri(tracking_uri())
            if run_id is None:
                ensure_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
        with mlflow.start_run(run_id=run_id, run_name=None if run_id else "register_model", nested=active is not None):
            info = _log(spec.model_dir, name, spec.image_size)
    client, version = MlflowClient(), str(info.registered_model_version)
    client.set_registered_model_alias(name, alias, version)
    # Where the version came from, on the version itself: the registry's page lists versions, not their runs' tags,
    # and every DVC experiment's evaluate registers one.
    for key, value in _version_tags().items():
        client.set_model_version_tag(name, version, key, value)
    return f"models:/{name}@{alias}"


def _version_tags() -> dict[str, str]:
    """The commit and DVC experiment a new model version comes from (``tracking.stage_tags``), those that are set."""
    from diffusion.tracking import stage_tags

    tags = stage_tags("evaluate")
    return {k: str(tags[k]) for k in ("git_commit", "git_dirty", "dvc_exp_name") if tags.get(k) not in (None, "")}


def download_model_dir(uri: str) -> tuple[Path, int | None]:
    """Fetch a logged model (``models:/name@alias``, ``runs:/<id>/text_to_image``, ...) and return its model
    folder and recorded training resolution, without loading any weights (the CLI checks options first)."""
    import mlflow
    from mlflow.models import Model

    from diffusion.tracking import tracking_uri

    if not mlflow.is_tracking_uri_set():
        mlflow.set_tracking_uri(tracking_uri())
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    flavor = Model.load(local).flavors.get("python_function", {})
    config = flavor.get("config")
    artifact = (flavor.get("artifacts") or {}).get(ARTIFACT_KEY, {})
    model_dir = local / artifact.get("path", f"artifacts/{ARTIFACT_KEY}")
    return model_dir, serving_options(config)["image_size"]
