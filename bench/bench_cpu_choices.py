"""Implementation choices of the pipeline against their alternatives, on the CPU (a script that prints, not a
test).

* **VAE memory layout**: ``AutoencoderKL`` runs its towers in NHWC (channels_last) on a CPU
  (``diffusion.models.vae._cpu_channels_last``). Measured against NCHW: encode (encode_latents' batch), decode
  (evaluate's batch) and one training step (train_vae's batch, L1 + KL, AdamW), the VAE of ``params.yaml``.
* **DiT activation**: ``train.dit.mlp_activation: gelu`` (exact, erf) against ``gelu_tanh`` (DiT's and PixArt's
  tanh approximation): one training step of the train stage (text encoder + DiT, ``DiffusionSystem``) and one
  guided-sampling forward (2 x 50 rows), the networks of ``params.yaml``.
* **DiT inference paths** (sampling in evaluate, in the training grids and in ``cli sample``): the feed-forward's
  first linear and GELU as one oneDNN product with the GELU fused (``layers._cpu_linear_gelu``) against
  ``F.linear`` then ``F.gelu``; and the text's cross-attention keys and values reused from the run's first
  step (``layers.reuse_text_keys_values``, as ``LatentDiffusionModel.generate`` samples) against projected at
  every step. One guided forward of evaluate's batch (2 x 50 rows) each.
* **EMA update**: ``training.callbacks.EMA`` (torch's foreach ``_foreach_lerp_`` over every tensor) against
  Lightning's ``EMAWeightAveraging`` as it comes (a per-tensor average, three kernels per tensor), over the
  train stage's whole system (text encoder, DiT, frozen VAE: what the callback averages).

Both sides of each pair run in one process, alternated step by step; the figure is the median, and the ratio
(alternative / chosen, above 1: the chosen one is faster) is what to read on a shared machine.

    python bench/bench_cpu_choices.py                # ~40 s on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import diffusion.models.layers as layers  # noqa: E402
import diffusion.models.vae as vae_module  # noqa: E402
from diffusion.params import load_section  # noqa: E402
from diffusion.models import LatentDiffusionModel  # noqa: E402
from diffusion.scheduler import DDPMScheduler  # noqa: E402
from diffusion.eval_configs import EvaluateConfig  # noqa: E402
from diffusion.data_configs import EncodeLatentsConfig
from diffusion.stage_configs import TrainConfig, TrainVAEConfig  # noqa: E402
from diffusion.training.diffusion_system import DiffusionSystem, OptimSettings  # noqa: E402
from diffusion.training.vae_system import VAESystem  # noqa: E402


def alternate(fns: dict[str, Callable[[], None]], warmup: int, steps: int) -> dict[str, float]:
    """Median seconds of each function, called in turn `warmup` + `steps` times."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def report(title: str, chosen: str, medians: dict[str, float]) -> None:
    other = next(name for name in medians if name != chosen)
    print(f"{title:34s} {chosen} {medians[chosen] * 1e3:7.1f} ms   {other} {medians[other] * 1e3:7.1f} ms   "
          f"ratio {medians[other] / medians[chosen]:.2f}x", flush=True)


