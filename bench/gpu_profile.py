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

from diffusion.config import load_section  # noqa: E402
from diffusion.stage_configs import EncodeLatentsConfig, EvaluateConfig, TrainConfig, TrainVAEConfig  # noqa: E402


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
    side = 64 if a.smoke else 256  # the profile's shard.resolution
    f = vae_cfg.model.downsample_factor
    shrink = (lambda b: 2) if a.smoke else (lambda b: b)
    warmup, steps = (1, 1) if a.smoke else (a.warmup, a.steps)
    from diffusion.training.trainer import resolve_precision

    # The stages' precision as their Trainer resolves it ("auto": bf16 where it is fast).
    amp = (lambda prec: torch.autocast(device.type, dtype=torch.bfloat16,
                                       enabled=resolve_precision(prec, device.type) == "bf16-mixed"))
    rows = []
    print(f"profile {a.profile} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}", flush=True)

    def record(row: dict) -> None:
        rows.append(row)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "gpu_profile.json").write_text(json.dumps(rows, indent=1))

    # ---- train_vae ----
    from diffusion.training.vae_system import VAESystem

    system = VAESystem(vae_cfg).to(device)
    opt = system.configure_optimizers()["optimizer"]
    for b in [shrink(vae_cfg.batch_size), *(() if a.smoke else a.vae_batches)]:
        fresh(device)
        x = torch.rand(b, 3, side, side, device=device) * 2 - 1

        def vae_step() -> None:
            with amp(vae_cfg.precision):
                recon, posterior = system.vae(x)
            loss = system.reconstruction_losses(x, recon, posterior)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        record(measure(f"train_vae ({vae_cfg.precision})", b, vae_step, warmup, steps, device))
        opt.zero_grad(set_to_none=True)
        del x
    vae = system.vae.eval().requires_grad_(False)
    del system, opt

    # ---- encode_latents ----
    fresh(device)
    b = shrink(enc.batch_size)
    x = torch.rand(b, 3, side, side, device=device) * 2 - 1

    def encode_step() -> None:
        with torch.no_grad():
            vae.encode(x)

    record(measure("encode_latents (fp32)", b, encode_step, warmup, steps, device))
    del x

    # ---- train: both denoisers ----
    from diffusion.models import LatentDiffusionModel
    from diffusion.scheduler import DDPMScheduler
    from diffusion.training.diffusion_system import DiffusionSystem, OptimSettings

    compiles = [False] + ([True] if train.compile and not a.no_compile and not a.smoke else [])
    latent = (vae_cfg.model.latent_dim, side // f, side // f)
    def evaluate_row(kind: str, model: torch.nn.Module) -> dict:
        """evaluate: one guided denoiser forward (2 x batch rows) and the float32 VAE decode, as evaluate runs them."""
        fresh(device)
        b = shrink(ev.batch_size)
        z, tokens = torch.randn(2 * b, *latent, device=device), torch.randint(4, 1000, (2 * b, 32), device=device)
        t = torch.full((2 * b,), 500, device=device)

        def eval_step() -> None:
            with torch.no_grad():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    model(z, t, tokens)
                vae.decode(z[:b])

        return measure(f"evaluate {kind}: 2x denoise + decode", b, eval_step, warmup, steps, device)

    for kind in ("dit", "unet"):
        cfg = train.replace(denoising_type=kind)
        for compiled in compiles:
            fresh(device)
            model = LatentDiffusionModel(vocab_size=1000, denoising_type=kind, text_encoder=cfg.text_encoder,
                                         vae=vae_cfg.model, denoiser=cfg.denoiser_config()).to(device)
            dsys = DiffusionSystem(model, DDPMScheduler.from_config(cfg.scheduler).to(device),
                                   OptimSettings(lr=cfg.lr, weight_decay=cfg.weight_decay), compile_denoiser=compiled)
            opt = dsys.configure_optimizers()["optimizer"]
            b = shrink(cfg.batch_size)
            z, tokens = torch.randn(b, *latent, device=device), torch.randint(4, 1000, (b, 32), device=device)

            def train_step() -> None:
                with amp(cfg.precision):
                    loss = dsys.diffusion_loss(z, tokens)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            params = sum(q.numel() for q in model.denoiser.parameters()) / 1e6
            label = f"train {kind} {params:.0f}M ({'compiled' if compiled else 'eager'})"
            record(measure(label, b, train_step, warmup, steps, device))
            opt.zero_grad(set_to_none=True)
            del dsys, opt, z, tokens
            if not compiled:
                record(evaluate_row(kind, model.eval()))
            del model

    print(json.dumps(rows))


if __name__ == "__main__":
    main()
