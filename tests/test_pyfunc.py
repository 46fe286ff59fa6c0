"""The MLflow pyfunc model (``diffusion.evaluation.pyfunc``): its input forms, image to image and inpainting through
``predict`` and through the scoring server's JSON parsing, its client errors, and registering and loading it.

The tiny model folder comes from tests/test_sample.py (random weights); the images from tests/test_img2img.py and
tests/test_inpaint.py. The model is saved once per module with ``mlflow.pyfunc.save_model`` and the arguments that
``log_and_register`` logs with (``pyfunc.model_args``), then loaded as a served model is.
"""

import base64
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, PngImagePlugin
from test_img2img import gradient_image
from test_inpaint import corner_mask
from test_sample import FAST, PROMPTS, SIDE

from diffusion.evaluation.pyfunc import (
    PARAMS,
    model_args,
    read_request,
    signature,
)
from diffusion.model_spec import SampleOptionError
from diffusion.pipeline_model import PromptWarning
from diffusion.tracking import ensure_experiment

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: two OpenMP threads on 2 busy cores crawl

STEPS = {"steps": 4, "seed": 3}  # strength 0.5 of 4 steps runs 2


def b64(image: Image.Image, fmt: str = "PNG") -> str:
    """An image as a JSON request carries it: its file's bytes, base64-encoded."""
    buf = io.BytesIO()
    image.save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def other_image() -> Image.Image:
    return gradient_image().transpose(Image.Transpose.ROTATE_90)




def save(model_dir: Path, path: Path, **overrides):
    """Save the pyfunc model of `model_dir` at `path` (as log_and_register logs it) and load it, on the CPU."""
    import mlflow

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        mlflow.pyfunc.save_model(str(path), **{**model_args(model_dir, SIDE, path.parent), **overrides})
    return mlflow.pyfunc.load_model(str(path), model_config={"serving_device": "cpu"})


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    return save(model_dir, tmp_path_factory.mktemp("saved") / "model")


def invoke(model, payload: dict) -> np.ndarray:
    """What `mlflow models serve` does with a JSON request body, without the HTTP server: parse it (with the model's
    input schema) and predict; the response's predictions as an array."""
    from mlflow.pyfunc import scoring_server

    response = scoring_server.invocations(json.dumps(payload), "application/json", model,
                                          model.metadata.get_input_schema())
    assert response.status == 200, response.response
    return np.array(json.loads(response.response)["predictions"], dtype=np.uint8)


# ---- reading the input ----------------------------------------------------------------------------------


def test_prompt_only_inputs_read_as_before():
    """The forms the model took before it read images, as predict receives them now (no input schema: as sent),
    as the scoring server parses their JSON, and as MLflow's one-column schema of older models hands them over."""
    from mlflow.models.utils import _enforce_schema
    from mlflow.pyfunc.scoring_server import infer_and_parse_data
    from mlflow.types.schema import ColSpec, Schema

    assert signature().inputs is None and "strength" in [p.name for p in signature().params.params]
    assert read_request(["a", ""]).prompts == ["a", ""] and read_request("a").prompts == ["a"]
    assert read_request(pd.DataFrame({0: ["a", "b"]})).prompts == ["a", "b"]  # an unnamed column
    assert read_request(pd.Series(["d"])).prompts == ["d"] and read_request(np.array(["a", "b"])).prompts == ["a", "b"]
    assert read_request({"prompt": ["a red circle", "a blue square"]}).prompts == ["a red circle", "a blue square"]
    assert read_request(["a", None]).prompts == ["a", ""]  # None: the unconditional model
    with pytest.warns(UserWarning, match=r"input columns \['x'\] are ignored"):
        assert read_request(pd.DataFrame({"x": [1], "prompt": ["c"]})).prompts == ["c"]
    for body in ({"inputs": ["a", "b"]}, {"instances": ["a", "b"]}, {"dataframe_split": {"data": [["a"], ["b"]]}},
                 {"dataframe_records": [{"prompt": "a"}, {"prompt": "b"}]}, {"inputs": {"prompt": ["a", "b"]}},
                 {"inputs": [{"prompt": "a"}, {"prompt": "b"}]}):
        assert read_request(infer_and_parse_data(body)).prompts == ["a", "b"], body
    none = infer_and_parse_data({"dataframe_split": {"columns": ["prompt"], "data": [[None]]}})
    assert read_request(none).prompts == [""]
    old = Schema([ColSpec("string")])  # a dict arrives as one row holding the list, a None as NaN
    for model_input in (["a", "b"], pd.Series(["a", "b"]), {"prompt": ["a", "b"]}):
        assert read_request(_enforce_schema(model_input, old)).prompts == ["a", "b"]
    assert read_request(_enforce_schema(["a", None], old)).prompts == ["a", ""]


