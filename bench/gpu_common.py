"""What bench/gpu.py and bench/gpu_kernels.py share: the profile's networks as the train stage builds them,
the training step they time (bf16 autocast, fused AdamW on a GPU), FLOP counts for MFU, the chips' peaks,
``torch.compile`` whole or per block, a device timer, and gpu.py's flags (gpu_kernels.py adds its own). See
bench/gpu.py for what is measured and how.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the GPU machine has no editable install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pairs import call  # noqa: E402
from diffusion.params import load_section  # noqa: E402
from diffusion.models import DIT_PRESETS  # noqa: E402
from diffusion.models.dit import DiTConfig  # noqa: E402
from diffusion.models.unet import UNetConfig  # noqa: E402
from diffusion.stage_configs import TrainConfig  # noqa: E402

#: Dense bf16 tensor-core peaks (vendor datasheets, without sparsity), matched against the device name, first
#: match wins: the PCIe and NVL variants before the SXM parts whose names they contain.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
             "A100": 312e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def has_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 (any import failure means: run without the references)
        return False


def dit_forward_flops(cfg: DiTConfig, size: int, text_len: int) -> float:
    """Closed-form forward FLOPs per sample of our DiT (matrix products only; see docs/performance.md)."""
    D, p, C, T, Cc = cfg.hidden_size, cfg.patch_size, cfg.in_channels, text_len, cfg.context_dim
    N, H = (size // p) ** 2, int(D * cfg.mlp_ratio)
    block = (2 * N * D * 3 * D + 4 * N * N * D + 2 * N * D * D          # self-attention: qkv, QK^T and AV, out
             + 2 * N * D * D + 2 * T * Cc * 2 * D + 4 * N * T * D + 2 * N * D * D  # cross: q, kv, products, out
             + 2 * 2 * N * D * H                                          # MLP
             + (0 if cfg.adaln_single else 2 * D * 6 * D))                # adaLN projection (once per sample)
    embed = 2 * N * p * p * C * D + 2 * N * D * p * p * cfg.out_channels  # patchify, final linear
    cond = 2 * (256 * D + D * D) + 2 * Cc * D + (2 * D * 6 * D if cfg.adaln_single else 2 * D * 2 * D)
    return cfg.depth * block + embed + cond


def counted_forward_flops(net, batch: dict, device: str) -> float:
    """Forward FLOPs per sample by torch.utils.flop_counter over one sample, SDPA through its math path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    one = {k: v[:1] for k, v in batch.items()}
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), autocast(device), FlopCounterMode(display=False) as fc:
        call(net, one)
    return float(fc.get_total_flops())


def autocast(device: str):
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def train_step(model: torch.nn.Module, net, batch: dict, device: str):
    """One bf16-mixed training step of `model` through its adapter `net`, as a closure: autocast forward,
    float32 MSE, backward, AdamW (fused on a GPU, for ours and diffusers' alike)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")

    def step() -> None:
        with autocast(device):
            out = call(net, batch)
        loss = F.mse_loss(out.float(), batch["target"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def compiled(model: torch.nn.Module, mode: str = "default", regional: bool = False) -> torch.nn.Module:
    """``torch.compile`` of the whole model, or with `regional` of each transformer block in place (ours:
    ``blocks``, diffusers': ``transformer_blocks``; "regional compilation" in PyTorch's recipes). The blocks
    share one code object and their shapes, so the compiled graph is reused by every block: one block's
    compilation instead of the whole network's, at the cost of no fusion across block boundaries."""
    if not regional:
        return torch.compile(model, mode=mode)
    blocks = getattr(model, "blocks", None) or getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise ValueError(f"--regional: {type(model).__name__} has no blocks or transformer_blocks to compile")
    for block in blocks:
        block.compile(mode=mode)
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Seconds of device work between start() and stop(): CUDA events on a GPU, a host clock elsewhere."""

    def __init__(self, device: str) -> None:
        self.device = device

    def start(self) -> None:
        sync(self.device)
        if self.device == "cuda":
            self.t0, self.t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.t0.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.device == "cuda":
            self.t1.record()
            torch.cuda.synchronize()
            return self.t0.elapsed_time(self.t1) / 1e3
        return time.perf_counter() - self.t0


def profile_train(args: argparse.Namespace) -> TrainConfig:
    """The profile's ``train`` section as the train stage reads it: params.yaml <- profiles/<profile>.yaml <- -S."""
    return load_section(TrainConfig, ROOT / "params.yaml", [f"profile={args.profile}", *args.set])


