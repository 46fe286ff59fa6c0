"""Where a training step's time goes, kernel by kernel: our DiT-B/2 (adaLN-single) against diffusers'
``PixArtTransformer2DModel`` of the same size (a script that prints, not a test).

``bench/gpu.py`` measures the gap (ours 0.87-0.88x PixArt in eager bf16 on an H100/H200); this locates it.
Each model trains ``--warmup`` steps, then ``--steps`` steps under ``torch.profiler``; the script prints the
step's device time split into categories (matrix products, attention, norms, copies, the optimizer,
other elementwise work) for both models side by side, then each model's top kernels. Same setting as
``bench/gpu.py`` (its ``train_step``): bf16 autocast around the forward, float32 weights, AdamW fused on a
GPU for both models, 4x32x32 latents, text (77, 512) with padding, the profile's DiT settings
(``--profile``, ``-S``).

    python bench/gpu_kernels.py                 # on the GPU machine: batch 256, about a minute
    python bench/gpu_kernels.py --smoke         # tiny shapes on whatever device is here (checks the script)

It takes ``bench/gpu.py``'s flags (``--smoke``, ``--cpu``, ``--batch``, ``--warmup``, ``--steps``,
``--profile``, ``-S``). On a CPU the rows are operators (CPU time), not kernels.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import make_batch, ours_net, pixart_like, pixart_net  # noqa: E402
from gpu import dit_profile, has_diffusers, parse_args, sync, train_step  # noqa: E402

from diffusion.models.dit import DiT  # noqa: E402

#: Kernel (or operator) name patterns -> category, first match wins. CUDA GEMMs are cuBLAS/CUTLASS kernels
#: (sm90_xmma..., cutlass..., nvjet..., *gemm*); attention is flash / memory-efficient (fmha) kernels.
CATEGORIES = [
    ("optimizer", r"adam|multi_tensor_apply|foreach"),
    ("attention", r"flash|fmha|attention|attn"),
    ("matmul", r"gemm|xmma|cutlass|cublas|matmul|\bmm\b|addmm|bmm|linear|nvjet"),
    ("norm", r"layer_norm|layernorm|group_norm"),
    ("copy", r"copy|clone|contiguous|cat|transpose|permute"),
    ("elementwise/reduce", r"elementwise|vectorized|reduce|gelu|silu|mul|add|sum|where|fill"),
]


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, pattern in CATEGORIES if re.search(pattern, low)), "other")


def profile_steps(name: str, args, device: str) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """Train one model; (category -> ms per step, top kernels as (name, ms per step, calls per step))."""
    cfg = dit_profile("DiT-B/2", args, adaln_single=True)
    torch.manual_seed(0)
    model = (DiT(cfg) if name == "dit-ours" else pixart_like(cfg)).to(device).train()
    net = ours_net(model) if name == "dit-ours" else pixart_net(model)
    batch = make_batch(args.batch, args.text_len, args.context_dim, args.size, device)
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
    rows = [(e.key, (e.self_device_time_total if device == "cuda" else e.self_cpu_time_total), e.count)
            for e in prof.key_averages()]
    if device == "cuda":
        rows = [r for r in rows if r[1] > 0 and not r[0].startswith(("aten::", "cuda", "Optimizer", "autograd"))]
    per_step = [(k, t / 1e3 / args.steps, c / args.steps) for k, t, c in rows]  # us -> ms per step
    totals: dict[str, float] = defaultdict(float)
    for key, ms, _ in per_step:
        totals[category(key)] += ms
    return dict(totals), sorted(per_step, key=lambda r: -r[1])[:15]


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if not has_diffusers():
        sys.exit("gpu_kernels: needs diffusers (PixArtTransformer2DModel) for the reference")
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"batch {args.batch}, {args.steps} profiled steps after {args.warmup}", flush=True)
    results = {name: profile_steps(name, args, device) for name in ("dit-ours", "dit-diffusers")}
    cats = sorted({c for totals, _ in results.values() for c in totals},
                  key=lambda c: -results["dit-ours"][0].get(c, 0.0))
    print(f"\n{'ms per step':24s} {'ours':>9s} {'PixArt':>9s} {'ours - PixArt':>14s}")
    for c in [*cats, "total"]:
        o, d = ((sum(results[n][0].values()) if c == "total" else results[n][0].get(c, 0.0))
                for n in ("dit-ours", "dit-diffusers"))
        print(f"{c:24s} {o:9.2f} {d:9.2f} {o - d:+14.2f}")
    for name, (_, top) in results.items():
        print(f"\n{name}: top kernels (ms per step, calls per step)")
        for key, ms, calls in top:
            print(f"  {ms:8.2f} {calls:6.0f}  [{category(key)}] {key[:110]}")


if __name__ == "__main__":
    main()
