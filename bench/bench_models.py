"""Our denoisers against diffusers' at matched sizes, on the CPU (a script that prints, not a test).

For each pair it prints, as ours/diffusers ratios measured in the same run:

* **training samples/s**: one step = forward + MSE loss + backward + AdamW step, float32, on text with
  some padding (the mask is passed to both). Ours uses what our training system uses (fused AdamW, the
  sync-free text mask); diffusers' side uses what its example training scripts use (``torch.optim.AdamW``
  with its defaults: on a CPU a for-loop over the parameter tensors, several times slower than the fused
  kernel). So that ratio credits ours with the optimizer as well; the **same-opt** ratio gives diffusers'
  model our fused AdamW too, which leaves the networks alone (as ``gpu.py`` compares them). The models are
  timed alternately, step by step, so a load spike hits all alike; the figure is the median step
  (``--stat min``: the fastest, steadier on a loaded machine).
* **peak training memory**: each model trains ``--mem-steps`` steps in a fresh subprocess; the figure is
  the peak resident set size during those steps minus the resident set size just before the first one
  (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``; ``ru_maxrss`` where that is refused). It is
  what a step adds on top of the weights, inputs and imports: activations, gradients, AdamW state and the
  allocator's slack. tracemalloc cannot see torch's allocations, hence the process-level figure.
* **sampling images/s**: 20 DPM-Solver++(2M) steps with classifier-free guidance in one batched forward
  per step. Ours goes through ``guidance.classifier_free_guidance`` inside ``reuse_text_keys_values``, as
  ``LatentDiffusionModel.generate`` samples (the text's cross-attention keys and values projected once per
  run, not once per step); diffusers' model through a plain loop that doubles the batch and splits the
  output as diffusers' pipelines do (which project them at every step). Both run the same sampler
  (``samplers.sample``), so only the networks and their inference paths differ. Alternated run by run;
  median.

Pairs, each at the same depth, widths, heads, context width and (nearly) the same parameter count:

* ``UNet`` vs ``diffusers.UNet2DConditionModel`` configured like ours: the same levels and ResBlocks,
  scale-shift time conditioning (``resnet_time_scale_shift="scale_shift"``), linear transformer
  projections, GEGLU, and the pooled text through an MLP added to the time embedding
  (``class_embed_type="projection"``).
* ``DiT(adaln_single=True)`` vs ``diffusers.PixArtTransformer2DModel`` (adaLN-single, cross-attention
  to the text states, GELU-tanh MLP). Ours also has a pooled-text projection and a LayerNorm before
  the cross-attention, which PixArt lacks: a fraction of a percent of the parameters.

    python bench/bench_models.py                     # default sizes, a few minutes on 2 quiet cores
    python bench/bench_models.py --steps 10 --threads 4 --channels-last
    python bench/bench_models.py --only train        # one of: train, memory, sample

The inputs, diffusers' builders, forward adapters and guided-sampling paths are in ``bench/pairs.py``, shared
with the GPU scripts.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from diffusion.models.dit import DiT, DiTConfig
from diffusion.models.unet import UNet, UNetConfig
from diffusion.samplers import sample
from diffusion.scheduler import DDPMScheduler
from pairs import (
    Net,
    call,
    diffusers_style_guidance,
    diffusers_unet_like,
    diffusers_unet_net,
    guidance_inputs,
    make_batch,
    ours_guided,
    ours_net,
    pixart_like,
    pixart_net,
    sampling_scope,
)

# --------------------------------------------------------------------------------------------------
# The CPU measurements
# --------------------------------------------------------------------------------------------------


def unet_cfg(args: argparse.Namespace) -> UNetConfig:
    return UNetConfig(base_channels=args.unet_channels, channel_mult=(1, 2, 4), num_res_blocks=2,
                      attention_levels=(1, 2), num_heads=4, context_dim=args.context_dim, norm_groups=32)


def dit_cfg(args: argparse.Namespace) -> DiTConfig:
    return DiTConfig(input_size=args.size, patch_size=2, hidden_size=args.dit_hidden, depth=args.dit_depth,
                     num_heads=args.dit_heads, context_dim=args.context_dim, adaln_single=True)


def build(name: str, args: argparse.Namespace) -> tuple[torch.nn.Module, Net]:
    """One model of the benchmark by name: unet-ours, unet-diffusers, dit-ours, dit-diffusers."""
    torch.manual_seed(0)
    if name == "unet-ours":
        model = UNet(unet_cfg(args))
        net = ours_net(model)
    elif name == "unet-diffusers":
        model = diffusers_unet_like(unet_cfg(args), args.size)
        net = diffusers_unet_net(model)
    elif name == "dit-ours":
        model = DiT(dit_cfg(args))
        net = ours_net(model)
    elif name == "dit-diffusers":
        model = pixart_like(dit_cfg(args))
        net = pixart_net(model)
    else:
        raise ValueError(f"unknown model {name!r}")
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, net


def optimizer_for(name: str, model: torch.nn.Module, fused: bool | None = None) -> torch.optim.Optimizer:
    """Ours: fused AdamW, as DiffusionSystem.configure_optimizers; diffusers: AdamW's defaults, as its scripts
    (on a CPU, a for-loop over the parameter tensors). ``fused`` overrides either."""
    if fused is None:
        fused = name.endswith("-ours")
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)


def train_step(net: Net, opt: torch.optim.Optimizer, batch: dict) -> float:
    """One optimizer step; returns seconds."""
    start = time.perf_counter()
    loss = F.mse_loss(call(net, batch), batch["target"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def cpu_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    batch = make_batch(args.batch, args.text_len, args.context_dim, args.size)
    if args.channels_last:
        batch["x"] = batch["x"].contiguous(memory_format=torch.channels_last)
    return batch


def bench_train(pair: tuple[str, str], args: argparse.Namespace) -> dict:
    """Both models of a pair, alternately, step by step; samples/s from the median (or fastest) step."""
    batch = cpu_batch(args)
    runs = []
    # The pair as each trains (ours: fused AdamW; diffusers: its scripts' default AdamW), then diffusers' model
    # with our fused AdamW too: the networks alone, the same optimizer on both sides (gpu.py's comparison).
    for name, fused in ((pair[0], None), (pair[1], None), (pair[1], True)):
        model, net = build(name, args)
        model.train()
        runs.append((model, net, optimizer_for(name, model, fused), []))
    for i in range(args.warmup + args.steps):
        for _, net, opt, times in runs:
            dt = train_step(net, opt, batch)
            if i >= args.warmup:
                times.append(dt)
    stat = statistics.median if args.stat == "median" else min
    sps = [args.batch / stat(times) for *_, times in runs]
    params = [sum(p.numel() for p in model.parameters()) for model, *_ in runs[:2]]
    return {"params": params, "train_sps": sps[:2], "train_sps_same_opt": [sps[0], sps[2]]}


def memory_child(name: str, args: argparse.Namespace) -> None:
    """In a fresh process: build one model, reset the peak RSS, train, print the peak's rise as JSON."""
    torch.set_num_threads(args.threads)
    batch = cpu_batch(args)
    model, net = build(name, args)
    model.train()
    opt = optimizer_for(name, model)

    def status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    rss0 = status_kib("VmRSS")
    try:  # "5" resets the peak RSS (VmHWM, and ru_maxrss with it) to the current RSS (proc(5), Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after clear_refs"
    except OSError:
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the high-water mark so far
        method = "ru_maxrss delta"
    for _ in range(args.mem_steps):
        train_step(net, opt, batch)
    peak = status_kib("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"name": name, "peak_rise_mib": (peak - rss0) / 1024, "method": method}))


def bench_memory(pair: tuple[str, str], args: argparse.Namespace) -> dict:
    """Peak training-memory rise of each model of the pair, each in its own subprocess."""
    out = []
    for name in pair:
        cmd = [sys.executable, __file__, "--memory-child", name, *args.passthrough]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return {"mem_mib": [r["peak_rise_mib"] for r in out], "mem_method": out[0]["method"]}


@torch.inference_mode()
def bench_sample(pair: tuple[str, str], args: argparse.Namespace) -> dict:
    """Guided 20-step DPM-Solver++ sampling of both models, run by run alternately; images/s from the median."""
    scheduler = DDPMScheduler()
    cond, uncond = guidance_inputs(args.sample_batch, args.text_len, args.context_dim)
    fns = []
    for name in pair:
        model, net = build(name, args)
        model.eval()
        ours = name.endswith("-ours")
        guided = ours_guided if ours else diffusers_style_guidance
        fns.append((guided(net, cond, uncond, 4.0), model, ours, []))
    x_T = torch.randn(args.sample_batch, 4, args.size, args.size, generator=torch.Generator().manual_seed(3))
    if args.channels_last:
        x_T = x_T.contiguous(memory_format=torch.channels_last)
    for i in range(1 + args.sample_runs):  # the first run of each is a warm-up
        for fn, model, ours, times in fns:
            start = time.perf_counter()
            with sampling_scope(model, ours):
                sample("dpmpp", fn, x_T, scheduler, args.sample_steps)
            if i > 0:
                times.append(time.perf_counter() - start)
    return {"sample_ips": [args.sample_batch / statistics.median(times) for *_, times in fns]}


PAIRS = {"UNet vs UNet2DConditionModel": ("unet-ours", "unet-diffusers"),
         "DiT (adaLN-single) vs PixArt": ("dit-ours", "dit-diffusers")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every model")
    p.add_argument("--batch", type=int, default=8, help="training batch")
    p.add_argument("--size", type=int, default=16, help="latent side (4 channels)")
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--context-dim", type=int, default=256)
    p.add_argument("--unet-channels", type=int, default=64, help="U-Net base width (levels x1, x2, x4)")
    p.add_argument("--dit-hidden", type=int, default=256)
    p.add_argument("--dit-depth", type=int, default=6)
    p.add_argument("--dit-heads", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=15, help="timed training steps per model")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="training step time reported: the median, or the fastest (steadier on a loaded machine)")
    p.add_argument("--channels-last", action="store_true", help="channels_last models and latents (both sides)")
    p.add_argument("--mem-steps", type=int, default=3, help="training steps of the memory measurement")
    p.add_argument("--sample-batch", type=int, default=4, help="images per sampling run (the network sees 2x)")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--sample-runs", type=int, default=5, help="timed sampling runs per model (median)")
    p.add_argument("--only", choices=("train", "memory", "sample"), action="append",
                   help="run only these measurements (repeatable; default all)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if rest:
        p.error(f"unrecognised arguments: {' '.join(rest)}")
    # The flags the memory subprocesses get: every size flag of this run, none of the control flags.
    argv = sys.argv[1:] if argv is None else argv
    args.passthrough = [a for i, a in enumerate(argv) if not _is_control(argv, i)]
    return args


def _is_control(argv: list[str], i: int) -> bool:
    """True for --only / --memory-child and their values (not forwarded to the memory subprocesses)."""
    a = argv[i]
    if a.startswith(("--only", "--memory-child")):
        return True
    return i > 0 and argv[i - 1] in ("--only", "--memory-child")


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args)
        return
    todo = args.only or ["train", "memory", "sample"]
    rows = []
    for title, pair in PAIRS.items():
        row = {"pair": title}
        if "train" in todo:
            row.update(bench_train(pair, args))
        if "memory" in todo:
            row.update(bench_memory(pair, args))
        if "sample" in todo:
            row.update(bench_sample(pair, args))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows, args)


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\ntorch {torch.__version__}, {args.threads} threads, float32, latents 4x{args.size}x{args.size}, "
          f"text ({args.text_len}, {args.context_dim}) padded{', channels_last' if args.channels_last else ''}")
    print(f"train: batch {args.batch}, {args.stat} of {args.steps} steps after {args.warmup} warm-up; "
          f"memory: peak RSS rise over {args.mem_steps} steps; sample: batch {args.sample_batch} "
          f"(x2 guided), {args.sample_steps} dpmpp steps, median of {args.sample_runs} runs")
    head = (f"{'pair':30s} {'params ours/diff':>21s} {'train smp/s':>17s} {'ratio':>6s} {'same-opt':>15s} "
            f"{'ratio':>6s} {'peak MiB':>15s} {'ratio':>6s} {'sample img/s':>15s} {'ratio':>6s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r['pair']:30s} {r.get('params', [0, 0])[0] / 1e6:9.2f}M/{r.get('params', [0, 0])[1] / 1e6:7.2f}M "
        # ratios as "ours is N x better": throughput ours/diffusers, memory diffusers/ours
        for key, better_high in (("train_sps", True), ("train_sps_same_opt", True), ("mem_mib", False),
                                 ("sample_ips", True)):
            if key in r:
                o, d = r[key]
                line += f"{o:8.2f}/{d:<8.2f} {(o / d if better_high else d / o):5.2f}x "
            else:
                line += f"{'-':>17s} {'-':>6s} "
        print(line)
    print("ratios: ours/diffusers for throughput, diffusers/ours for memory (above 1: ours better); train: each "
          "side with its own AdamW (ours fused, diffusers' scripts' default: a for-loop on a CPU); same-opt: "
          "diffusers' model with our fused AdamW too, so the networks alone")


if __name__ == "__main__":
    main()