def test_images_read_in_every_form_as_the_same_pixels():
    image, mask = gradient_image(), corner_mask(SIDE, 4)
    pixels, png = np.asarray(image), base64.b64decode(b64(image))
    # base64 text, as a data URL, wrapped in lines (as the base64 tool writes it); locally the bytes, PIL, an array
    # and the URL-safe alphabet, unpadded, as some clients send it (a text chunk of 0xff bytes, "////" in base64)
    info, buf = PngImagePlugin.PngInfo(), io.BytesIO()
    info.add_text("note", "\xff" * 12)
    image.save(buf, "PNG", pnginfo=info)
    url_safe = base64.urlsafe_b64encode(buf.getvalue()).decode().rstrip("=")
    assert "-" in url_safe or "_" in url_safe  # else this form would test nothing new
    forms = [b64(image), "data:image/png;base64," + b64(image), base64.encodebytes(png).decode(), url_safe, png, image,
             pixels]
    for form in forms:
        request = read_request({"prompt": "a red circle", "image": form})
        assert request.prompts == ["a red circle"] and request.masks is None
        assert len(request.images) == 1 and np.array_equal(np.asarray(request.images[0].convert("RGB")), pixels)
    request = read_request(pd.DataFrame({"prompt": PROMPTS, "image": [b64(image)] * 2, "mask": [mask, b64(mask)]}))
    assert request.prompts == PROMPTS and len(request.images) == 2
    assert all(np.array_equal(np.asarray(m), np.asarray(mask)) for m in request.masks)
    assert read_request({"prompt": PROMPTS, "image": [None, np.nan]}).images is None  # no image on any row


@pytest.mark.parametrize(("model_input", "column", "words"), [
    ({"prompt": PROMPTS, "image": ["iVBORw0KGgo", "not base64!"]}, "image", "row 1: not base64"),
    ({"prompt": PROMPTS, "image": [b64(gradient_image()), "bm90IGFuIGltYWdl"]}, "image",
     "row 2: its 12 bytes are not an image file Pillow reads"),
    ({"prompt": PROMPTS, "image": [b64(gradient_image()), "sketch.png"]}, "image",
     "row 2: not base64 (Only base64 data is allowed) (a served model reads no files"),
    ({"prompt": ["a"], "image": [b64(gradient_image())[:-40]]}, "image", "row 1: cannot read it as an image"),
    ({"prompt": ["a"], "image": [7]}, "image", "row 1: expected an image file's bytes, base64-encoded"),
    ({"prompt": ["a"], "image": [np.zeros((4, 4, 3), np.float32)]}, "image", "row 1: expected a uint8 array"),
    ({"prompt": PROMPTS, "image": [b64(gradient_image()), None]}, "image",
     "row 2 without one beside row 1 with one: give an image on every row or on none"),
    ({"prompt": PROMPTS, "image": [b64(gradient_image())] * 2, "mask": [None, b64(corner_mask(SIDE, 4))]}, "mask",
     "row 1 without one beside row 2 with one: give a mask on every row or on none"),
    ({"prompt": PROMPTS, "mask": [b64(corner_mask(SIDE, 4))] * 2}, "mask", "rows 1, 2: a mask needs an image"),
    ({"prompt": PROMPTS, "image": [None, b64(gradient_image())], "mask": [b64(corner_mask(SIDE, 4))] * 2}, "mask",
     "row 1: a mask needs an image on its row"),
    ({"prompt": PROMPTS, "image": [b64(gradient_image())]}, "image", "1 rows, the prompt column has 2"),
    ({"prompt": [PROMPTS], "image": [b64(gradient_image())]}, "prompt", "row 1: expected one prompt (a string)"),
    ({"image": [b64(gradient_image())]}, "prompt", "no prompt column"),
])
def test_bad_images_and_masks_are_refused_naming_the_row_and_column(model_input, column, words):
    with pytest.raises(SampleOptionError) as err:
        read_request(model_input)
    assert err.value.option == column and words in err.value.detail, err.value.detail


# ---- predict ----------------------------------------------------------------------------------------------


def test_predict_image_to_image_is_the_pipelines(served, pipe):
    images = [gradient_image(), other_image()]
    for strength in (0.5, 1.0):
        want = np.stack([np.asarray(im) for im in pipe(PROMPTS, image=images, strength=strength, progress=False,
                                                        num_images_per_prompt=2, **STEPS)])
        params = {**STEPS, "strength": strength, "num_images_per_prompt": 2}
        got = served.predict({"prompt": PROMPTS, "image": [b64(im) for im in images]}, params=params)
        assert got.shape == (4, SIDE, SIDE, 3) and np.array_equal(got, want)
        # Locally, PIL images and arrays in a DataFrame are read as their PNGs are.
        local = pd.DataFrame({"prompt": PROMPTS, "image": [images[0], np.asarray(images[1])]})
        assert np.array_equal(served.predict(local, params=params), want)
    # The image is used: text to image from the same seed differs.
    assert not np.array_equal(served.predict(PROMPTS, params=STEPS), served.predict(
        {"prompt": PROMPTS, "image": [b64(im) for im in images]}, params=STEPS))


