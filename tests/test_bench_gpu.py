"""The GPU benchmark scripts run unchanged on the GPU machine (issue 7): there the project is not installed
(no editable install, so ``diffusion`` is found only through the scripts' own ``sys.path`` set-up) and the
pipeline's packages (webdataset, mlflow, dvc) are absent. Each script runs here in a subprocess made like
that, with ``--smoke`` (tiny shapes on the CPU), and its printed figures are checked.

A script that imported ``diffusion`` before putting ``src/`` on the path failed only on the GPU machine,
costing a device run (2026-11-30); this is the check that would have caught it.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

pytest.importorskip("diffusers")

#: Run a script as the GPU machine would: without the editable install's import hook (the project's
#: modules must come from the script's own sys.path entries) and without the pipeline-only packages.
BOOT = r"""
import importlib.abc, runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in type(f).__module__]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
for name in [m for m in sys.modules if m.split(".")[0] in ("diffusion", "pipeline")]:
    del sys.modules[name]

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("diffusion", "pipeline") and SRC not in sys.path:
            raise ImportError(f"{name}: not installed on the GPU machine")
        if name.split(".")[0] in ("webdataset", "mlflow", "dvc"):
            raise ImportError(f"{name}: not on the GPU machine")

sys.meta_path.insert(0, Absent())
SRC, script, *sys.argv[1:] = sys.argv[1:]
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""


def run_script(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", BOOT, str(ROOT / "src"), *args], cwd="/", env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_gpu_bench_runs_unchanged_without_the_project_installed():
    out = run_script(str(ROOT / "bench/gpu.py"), "--smoke", "--cpu", "--budget", "120",
                     "--only", "train (DiT-B/2 adaLN-single|PixArt \\(DiT-B/2 size\\)) eager")
    counted, closed = map(float, re.search(r"counter ([\d.e+]+), closed form ([\d.e+]+)", out).groups())
    assert counted == pytest.approx(closed, rel=1e-6)  # the MFU formula's closed form matches the counter
    rows = re.findall(r"^train (DiT-B/2 adaLN-single|PixArt \(DiT-B/2 size\)) eager.*?\s([\d.]+)\s+[\d.]+\s+-",
                      out, re.M)
    assert len(rows) == 2 and all(float(step_ms) > 0 for _, step_ms in rows), out
    assert "ERROR" not in out
    assert re.search(r"ratio train DiT-B/2 adaLN-single eager / train PixArt .*: [\d.]+x", out)


def test_gpu_kernel_profile_runs_unchanged_without_the_project_installed():
    out = run_script(str(ROOT / "bench/gpu_kernels.py"), "--smoke", "--top", "3")
    table = dict(re.findall(r"^(matmul|total)\s+([\d.]+)\s+[\d.]+", out, re.M))
    assert set(table) == {"matmul", "total"}, out
    assert 0 < float(table["matmul"]) < float(table["total"])
    # The patch embedding is a matrix product now: no convolution in ours (PixArt's conv stays).
    conv = re.search(r"^convolution\s+([\d.]+)\s+([\d.]+)", out, re.M)
    assert conv and float(conv.group(1)) == 0 and float(conv.group(2)) > 0, out


def test_gpu_profile_fit_check_runs_unchanged_without_the_project_installed():
    """bench/gpu_profile.py: every GPU stage's step at the profile's full-size networks (batch 2, 64 px here)."""
    out = run_script(str(ROOT / "bench/gpu_profile.py"), "--smoke")
    rows = json.loads(out.strip().splitlines()[-1])
    items = [re.sub(r" \d+M ", " ", r["item"]) for r in rows]
    assert items == ["train_vae (bf16-mixed)", "encode_latents (fp32)", "train dit (eager)",
                     "evaluate dit: 2x denoise + decode", "train unet (eager)", "evaluate unet: 2x denoise + decode"], out
    assert all(r["batch"] == 2 and r["step_ms"] > 0 and not r.get("oom") for r in rows), rows
    # the profile's DiT-B/2 and its U-Net are built at full size even at the smoke batch
    sizes = [int(m) for m in re.findall(r"^train (?:dit|unet) (\d+)M", out, re.M)]
    assert len(sizes) == 2 and min(sizes) > 100, out
