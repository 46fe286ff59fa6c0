"""Shared test setup: offline, quiet, single-threaded, and never touching the project's own outputs."""

import contextlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("DVC_NO_ANALYTICS", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path_factory, monkeypatch):
    """Every test gets its own MLflow store, so no test writes to the repository's mlflow.db."""
    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    _reset_mlflow_globals()
    yield
    _reset_mlflow_globals()
    # mlflow.set_experiment also exports MLFLOW_EXPERIMENT_ID, which would point the next test's runs at an
    # experiment id of a store that no longer exists.
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def _reset_mlflow_globals():
    """MLflow's fluent API keeps the active experiment and tracking URI in module globals; a test that set
    them must not leave them pointing into another test's (deleted) store."""
    if "mlflow" not in sys.modules:
        return
    import mlflow
    from mlflow.tracking import fluent

    while mlflow.active_run() is not None:
        mlflow.end_run()
    fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    if "MLFLOW_TRACKING_URI" in os.environ:
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])


@pytest.fixture
def cli_env(tmp_path):
    """Environment for running `python cli.py` in a subprocess from a temporary working folder."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture
def env(cli_env) -> dict:
    """`cli_env` with one OpenMP thread, for the sampling commands of tiny models (test_sample, test_img2img,
    test_inpaint): on a loaded 2-core machine two threads spin against each other, and a call that takes
    milliseconds takes seconds."""
    return {**cli_env, "OMP_NUM_THREADS": "1"}


def broken_model_dir(model_dir: Path, root: Path) -> Path:
    """A copy of `model_dir` with garbage weights: a command that loaded them before checking its options would
    fail about model.pt instead of naming the option."""
    broken = root / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "train_config.json"):
        (broken / name).write_bytes((model_dir / name).read_bytes())
    (broken / "model.pt").write_bytes(b"not a checkpoint")
    return broken


def run_cli(args, cwd, env, check=True):
    """Run `python <repo>/cli.py ARGS` in `cwd`; return the CompletedProcess (text output)."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"cli {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def one_thread():
    """One torch thread in this process for the test: on a busy 2-core machine two OpenMP threads spin against
    each other (and against helper processes such as curl or a server), and a tiny run takes many times longer."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, request):
    """A tiny trained-stage model folder (``test_sample.make_model_dir``), one per test module."""
    from test_sample import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_")))


@pytest.fixture(scope="module")
def pipe(model_dir):
    """The pipeline of `model_dir`, on the CPU."""
    from diffusion.pipeline_model import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(model_dir, device="cpu")

def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it; a tiny race with other processes is accepted)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_folder(folder):
    """Serve `folder` over HTTP on 127.0.0.1 from a thread of this process; yields the base URL. Stands in
    for object storage or a web server holding shards (WebDataset fetches http(s) URLs with curl)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):  # one line per request on stderr would drown the test output
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def shapes_images(n: int, split: str, resolution: int = 32, seed: int = 0):
    """`n` images of the built-in dataset (level single), in memory, as the shard stage would write them: a
    ``diffusion.evaluation.judge.LabelledImages``."""
    import numpy as np
    import torch

    from diffusion.data.in_memory import LabelledImages
    from diffusion.data.shapes import generate_shapes
    from diffusion.data_configs import ShapesConfig

    cfg = ShapesConfig(num_train=n, num_val=n)
    samples = list(generate_shapes(cfg, split, resolution, seed))
    images = torch.stack([torch.from_numpy(np.array(s.image)).permute(2, 0, 1) for s in samples])  # (N, 3, H, W)
    return LabelledImages(images, [s.meta["attributes"] for s in samples],
                          torch.zeros(n, dtype=torch.bool), [s.caption for s in samples])
