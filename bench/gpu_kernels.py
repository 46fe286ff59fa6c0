"""Where a training step's time goes, kernel by kernel: our denoiser against diffusers' of the same size (a
script that prints, not a test).

``bench/gpu.py`` measures the gaps (on an H100/H200, eager bf16: our DiT-B/2 adaLN-single 0.87-0.88x
``PixArtTransformer2DModel``, our U-Net 1.03-1.13x ``UNet2DConditionModel``); this locates them. Each model
trains ``--warmup`` steps, then ``--steps`` steps under ``torch.profiler``; the script prints the step's
device time split into categories (matrix products, attention, norms, copies, the optimizer, other
elementwise work, and with ``--compile`` Inductor's fused Triton kernels) for both models side by side, the
kernel launches per step, then each model's top kernels. Same setting as ``bench/gpu.py`` (its
``train_step``): bf16 autocast around the forward, float32 weights, AdamW fused on a GPU for both models,
4x32x32 latents, text (77, 512) with padding, the profile's networks (``--profile``, ``-S``).

    python bench/gpu_kernels.py                      # on the GPU machine: the DiT pair at batch 256, ~40 s
    python bench/gpu_kernels.py --pair unet          # the U-Net pair at --unet-batch (128)
    python bench/gpu_kernels.py --compile            # both under torch.compile (adds a compilation each)
    python bench/gpu_kernels.py --compile --regional # each transformer block compiled: a quarter of the compile time
    python bench/gpu_kernels.py --smoke              # tiny shapes on whatever device is here (checks the script)

It takes ``bench/gpu.py``'s flags (``--smoke``, ``--cpu``, ``--batch``, ``--unet-batch``, ``--warmup``,
``--steps``, ``--profile``, ``-S``, ``--compile-mode``, ``--regional``).
On a CPU the rows are operators (CPU time), not kernels.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # the GPU machine has no editable install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pairs import (  # noqa: E402
    diffusers_unet_like,
    diffusers_unet_net,
    make_batch,
    ours_net,
    pixart_like,
    pixart_net,
)
from gpu_common import (  # noqa: E402
    build_parser,
    compiled,
    dit_profile,
    has_diffusers,
    parse_args,
    sync,
    train_step,
    unet_profile,
)

from diffusion.models.dit import DiT  # noqa: E402
from diffusion.models.unet import UNet  # noqa: E402

#: Kernel (or operator) name patterns -> category, first match wins. CUDA GEMMs are cuBLAS/CUTLASS kernels
#: (sm90_xmma..., cutlass..., nvjet..., *gemm*); cuDNN's convolutions are implicit GEMMs (fprop, dgrad, wgrad);
#: attention is flash / memory-efficient (fmha) kernels.
#: Under torch.compile, Inductor's own kernels are named triton_poi_ (pointwise), triton_red_ / triton_per_
#: (reductions), after the ops they fuse ("..._addmm_gelu" is the bias and GELU after a cuBLAS product), and
#: triton_tem_ (matmul templates, max-autotune only).
CATEGORIES = [
    ("optimizer", r"adam|multi_tensor_apply|foreach"),
    ("fused (Inductor)", r"^triton_(poi|red|per)_"),
    ("attention", r"flash|fmha|attention|attn"),
    ("convolution", r"conv(olution|_|\d|olve)|implicit_gemm|fprop|dgrad|wgrad|cudnn"),
    ("matmul", r"^triton_tem_|gemm|xmma|cutlass|cublas|matmul|\bmm\b|addmm|bmm|linear|nvjet"),
    # GammaBetaBackward: LayerNorm's weight gradient; RowwiseMoments, GroupNorm1d...: GroupNorm's kernels.
    ("norm", r"layer_norm|layernorm|group_norm|groupnorm|gammabeta|rowwisemoments"),
    ("copy", r"copy|clone|contiguous|cat|transpose|permute"),
    ("elementwise/reduce", r"elementwise|vectorized|reduce|gelu|silu|mul|add|sum|where|fill"),
]


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, pattern in CATEGORIES if re.search(pattern, low)), "other")


def build(name: str, args) -> tuple[torch.nn.Module, object, int]:
    """(model, adapter, batch) of one side of a pair: DiT-B/2 adaLN-single / PixArt, or the profile's U-Net /
    UNet2DConditionModel of the same layout."""
    if name.startswith("dit"):
        cfg = dit_profile("DiT-B/2", args, adaln_single=True)
        return (DiT(cfg), ours_net, args.batch) if name == "dit-ours" else (pixart_like(cfg), pixart_net, args.batch)
    cfg = unet_profile(args)
    if name == "unet-ours":
        return UNet(cfg), ours_net, args.unet_batch
    return diffusers_unet_like(cfg, args.size), diffusers_unet_net, args.unet_batch


def profile_steps(name: str, args, device: str) -> tuple[dict[str, float], list[tuple[str, float, int]], float]:
    """Train one model; (category -> ms per step, top kernels as (name, ms per step, calls per step),
    kernel launches per step)."""
    torch.manual_seed(0)
    model, adapter, batch_size = build(name, args)
    model.to(device).train()
    # --compile-mode and --regional as in bench/gpu.py: regional compilation compiles one block, not
    # the network (~12 s instead of ~45 s for DiT-B/2 on an H200), so a profile fits a short device call.
    net = adapter(compiled(model, args.compile_mode, args.regional)) if args.compile else adapter(model)
    batch = make_batch(batch_size, args.text_len, args.context_dim, args.size, device)
    step = train_step(model, net, batch, device)  # exactly bench/gpu.py's step
    for _ in range(args.warmup):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync(device)
    # On a GPU: device kernels (self device time); on a CPU: operators (self CPU time).
    # User annotations (record_function ranges; Inductor's "## Call CompiledFxGraph ... ##" around every compiled
    # graph) carry their whole span as device time: counted, they would add the step a second time.
    rows = [(e.key, (e.self_device_time_total if device == "cuda" else e.self_cpu_time_total), e.count)
            for e in prof.key_averages() if not getattr(e, "is_user_annotation", False) and not e.key.startswith("##")]
    if device == "cuda":
        # Kernels only: not the operators that launch them, nor the CUDA runtime's records ("Command Buffer
        # Full": the host waiting for room in the launch queue, 19 ms a step of ours on an H200; no device work).
        skip = ("aten::", "cuda", "Optimizer", "autograd", "Command Buffer Full")
        rows = [r for r in rows if r[1] > 0 and not r[0].startswith(skip)]
    per_step = [(k, t / 1e3 / args.steps, c / args.steps) for k, t, c in rows]  # us -> ms per step
    totals: dict[str, float] = defaultdict(float)
    for key, ms, _ in per_step:
        totals[category(key)] += ms
    launches = sum(c for _, _, c in per_step)
    return dict(totals), sorted(per_step, key=lambda r: -r[1])[:args.top], launches


def main() -> None:
    parser = build_parser(__doc__)
    parser.add_argument("--pair", choices=("dit", "unet"), default="dit",
                        help="dit: DiT-B/2 adaLN-single against PixArt; unet: the profile's U-Net against "
                             "UNet2DConditionModel")
    parser.add_argument("--compile", action="store_true", help="profile both models under torch.compile")
    parser.add_argument("--top", type=int, default=15, help="top kernels listed per model")
    args = parse_args(parser=parser)
    warnings.filterwarnings("ignore")
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if not has_diffusers():
        sys.exit("gpu_kernels: needs diffusers (PixArtTransformer2DModel, UNet2DConditionModel) for the reference")
    ours, theirs = f"{args.pair}-ours", f"{args.pair}-diffusers"
    label = "PixArt" if args.pair == "dit" else "diffusers"
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"pair {args.pair}, {'compiled' if args.compile else 'eager'}, {args.steps} profiled steps after "
          f"{args.warmup}", flush=True)
    results = {name: profile_steps(name, args, device) for name in (ours, theirs)}
    cats = sorted({c for totals, _, _ in results.values() for c in totals}, key=lambda c: -results[ours][0].get(c, 0.0))
    print(f"\n{'ms per step':24s} {'ours':>9s} {label:>9s} {'ours - ' + label:>17s}")
    for c in [*cats, "total"]:
        o, d = ((sum(results[n][0].values()) if c == "total" else results[n][0].get(c, 0.0)) for n in (ours, theirs))
        print(f"{c:24s} {o:9.2f} {d:9.2f} {o - d:+17.2f}")
    print(f"{'kernels per step':24s} {results[ours][2]:9.0f} {results[theirs][2]:9.0f}")
    for name, (_, top, _) in results.items():
        print(f"\n{name}: top kernels (ms per step, calls per step)")
        for key, ms, calls in top:
            print(f"  {ms:8.2f} {calls:6.0f}  [{category(key)}] {key[:110]}")


if __name__ == "__main__":
    main()
