"""Does a profile's batch sizes fit this GPU? Peak memory and step time of each GPU stage, read from the profile.

    python bench/gpu_profile.py                      # profiles/gpu.yaml on this machine's GPU
    python bench/gpu_profile.py --smoke              # batch 2 and 64 px on whatever device is here (checks the script)

A script that prints (not a test). Each item runs the stage's own code path at the profile's batch size,
without data loading: random images or latents, the profile's networks, its precision.

  train_vae        VAESystem's reconstruction loss, backward, AdamW step      (train_vae.batch_size, 256 px)
  train <kind>     DiffusionSystem.diffusion_loss, backward, fused AdamW step  (train.batch_size, latents)
                   for the DiT and the U-Net, eager and (train.compile) compiled
  encode_latents   VAE encode, float32, no gradients                          (encode_latents.batch_size)
  evaluate         one guided denoiser forward (2 x batch) and the VAE decode  (evaluate.batch_size)

Peak memory is ``torch.cuda.max_memory_allocated`` from the item's start (weights, gradients, optimizer state,
activations; the caching allocator reserves a little more); step time is the mean of ``--steps`` steps after
``--warmup``, by CUDA events. With $OUT set, the table goes to $OUT/gpu_profile.json as well.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the GPU machine may have no editable install

from diffusion.data_configs import EncodeLatentsConfig  # noqa: E402
from diffusion.eval_configs import EvaluateConfig  # noqa: E402
from diffusion.params import load_section  # noqa: E402
from diffusion.stage_configs import TrainConfig, TrainVAEConfig  # noqa: E402


def measure(name: str, batch: int, step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> dict:
    """Run `step` warmup + steps times; time the last `steps` and record the peak memory."""
    t0 = time.time()
    try:
        for _ in range(warmup):
            step()
    except torch.cuda.OutOfMemoryError:
        print(f"{name:36s} batch {batch:4d}  out of memory", flush=True)
        return {"item": name, "batch": batch, "oom": True}
    first = time.time() - t0
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t1 = time.time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / steps
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        ms, peak = (time.time() - t1) * 1000 / steps, float("nan")
    row = {"item": name, "batch": batch, "step_ms": round(ms, 1), "samples_per_s": round(batch * 1000 / ms, 1),
           "peak_gib": round(peak, 1), "warmup_s": round(first, 1)}
    print(f"{name:36s} batch {batch:4d}  {ms:8.1f} ms/step  {row['samples_per_s']:8.1f} samples/s  "
          f"peak {peak:5.1f} GiB  (warm-up {first:.1f} s)", flush=True)
    return row


def fresh(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Run:
    """What every item shares: the device, the step counts, the ``--smoke`` shrink, the rows so far."""

    def __init__(self, a: argparse.Namespace, device: torch.device) -> None:
        self.device, self.smoke = device, a.smoke
        self.warmup, self.steps = (1, 1) if a.smoke else (a.warmup, a.steps)
        self.side = 64 if a.smoke else 256  # the profile's shard.resolution
        self.rows: list[dict] = []

    def batch(self, b: int) -> int:
        return 2 if self.smoke else b

    def amp(self, precision: str | int):
        """The stage's precision as its Trainer resolves it ("auto": bf16 where it is fast)."""
        from diffusion.training.trainer import resolve_precision

        bf16 = resolve_precision(precision, self.device.type) == "bf16-mixed"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def measure(self, name: str, batch: int, step: Callable[[], None]) -> None:
        """Time `step` (see :func:`measure`) and keep the row, in $OUT/gpu_profile.json too where $OUT is set."""
        self.rows.append(measure(name, batch, step, self.warmup, self.steps, self.device))
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "gpu_profile.json").write_text(json.dumps(self.rows, indent=1))


def train_vae_rows(run: Run, vae_cfg: TrainVAEConfig, extra_batches: list[int]) -> torch.nn.Module:
    """train_vae at the profile's batch (and `extra_batches`); returns the VAE, frozen, for the later items."""
    from diffusion.training.vae_system import VAESystem

    system = VAESystem(vae_cfg).to(run.device)
    opt = system.configure_optimizers()["optimizer"]
    for b in [run.batch(vae_cfg.batch_size), *(() if run.smoke else extra_batches)]:
        fresh(run.device)
        x = torch.rand(b, 3, run.side, run.side, device=run.device) * 2 - 1

        def vae_step() -> None:
            with run.amp(vae_cfg.precision):
                recon, posterior = system.vae(x)
            loss = system.reconstruction_losses(x, recon, posterior)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        run.measure(f"train_vae ({vae_cfg.precision})", b, vae_step)
        opt.zero_grad(set_to_none=True)
        del x
    return system.vae.eval().requires_grad_(False)