def unet_profile(args: argparse.Namespace) -> UNetConfig:
    """The profile's U-Net (``train.unet``; for ``gpu``: widths 192/384/576, 2 ResBlocks a level, transformers
    with 64-channel heads at the two lower levels and in the middle), on 4-channel latents and text states
    ``--context-dim`` wide (the profile's text encoder width), as LatentDiffusionModel sets them.
    ``--smoke``: widths 16/32/48, 16-channel heads, 8 groups."""
    over = {"base_channels": 16, "head_dim": 16, "norm_groups": 8} if args.smoke else {}
    return profile_train(args).unet.replace(in_channels=4, out_channels=4, context_dim=args.context_dim, **over)


def dit_profile(name: str, args: argparse.Namespace, adaln_single: bool = False) -> DiTConfig:
    """The profile's DiT (``train.dit``: mlp_ratio, pooled text, ...) at preset `name`, on ``--size`` latents
    and ``--context-dim`` text states; for ``gpu`` and "DiT-B/2" (adaLN-Zero) the network the profile trains."""
    over = {"depth": 2, "hidden_size": 64, "num_heads": 4} if args.smoke else {}
    return profile_train(args).dit.replace(**{**DIT_PRESETS[name], **over}, in_channels=4, input_size=args.size,
                                           context_dim=args.context_dim, adaln_single=adaln_single)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """``bench/gpu.py``'s flags; ``bench/gpu_kernels.py`` adds its own to the same parser."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes and steps on whatever device (a script check)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    # 440 s + the 30 s hard stop stays under 8 minutes; on an H200 (2026-11-30) every item but diffusers'
    # compiled U-Net took 325 s, leaving it the ~100 s it needs.
    p.add_argument("--budget", type=float, default=440, help="seconds; items that would not fit are skipped")
    p.add_argument("--batch", type=int, default=256, help="DiT training batch")
    p.add_argument("--unet-batch", type=int, default=128, help="U-Net training batch")
    p.add_argument("--sample-batch", type=int, default=64, help="images per guided sampling run (net sees 2x)")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32, help="latent side (256 px images with the f=8 VAE)")
    p.add_argument("--text-len", type=int, default=77)
    p.add_argument("--context-dim", type=int, default=None,
                   help="text width (default: the profile's text encoder width, 512 for gpu)")
    p.add_argument("--profile", default="gpu", help="the profile whose DiT and U-Net are benchmarked")
    p.add_argument("--set", "-S", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a parameter over the profile, as cli.py -S (e.g. -S train.unet.base_channels=256)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--sample-runs", type=int, default=2)
    p.add_argument("--vae-runs", type=int, default=5)
    p.add_argument("--compile-need", type=float, default=75,
                   help="seconds of budget a compiled item needs left to be started")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode of the compiled items (e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--regional", action="store_true",
                   help="compiled items compile each transformer block, not the whole model (DiTs only)")
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers references")
    p.add_argument("--only", default=None, metavar="REGEX",
                   help="run only the items whose name matches (e.g. 'DiT-B/2.*compiled'); the others are not listed")
    return p


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse the flags (``parser``: one from :func:`build_parser` with more flags) and apply the profile and
    ``--smoke`` to them."""
    args = (parser or build_parser()).parse_args(argv)
    if args.context_dim is None:
        args.context_dim = profile_train(args).text_encoder.width
    if args.smoke:
        args.batch = args.unet_batch = 4
        args.sample_batch = args.vae_batch = 2
        args.size, args.text_len, args.context_dim = 8, 8, 32
        args.warmup, args.steps, args.sample_steps, args.sample_runs, args.vae_runs = 2, 2, 3, 1, 1
    return args
