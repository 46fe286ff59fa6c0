"""The trained pipeline as an MLflow pyfunc model ("models from code"), registered under a name and alias.

Why pyfunc from code, not ``mlflow.pytorch.log_model``: the latter saves one ``nn.Module`` (by default
through torch.export, which needs a batch > 1 input example) while a text-to-image model is a tokenizer, a
noise schedule and a sampling loop around three networks. Here the model is the
train stage's folder, logged as an artifact, and ``pyfunc_model.py`` (the code file) rebuilds a
:class:`~diffusion.pipeline_model.TextToImagePipeline` from it. Nothing is pickled.

The logged model:

- input: a list of prompts (a column of strings; MLflow turns a list into a one-column DataFrame), a Series,
  a dict ``{"prompt": [...]}``, or a one-column DataFrame (MLflow's schema check keeps a DataFrame's first
  column only); a None prompt is the empty one, the unconditional model;
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
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

#: The code file MLflow executes to build the model (it calls ``mlflow.models.set_model``).
CODE_FILE = Path(__file__).with_name("pyfunc_model.py")
#: The artifact key of the model folder inside the logged model.
ARTIFACT_KEY = "model_dir"
#: model_config keys -> the TextToImagePipeline.from_pretrained argument each sets. Prefixed, because MLflow
#: logs them as params of the active run, and a stage param of the same name (evaluate's ``device``) with
#: another value makes that logging fail.
MODEL_CONFIG_KEYS = {"serving_image_size": "image_size", "serving_device": "device"}
#: predict() params and their defaults; image_size 0 means the training resolution, negative_prompt "" the null
#: caption (TextToImagePipeline.generate's options).
PARAMS: dict[str, Any] = {
    "steps": 20, "guidance": 4.0, "sampler": "dpmpp", "seed": 0, "num_images_per_prompt": 1, "image_size": 0,
    "negative_prompt": "", "guidance_rescale": 0.0,
}
#: What loading and sampling import (checked with ``sys.modules`` after a fresh load), pinned at log time.
REQUIREMENTS = ("torch", "numpy", "pillow", "tokenizers", "tqdm", "pyyaml", "mlflow")


def serving_options(model_config: dict[str, Any] | None) -> dict[str, Any]:
    """A logged model's model_config -> ``{"image_size": ..., "device": ...}`` for TextToImagePipeline.
    Models registered before the keys were prefixed carry the plain names; those are read too."""
    config = model_config or {}
    return {arg: config.get(key, config.get(arg)) for key, arg in MODEL_CONFIG_KEYS.items()}


def signature() -> Any:
    """Input: a column of prompt strings; params: :data:`PARAMS`; output: undeclared (an image array)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {int: "long", float: "double", str: "string"}
    params = ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in PARAMS.items()])
    return ModelSignature(inputs=Schema([ColSpec("string")]), params=params)


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


def prompts_from_input(model_input: Any) -> list[str]:
    """Prompts from what ``PyFuncModel.predict`` hands over after MLflow enforced the signature (one unnamed
    string column): a list or array of strings, a Series, or a DataFrame, whose first column MLflow keeps.

    Enforcement reshapes some inputs before they get here, so they are read back: a dict ``{"prompt": [...]}``
    arrives as one row holding the list (its items are the prompts), and a missing prompt (None) as NaN
    (the empty prompt: the unconditional model)."""
    import pandas as pd

    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        model_input = model_input[column]
    if isinstance(model_input, dict) and "prompt" in model_input:
        model_input = model_input["prompt"]
    prompts: list[str] = []
    for p in list(model_input):
        if isinstance(p, (list, tuple, np.ndarray)):
            prompts.extend("" if _missing(q) else str(q) for q in p)
        else:
            prompts.append("" if _missing(p) else str(p))
    return prompts


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _package_copy(tmp: Path) -> Path:
    """A copy of the ``diffusion`` package without bytecode caches, for ``code_paths``."""
    import diffusion

    dst = tmp / "diffusion"
    shutil.copytree(Path(diffusion.__file__).parent, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def _log(model_dir: Path, name: str, image_size: int | None) -> Any:
    """Log the pyfunc model into the active run and register it under `name`. Returns the ModelInfo."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # No input example on purpose: MLflow would run predict (a full sampling loop) to validate it.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        return mlflow.pyfunc.log_model(
            name="text_to_image",
            python_model=str(CODE_FILE),
            artifacts={ARTIFACT_KEY: str(model_dir)},
            code_paths=[str(_package_copy(Path(tmp)))],
            signature=signature(),
            pip_requirements=pip_requirements(),
            model_config={"serving_image_size": image_size, "serving_device": None},
            registered_model_name=name,
        )


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
    MlflowClient().set_registered_model_alias(name, alias, str(info.registered_model_version))
    return f"models:/{name}@{alias}"


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