def test_predict_inpainting_is_the_pipelines_and_warns_about_an_empty_mask(served, pipe):
    image, masks = gradient_image(), [corner_mask(SIDE, 8), Image.new("L", (SIDE, SIDE), 255)]
    want = pipe.generate(PROMPTS, image=image, mask_image=masks, strength=0.75, progress=False, **STEPS)
    request = {"prompt": PROMPTS, "image": [b64(image)] * 2, "mask": [b64(m) for m in masks]}
    got = served.predict(request, params={**STEPS, "strength": 0.75})
    assert np.array_equal(got, want)
    assert not np.array_equal(got, pipe.generate(PROMPTS, image=image, strength=0.75, progress=False, **STEPS))
    black = {**request, "mask": [b64(masks[0]), b64(Image.new("L", (SIDE, SIDE), 0))]}
    with pytest.warns(PromptWarning, match=r"^mask 2 has no white pixel"):
        served.predict(black, params=STEPS)


def test_base64_files_are_read_as_the_pipeline_reads_the_files(served, pipe, tmp_path):
    """A JPEG with an EXIF orientation and a 16-bit PNG mask, sent as base64, give what the pipeline gives for the
    same files by path (EXIF applied, 16 bits scaled: diffusion.input_images)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 clockwise to display
    gradient_image(24, 16).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    levels = np.zeros((SIDE, SIDE), np.uint16)
    levels[:, : SIDE // 2] = 40000  # white (>= 128 of 255 once scaled), but clipped to 255 it would all be white
    levels[:, SIDE // 2 :] = 200
    Image.fromarray(levels).save(tmp_path / "deep.png")  # mode I;16
    files = {name: base64.b64encode((tmp_path / name).read_bytes()).decode() for name in ("photo.jpg", "deep.png")}
    want = pipe.generate(PROMPTS[:1], image=tmp_path / "photo.jpg", mask_image=tmp_path / "deep.png", progress=False,
                         **STEPS)
    got = served.predict({"prompt": PROMPTS[:1], "image": files["photo.jpg"], "mask": files["deep.png"]}, params=STEPS)
    assert np.array_equal(got, want)


def test_predict_reports_bad_inputs_and_options_as_client_errors(served):
    """The scoring server returns an MlflowException's message with HTTP 400; any other exception as a generic
    "unexpected error", the reason buried in a stack trace."""
    from mlflow.exceptions import MlflowException

    image = b64(gradient_image())
    for model_input, params, words in (
        (["a red circle"], {"steps": 0}, r"steps: expected an integer in \[1, "),
        ({"prompt": PROMPTS, "image": [image, "%%%"]}, {}, r"image: row 2: not base64"),
        ({"prompt": ["a"], "mask": [image]}, {}, r"mask: row 1: a mask needs an image on its row"),
        ({"prompt": ["a"], "image": [image]}, {"strength": 0.0}, r"strength: "),
        ({"prompt": ["a"], "image": [image]}, {"strength": 1.5}, r"strength: "),
        ({"prompt": ["a"], "image": [image]}, {"steps": 2, "strength": 0.1}, r"strength: 0.1 of 2 steps runs int"),
    ):
        with pytest.raises(MlflowException, match=words) as err:
            served.predict(model_input, params={**STEPS, **params})
        assert err.value.get_http_status_code() == 400, err.value.message
    # Strength without an image warns, as the pipeline does, and samples text to image.
    with pytest.warns(PromptWarning, match="strength 0.5 has no effect without an input image"):
        assert np.array_equal(served.predict(PROMPTS, params={**STEPS, "strength": 0.5}),
                              served.predict(PROMPTS, params=STEPS))
    assert PARAMS["strength"] == 0.8


def test_the_scoring_servers_json_with_base64_images(served, pipe):
    images = [gradient_image(), other_image()]
    want = pipe.generate(PROMPTS, image=images, strength=0.5, progress=False, **STEPS)
    params = {**STEPS, "strength": 0.5}
    rows = [[p, b64(im)] for p, im in zip(PROMPTS, images, strict=True)]
    for body in (
        {"dataframe_split": {"columns": ["prompt", "image"], "data": rows}},
        {"dataframe_records": [{"prompt": p, "image": i} for p, i in rows]},
        {"inputs": {"prompt": PROMPTS, "image": [i for _, i in rows]}},
        {"inputs": [{"prompt": p, "image": i} for p, i in rows]},
    ):
        assert np.array_equal(invoke(served, {**body, "params": params}), want), list(body)
    masks = [b64(corner_mask(SIDE, 8))] * 2
    inpainted = pipe.generate(PROMPTS, image=images, mask_image=corner_mask(SIDE, 8), progress=False, **STEPS)
    body = {"dataframe_split": {"columns": ["prompt", "image", "mask"],
                                "data": [r + [m] for r, m in zip(rows, masks, strict=True)]}}
    assert np.array_equal(invoke(served, {**body, "params": STEPS}), inpainted)
    # The prompt-only request of before, unchanged.
    assert np.array_equal(invoke(served, {"inputs": PROMPTS, "params": STEPS}),
                          pipe.generate(PROMPTS, progress=False, **STEPS))


def test_the_scoring_server_answers_a_bad_image_with_400_naming_it(served):
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    body = {"dataframe_records": [{"prompt": "a", "image": b64(gradient_image())}, {"prompt": "b", "image": "a$b"}]}
    with pytest.raises(MlflowException, match=r"image: row 2: not base64") as err:
        scoring_server.invocations(json.dumps(body), "application/json", served, None)
    assert err.value.get_http_status_code() == 400


def test_a_model_with_the_older_one_column_signature_still_predicts(model_dir, pipe, tmp_path):
    """Models registered before images were read declare one unnamed string column (and no strength param)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, Schema

    params = ParamSchema([p for p in signature().params.params if p.name != "strength"])
    old = save(model_dir, tmp_path / "old", signature=ModelSignature(inputs=Schema([ColSpec("string")]),
                                                                       params=params))
    want = pipe.generate(PROMPTS, progress=False, **FAST)
    for model_input in (PROMPTS, pd.Series(PROMPTS), {"prompt": PROMPTS}, pd.DataFrame({"prompt": PROMPTS})):
        assert np.array_equal(old.predict(model_input, params=FAST), want)


