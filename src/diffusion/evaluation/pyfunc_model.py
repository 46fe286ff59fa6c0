"""The MLflow "models from code" file of the text-to-image pipeline (logged by ``evaluation/pyfunc.py``).

MLflow stores this file with the model and executes it at load time; ``mlflow.models.set_model`` at the end
names the model object. ``load_context`` rebuilds the pipeline from the logged model folder, so nothing is
pickled and the weights load with ``weights_only=True``.
"""

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class TextToImageModel(PythonModel):
    """``predict(prompts, params) -> (N, H, W, 3) uint8`` (see ``diffusion.evaluation.pyfunc``)."""

    def load_context(self, context: Any) -> None:
        from diffusion.evaluation.pyfunc import ARTIFACT_KEY, serving_options
        from diffusion.pipeline_model import TextToImagePipeline

        # model_config {"serving_device": ..., "serving_image_size": ...} -> device=..., image_size=...
        self.pipeline = TextToImagePipeline.from_pretrained(context.artifacts[ARTIFACT_KEY],
                                                            **serving_options(context.model_config))

    # The hint is pd.DataFrame on purpose: MLflow 3 infers no signature from it, so the logged one (with its
    # params schema) stays in force; a hint such as list[str] would replace it by one without params, and
    # `predict(..., params=...)` would silently ignore steps, seed and the rest. The signature declares no input
    # schema (pyfunc.py says why), so model_input arrives as sent: a list, a Series, a dict or a DataFrame, which
    # read_request reads (prompts, and images and masks where given).
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from diffusion.evaluation.pyfunc import PARAMS, read_request
        from diffusion.model_spec import SampleOptionError

        p = {**PARAMS, **(params or {})}
        try:
            request = read_request(model_input)  # a bad image fails here, naming its row, before any sampling
            return self.pipeline.generate(
                request.prompts, steps=int(p["steps"]), guidance=float(p["guidance"]), sampler=str(p["sampler"]),
                seed=int(p["seed"]), num_images_per_prompt=int(p["num_images_per_prompt"]),
                image_size=int(p["image_size"]) or None, progress=False, negative_prompt=str(p["negative_prompt"]),
                guidance_rescale=float(p["guidance_rescale"]), image=request.images, mask_image=request.masks,
                strength=float(p["strength"]),
            )
        except SampleOptionError as e:
            # An MlflowException with a client-error code is what the scoring server returns as the message
            # (HTTP 400); any other exception becomes a generic "unexpected error" with a stack trace.
            raise MlflowException(f"{e.option}: {e.detail}", error_code=INVALID_PARAMETER_VALUE) from None


mlflow.models.set_model(TextToImageModel())