def vae_layout(args: argparse.Namespace, params: Path) -> None:
    nhwc = vae_module._cpu_channels_last
    layouts = {"NHWC": nhwc, "NCHW": lambda x: x}
    vae_cfg = load_section(TrainVAEConfig, params)
    enc, ev = load_section(EncodeLatentsConfig, params), load_section(EvaluateConfig, params)
    side = args.image_size
    f = vae_cfg.model.downsample_factor
    torch.manual_seed(0)
    vae = vae_module.AutoencoderKL(vae_cfg.model).eval()
    x = torch.rand(enc.batch_size, 3, side, side) * 2 - 1
    z = torch.randn(ev.batch_size, vae_cfg.model.latent_dim, side // f, side // f)

    def timed(layout: str, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            vae_module._cpu_channels_last = layouts[layout]
            fn()
        return run

    try:
        with torch.inference_mode():
            report(f"VAE encode, batch {enc.batch_size}", "NHWC", alternate(
                {k: timed(k, lambda: vae.encode(x).mode()) for k in layouts}, args.warmup, args.steps))
            report(f"VAE decode, batch {ev.batch_size}", "NHWC", alternate(
                {k: timed(k, lambda: vae.decode(z)) for k in layouts}, args.warmup, args.steps))
        xb = torch.rand(vae_cfg.batch_size, 3, side, side) * 2 - 1
        steps = {}
        for layout in layouts:
            torch.manual_seed(0)
            system = VAESystem(vae_cfg)
            opt = system.configure_optimizers()["optimizer"]

            def step(system=system, opt=opt) -> None:
                recon, posterior = system.vae(xb)
                loss = system.reconstruction_losses(xb, recon, posterior)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            steps[layout] = timed(layout, step)
        report(f"VAE training step, batch {vae_cfg.batch_size}", "NHWC", alternate(steps, args.warmup, args.steps))
    finally:
        vae_module._cpu_channels_last = nhwc


def train_system(cfg: TrainConfig, vae_cfg: TrainVAEConfig, denoiser) -> DiffusionSystem:
    """The train stage's LightningModule (text encoder, denoiser, frozen VAE) for `denoiser`, seeded."""
    torch.manual_seed(0)
    model = LatentDiffusionModel(vocab_size=1000, denoising_type=cfg.denoising_type, text_encoder=cfg.text_encoder,
                                 vae=vae_cfg.model, denoiser=denoiser)
    return DiffusionSystem(model, DDPMScheduler.from_config(cfg.scheduler),
                           OptimSettings(lr=cfg.lr, weight_decay=cfg.weight_decay))


def guided_forward_inputs(args: argparse.Namespace, vae_cfg: TrainVAEConfig,
                          cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents (2B, C, h, h), timesteps (2B,) and 32-token text states (2B, 32, width) of one guided forward
    of evaluate's batch B (doubled by guidance)."""
    h = args.image_size // vae_cfg.model.downsample_factor
    rows = 2 * 50  # evaluate's batch, doubled by guidance
    return (torch.randn(rows, vae_cfg.model.latent_dim, h, h), torch.full((rows,), 500),
            torch.randn(rows, 32, cfg.text_encoder.width))


def dit_activation(args: argparse.Namespace, params: Path) -> None:
    vae_cfg, cfg = load_section(TrainVAEConfig, params), load_section(TrainConfig, params)
    chosen = cfg.dit.mlp_activation
    other = "gelu_tanh" if chosen == "gelu" else "gelu"
    h = args.image_size // vae_cfg.model.downsample_factor
    z = torch.randn(cfg.batch_size, vae_cfg.model.latent_dim, h, h)
    tokens = torch.randint(4, 1000, (cfg.batch_size, 32))
    xs, t, ctx = guided_forward_inputs(args, vae_cfg, cfg)
    train, forward = {}, {}
    for act in (chosen, other):
        dit = cfg.replace(denoising_type="dit")
        system = train_system(dit, vae_cfg, dit.denoiser_config().replace(mlp_activation=act))
        model = system.model
        opt = system.configure_optimizers()["optimizer"]

        def step(system=system, opt=opt) -> None:
            loss = system.diffusion_loss(z, tokens)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        train[act] = step

        @torch.inference_mode()
        def fwd(denoiser=model.denoiser.eval()) -> None:
            denoiser(xs, t, ctx)

        forward[act] = fwd
    report(f"DiT+text training step, batch {cfg.batch_size}", chosen, alternate(train, args.warmup, args.steps))
    report("DiT guided forward, 2 x 50 rows", chosen, alternate(forward, args.warmup, args.steps))


def dit_inference(args: argparse.Namespace, params: Path) -> None:
    """The fused linear + GELU, and the reused text keys and values, each against its absence."""
    vae_cfg, cfg = load_section(TrainVAEConfig, params), load_section(TrainConfig, params)
    dit = cfg.replace(denoising_type="dit")
    denoiser = train_system(dit, vae_cfg, dit.denoiser_config()).model.denoiser.eval()
    xs, t, ctx = guided_forward_inputs(args, vae_cfg, cfg)
    fused = layers._linear_pointwise

    def forward(op) -> Callable[[], None]:
        def run() -> None:
            layers._linear_pointwise = op
            denoiser(xs, t, ctx)
        return run

    try:
        with torch.inference_mode():
            report("DiT guided forward: linear+GELU", "fused", alternate(
                {"fused": forward(fused), "separate": forward(None)}, args.warmup, args.steps))
            reusing = copy.deepcopy(denoiser)
            with layers.reuse_text_keys_values(reusing):  # the first call projects, the timed ones reuse
                report("DiT guided forward: text k/v", "reused", alternate(
                    {"reused": lambda: reusing(xs, t, ctx), "per step": lambda: denoiser(xs, t, ctx)},
                    args.warmup, args.steps))
    finally:
        layers._linear_pointwise = fused


def ema_update(args: argparse.Namespace, params: Path) -> None:
    """One EMA update of the train stage's system, as the two callbacks build their AveragedModel."""
    vae_cfg, cfg = load_section(TrainVAEConfig, params), load_section(TrainConfig, params)
    system = train_system(cfg, vae_cfg, cfg.denoiser_config())
    averages = {"foreach": AveragedModel(system, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True),
                "per-tensor": AveragedModel(system, avg_fn=get_ema_avg_fn(cfg.ema_decay), use_buffers=True)}
    for average in averages.values():
        average.update_parameters(system)  # the first update copies; the timed ones average
    tensors = len(list(system.parameters())) + len(list(system.buffers()))
    report(f"EMA update, {tensors} tensors", "foreach", alternate(
        {k: (lambda a=a: a.update_parameters(system)) for k, a in averages.items()}, args.warmup, args.steps))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--image-size", type=int, default=None, help="image side (default: params.yaml shard.resolution)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    params = ROOT / "params.yaml"
    if args.image_size is None:
        from diffusion.data_configs import ShardConfig

        args.image_size = load_section(ShardConfig, params).resolution
    print(f"torch {torch.__version__}, {args.threads} threads, params.yaml networks, {args.image_size} px; "
          f"median of {args.steps} alternated steps after {args.warmup}")
    vae_layout(args, params)
    dit_activation(args, params)
    dit_inference(args, params)
    ema_update(args, params)


if __name__ == "__main__":
    main()