# ---- registering ------------------------------------------------------------------------------------------


def test_pyfunc_registers_and_round_trips_in_a_fresh_process(model_dir, pipe, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from diffusion.evaluation.pyfunc import log_and_register
    from diffusion.tracking import stage_tags

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    # A named experiment with its artifacts beside the test's store: the default experiment's artifact root
    # is ./mlruns of the current folder, which put this model into the checkout's mlruns/.
    ensure_experiment("pyfunc-test")
    with mlflow.start_run() as run:
        uri = log_and_register(model_dir, "tiny-t2i", "champion")
    store = Path(os.environ["MLFLOW_TRACKING_URI"][len("sqlite:///"):]).parent
    assert mlflow.get_experiment(run.info.experiment_id).artifact_location == (store / "mlartifacts").resolve().as_uri()
    assert uri == "models:/tiny-t2i@champion"
    version = MlflowClient().get_model_version_by_alias("tiny-t2i", "champion")
    assert str(version.version) == "1" and version.run_id == run.info.run_id
    # The version says which commit (and DVC experiment, in one) it comes from, as its run's tags do.
    assert version.tags["git_commit"] == stage_tags("evaluate")["git_commit"] and "git_dirty" in version.tags

    params = {**FAST, "num_images_per_prompt": 1, "negative_prompt": "a green triangle", "guidance_rescale": 0.5}
    image = b64(gradient_image())
    out = tmp_path / "out.npz"
    code = (f"import mlflow, numpy as np; m = mlflow.pyfunc.load_model({uri!r}); "
            f"np.savez({str(out)!r}, t2i=m.predict({PROMPTS!r}, params={params!r}), "
            f"i2i=m.predict({{'prompt': {PROMPTS!r}, 'image': [{image!r}] * 2}}, params={params!r}))")
    # A fresh process in another folder: the model comes from the registry alone (model folder, code, config).
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    images = np.load(out)
    assert images["t2i"].shape == (2, SIDE, SIDE, 3) and images["t2i"].dtype == np.uint8
    opts = {"progress": False, "negative_prompt": "a green triangle", "guidance_rescale": 0.5, **FAST}
    assert np.array_equal(images["t2i"], pipe.generate(PROMPTS, **opts))
    assert np.array_equal(images["i2i"], pipe.generate(PROMPTS, image=gradient_image(), **opts))

    # Registering again (into the same run, by id, with no run active) makes version 2 and moves the alias.
    assert log_and_register(model_dir, "tiny-t2i", "champion", run_id=run.info.run_id) == uri
    moved = MlflowClient().get_model_version_by_alias("tiny-t2i", "champion")
    assert str(moved.version) == "2" and moved.run_id == run.info.run_id