def encode_row(run: Run, vae: torch.nn.Module, enc: EncodeLatentsConfig) -> None:
    """encode_latents: the VAE encode in float32 without gradients, as the stage runs it."""
    fresh(run.device)
    b = run.batch(enc.batch_size)
    x = torch.rand(b, 3, run.side, run.side, device=run.device) * 2 - 1

    def encode_step() -> None:
        with torch.no_grad():
            vae.encode(x)

    run.measure("encode_latents (fp32)", b, encode_step)


def evaluate_row(run: Run, kind: str, model: torch.nn.Module, vae: torch.nn.Module, ev: EvaluateConfig,
                 latent: tuple[int, int, int]) -> None:
    """evaluate: one guided denoiser forward (2 x batch rows) and the float32 VAE decode, as evaluate runs them."""
    fresh(run.device)
    b = run.batch(ev.batch_size)
    z, tokens = torch.randn(2 * b, *latent, device=run.device), torch.randint(4, 1000, (2 * b, 32), device=run.device)
    t = torch.full((2 * b,), 500, device=run.device)

    def eval_step() -> None:
        with torch.no_grad():
            with torch.autocast(run.device.type, dtype=torch.bfloat16):
                model(z, t, tokens)
            vae.decode(z[:b])

    run.measure(f"evaluate {kind}: 2x denoise + decode", b, eval_step)


def denoiser_rows(run: Run, vae: torch.nn.Module, vae_cfg: TrainVAEConfig, train: TrainConfig, ev: EvaluateConfig,
                  compile_: bool) -> None:
    """train (eager, and compiled with `compile_`) and evaluate, for the DiT and the U-Net of the profile."""
    from diffusion.models import LatentDiffusionModel
    from diffusion.scheduler import DDPMScheduler
    from diffusion.training.diffusion_system import DiffusionSystem, OptimSettings

    latent = (vae_cfg.model.latent_dim, run.side // vae_cfg.model.downsample_factor,
              run.side // vae_cfg.model.downsample_factor)
    for kind in ("dit", "unet"):
        cfg = train.replace(denoising_type=kind)
        for compiled in (False, True) if compile_ else (False,):
            fresh(run.device)
            model = LatentDiffusionModel(vocab_size=1000, denoising_type=kind, text_encoder=cfg.text_encoder,
                                         vae=vae_cfg.model, denoiser=cfg.denoiser_config()).to(run.device)
            dsys = DiffusionSystem(model, DDPMScheduler.from_config(cfg.scheduler).to(run.device),
                                   OptimSettings(lr=cfg.lr, weight_decay=cfg.weight_decay), compile_denoiser=compiled)
            opt = dsys.configure_optimizers()["optimizer"]
            b = run.batch(cfg.batch_size)
            z = torch.randn(b, *latent, device=run.device)
            tokens = torch.randint(4, 1000, (b, 32), device=run.device)

            def train_step() -> None:
                with run.amp(cfg.precision):
                    loss = dsys.diffusion_loss(z, tokens)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            params = sum(q.numel() for q in model.denoiser.parameters()) / 1e6
            run.measure(f"train {kind} {params:.0f}M ({'compiled' if compiled else 'eager'})", b, train_step)
            opt.zero_grad(set_to_none=True)
            del dsys, opt, z, tokens
            if not compiled:
                evaluate_row(run, kind, model.eval(), vae, ev, latent)
            del model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="gpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled training rows")
    p.add_argument("--vae-batches", type=int, nargs="*", default=[],
                   help="train_vae batch sizes to try besides the profile's (to see the headroom)")
    p.add_argument("--smoke", action="store_true", help="batch 2, 64 px images (8x8 latents), 1+1 steps, no compile")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params, sets = ROOT / "params.yaml", [f"profile={a.profile}"]
    vae_cfg, train = load_section(TrainVAEConfig, params, sets), load_section(TrainConfig, params, sets)
    enc, ev = load_section(EncodeLatentsConfig, params, sets), load_section(EvaluateConfig, params, sets)
    print(f"profile {a.profile} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}", flush=True)
    run = Run(a, device)
    vae = train_vae_rows(run, vae_cfg, a.vae_batches)
    encode_row(run, vae, enc)
    denoiser_rows(run, vae, vae_cfg, train, ev, compile_=train.compile and not a.no_compile and not a.smoke)
    print(json.dumps(run.rows))


if __name__ == "__main__":
    main()
