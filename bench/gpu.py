"""GPU benchmark: training throughput, peak memory and MFU of our denoisers and diffusers' at matched sizes,
guided sampling and VAE encoding (a script that prints, not a test).

    bash bench/gpu.sh                       # on the GPU machine: everything, inside a time budget
    python bench/gpu.py --smoke             # tiny shapes on whatever device is here (checks the script)

Items, in order (each skipped, and listed as skipped, once the time budget is short):

1. Training, bf16-mixed (autocast to bfloat16 around the forward, float32 weights, fused AdamW), eager:
   DiT-S/2, DiT-B/2 (the paper's adaLN-Zero), DiT-B/2 with adaLN-single against diffusers'
   ``PixArtTransformer2DModel`` of the same size, and the U-Net of the GPU profile against diffusers'
   ``UNet2DConditionModel`` of the same layout (each in NCHW and channels_last).
2. Guided sampling: 20 DPM-Solver++(2M) steps, classifier-free guidance in one batched forward per step,
   bf16 autocast; ours and diffusers' model through the same sampler, ours inside ``reuse_text_keys_values``
   as ``LatentDiffusionModel.generate`` samples. Images/s of latents (no VAE decode).
3. VAE encode images/s: our AutoencoderKL (f=8) on 256 px images, float32 as in training (pitfall 10;
   cuDNN may use TF32, PyTorch's default for convolutions).
4. The same training steps under ``torch.compile`` (default mode); the compile warm-up is timed apart.
   ``--compile-mode`` sets another mode (e.g. ``max-autotune-no-cudagraphs``), and ``--regional`` compiles each
   transformer block of a DiT instead of the whole model (with ``--only`` to pick the items).

The networks are the profile's (``--profile``, default ``gpu``: ``params.yaml`` with ``profiles/gpu.yaml`` over
it, as the train stage reads them; ``-S section.key=value`` overrides a key as ``cli.py -S`` does): its DiT
(DiT-B/2, and DiT-S/2 at the same settings) and its U-Net (``train.unet``: widths 192/384/576, 151.9M parameters),
both cross-attending to text states of the profile's text encoder width (512). Inputs: 4x32x32 latents
(256 px through the f=8 VAE) and random text states; no text encoder, VAE or data loading in the steps.

Measurements: CUDA events around a window of ``--steps`` steps after ``--warmup`` steps; peak memory is
``torch.cuda.max_memory_allocated`` over the timed window (weights, gradients, AdamW state, activations).

MFU = (3 x forward FLOPs per sample x batch) / step time / peak. Forward FLOPs count every matrix product,
convolution and attention product (2 FLOPs per multiply-add), by ``torch.utils.flop_counter`` over one
forward at the benchmark's shapes, with attention through SDPA's math path so that its two products are
counted on any device; elementwise work, norms and softmax are not counted. Backward = 2 x forward
(gradients with respect to activations and to weights), hence the 3. The closed form for a DiT is in
docs/performance.md and is checked against the counter by ``--smoke``. Peak: the chip's dense bf16 rate
from its datasheet (H100 SXM and H200: 989 TFLOP/s); no peak is known for other devices, so no MFU.

With $OUT set, the table is also written to $OUT/gpu_bench.json (rewritten after every item, so a run cut
short still leaves what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the GPU machine has no editable install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pairs import (  # noqa: E402
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
from gpu_common import (  # noqa: E402
    Timer,
    autocast,
    build_parser,
    compiled,
    counted_forward_flops,
    dit_forward_flops,
    dit_profile,
    has_diffusers,
    parse_args,
    peak_flops,
    train_step,
    unet_profile,
)

from diffusion.models.dit import DiT  # noqa: E402
from diffusion.models.unet import UNet  # noqa: E402
from diffusion.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from diffusion.samplers import sample  # noqa: E402
from diffusion.scheduler import DDPMScheduler  # noqa: E402


class OutOfTime(Exception):
    pass


class Bench:
    """Runs items inside a time budget, collects rows, prints and saves them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
        self.device_name = torch.cuda.get_device_name() if self.device == "cuda" else "cpu"
        self.peak = peak_flops(self.device_name) if self.device == "cuda" else None
        self.start = time.perf_counter()
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self.diffusers = has_diffusers() and not args.no_diffusers

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.start)

    def run(self, name: str, fn, need_s: float, **kw) -> None:
        """Run one item if at least `need_s` seconds of budget are left; record its row or its failure."""
        if self.args.only and not re.search(self.args.only, name):
            return
        if self.left() < need_s:
            self.skipped.append(f"{name} (needs ~{need_s:.0f} s, {max(0.0, self.left()):.0f} s left)")
            print(f"SKIP {name}: time budget", flush=True)
            return
        t = time.perf_counter()
        try:
            row = fn(**kw)
        except OutOfTime:
            raise
        except Exception as e:  # noqa: BLE001 (one failing item must not cost the others)
            traceback.print_exc()
            row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        finally:
            if self.device == "cuda":
                torch.cuda.empty_cache()
        row = {"item": name, **row, "wall_s": round(time.perf_counter() - t, 1)}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def save(self) -> None:
        out = os.environ.get("OUT")
        if out:
            Path(out, "gpu_bench.json").write_text(json.dumps(self.report(), indent=1) + "\n")

    def report(self) -> dict:
        return {"device": self.device_name, "peak_bf16_flops": self.peak, "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"), "args": {k: v for k, v in vars(self.args).items()},
                "rows": self.rows, "skipped": self.skipped}

    # ---- training -----------------------------------------------------------------------------------

    def train(self, build, batch_size: int, compile_: bool = False, channels_last: bool = False) -> dict:
        """Throughput, peak memory and MFU of one model's bf16-mixed training step; halves the batch on OOM."""
        dev = self.device
        torch.manual_seed(0)
        model, adapter = build()
        model.to(dev).train()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        params = sum(p.numel() for p in model.parameters())
        mode = {"compile_mode": self.args.compile_mode, "regional": self.args.regional} if compile_ else {}
        while True:
            try:
                row = self._train(model, adapter, batch_size, compile_, channels_last)
                return {"params_M": round(params / 1e6, 2), "compile": compile_, **mode,
                        "channels_last": channels_last, **row}
            except torch.OutOfMemoryError:
                if batch_size <= 8:
                    raise
                batch_size //= 2
                print(f"  out of memory; batch {batch_size}", flush=True)
                torch.cuda.empty_cache()

    def _train(self, model, adapter, batch_size: int, compile_: bool, channels_last: bool) -> dict:
        a, dev = self.args, self.device
        net = adapter(model)
        b = make_batch(batch_size, a.text_len, a.context_dim, a.size, dev)
        if channels_last:
            b["x"] = b["x"].contiguous(memory_format=torch.channels_last)
        flops_fwd = counted_forward_flops(net, b, dev)
        run_net = adapter(compiled(model, a.compile_mode, a.regional)) if compile_ else net
        step = train_step(model, run_net, b, dev)
        timer = Timer(dev)
        timer.start()
        step()  # the first step: compilation (if any), cuDNN/cuBLAS set-up, AdamW state allocation
        first_s = timer.stop()
        for _ in range(a.warmup - 1):
            step()
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timer.start()
        for _ in range(a.steps):
            step()
        dt = timer.stop() / a.steps
        row = {"batch": batch_size, "step_ms": round(dt * 1e3, 2), "samples_per_s": round(batch_size / dt, 1),
               "first_step_s": round(first_s, 1), "fwd_gflop_per_sample": round(flops_fwd / 1e9, 3)}
        if dev == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        achieved = 3 * flops_fwd * batch_size / dt
        row["tflops"] = round(achieved / 1e12, 1)
        if self.peak:
            row["mfu"] = round(achieved / self.peak, 3)
        return row

    # ---- sampling and VAE -----------------------------------------------------------------------------

    @torch.inference_mode()
    def sample(self, build, batch_size: int, channels_last: bool = False) -> dict:
        a, dev = self.args, self.device
        torch.manual_seed(0)
        model, adapter = build()
        net = adapter(model)
        model.to(dev).eval()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        cond, uncond = guidance_inputs(batch_size, a.text_len, a.context_dim, dev)
        guided = (ours_guided if adapter is ours_net else diffusers_style_guidance)(net, cond, uncond, 4.0)
        ours = adapter is ours_net

        def fn(x, t):
            with autocast(dev):
                return guided(x, t)

        scheduler = DDPMScheduler().to(dev)
        x_T = torch.randn(batch_size, 4, a.size, a.size, device=dev)
        if channels_last:
            x_T = x_T.contiguous(memory_format=torch.channels_last)
        with sampling_scope(model, ours):
            sample("dpmpp", fn, x_T, scheduler, 2)  # warm-up
        timer, times = Timer(dev), []
        for _ in range(a.sample_runs):
            timer.start()
            with sampling_scope(model, ours):
                sample("dpmpp", fn, x_T, scheduler, a.sample_steps)
            times.append(timer.stop())
        dt = statistics.median(times)
        return {"batch": batch_size, "steps": a.sample_steps, "run_s": round(dt, 3),
                "images_per_s": round(batch_size / dt, 1)}

    @torch.inference_mode()
    def vae_encode(self, batch_size: int, image_size: int, channels_last: bool) -> dict:
        dev = self.device
        torch.manual_seed(0)
        vae = AutoencoderKL(VAEConfig()).to(dev).eval()
        x = torch.rand(batch_size, 3, image_size, image_size, device=dev) * 2 - 1
        if channels_last:
            vae.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        vae.encode(x).mode()  # warm-up
        timer = Timer(dev)
        timer.start()
        for _ in range(self.args.vae_runs):
            vae.encode(x).mode()
        dt = timer.stop() / self.args.vae_runs
        return {"batch": batch_size, "image_px": image_size, "channels_last": channels_last,
                "params_M": round(sum(p.numel() for p in vae.parameters()) / 1e6, 2),
                "images_per_s": round(batch_size / dt, 1)}


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


def plan(bench: Bench) -> None:
    a = bench.args
    B, Bu, Bs = a.batch, a.unet_batch, a.sample_batch
    # builders: () -> (model, adapter), adapter(model or its compiled wrapper) -> Net
    ours = lambda cfg, cls: (lambda: (cls(cfg), ours_net))  # noqa: E731
    dit_s, dit_b = dit_profile("DiT-S/2", a), dit_profile("DiT-B/2", a)
    dit_b1 = dit_profile("DiT-B/2", a, adaln_single=True)
    ucfg = unet_profile(a)
    pixart = lambda: (pixart_like(dit_b1), pixart_net)  # noqa: E731
    dunet = lambda: (diffusers_unet_like(ucfg, a.size), diffusers_unet_net)  # noqa: E731
    ref = bench.diffusers
    if not ref:
        bench.skipped.append("diffusers references (diffusers not importable)")

    # Eager training first: cheap, and the figures every other one is compared against.
    bench.run("train DiT-S/2 eager", bench.train, 15, build=ours(dit_s, DiT), batch_size=B)
    bench.run("train DiT-B/2 eager", bench.train, 20, build=ours(dit_b, DiT), batch_size=B)
    bench.run("train DiT-B/2 adaLN-single eager", bench.train, 20, build=ours(dit_b1, DiT), batch_size=B)
    if ref:
        bench.run("train PixArt (DiT-B/2 size) eager [diffusers]", bench.train, 20, build=pixart, batch_size=B)
    bench.run("train U-Net eager", bench.train, 20, build=ours(ucfg, UNet), batch_size=Bu)
    bench.run("train U-Net eager channels_last", bench.train, 20, build=ours(ucfg, UNet), batch_size=Bu,
              channels_last=True)
    if ref:
        bench.run("train UNet2DConditionModel eager [diffusers]", bench.train, 20, build=dunet, batch_size=Bu)
        bench.run("train UNet2DConditionModel eager channels_last [diffusers]", bench.train, 20, build=dunet,
                  batch_size=Bu, channels_last=True)
    # Sampling and the VAE.
    bench.run("sample DiT-B/2 adaLN-single", bench.sample, 10, build=ours(dit_b1, DiT),
              batch_size=Bs)
    if ref:
        bench.run("sample PixArt [diffusers]", bench.sample, 10, build=pixart, batch_size=Bs)
    bench.run("sample U-Net", bench.sample, 10, build=ours(ucfg, UNet), batch_size=Bs)
    if ref:
        bench.run("sample UNet2DConditionModel [diffusers]", bench.sample, 10, build=dunet,
                  batch_size=Bs)
    bench.run("VAE encode", bench.vae_encode, 10, batch_size=a.vae_batch, image_size=8 * a.size, channels_last=False)
    bench.run("VAE encode channels_last", bench.vae_encode, 10, batch_size=a.vae_batch, image_size=8 * a.size,
              channels_last=True)
    # Compiled training last: each costs a compilation of its forward and backward.
    need = 10 if a.smoke else a.compile_need
    # In order of what the issue asks first: DiT-B/2, then the pair against PixArt, then the U-Nets.
    bench.run("train DiT-B/2 compiled", bench.train, need, build=ours(dit_b, DiT), batch_size=B, compile_=True)
    bench.run("train DiT-B/2 adaLN-single compiled", bench.train, need, build=ours(dit_b1, DiT), batch_size=B,
              compile_=True)
    if ref:
        bench.run("train PixArt compiled [diffusers]", bench.train, need, build=pixart, batch_size=B, compile_=True)
    bench.run("train U-Net compiled channels_last", bench.train, need * 1.5, build=ours(ucfg, UNet), batch_size=Bu,
              compile_=True, channels_last=True)
    bench.run("train DiT-S/2 compiled", bench.train, need, build=ours(dit_s, DiT), batch_size=B, compile_=True)
    if ref:
        bench.run("train UNet2DConditionModel compiled channels_last [diffusers]", bench.train, need * 1.5,
                  build=dunet, batch_size=Bu, compile_=True, channels_last=True)


def print_table(bench: Bench) -> None:
    r = bench.report()
    peak = f"{r['peak_bf16_flops'] / 1e12:.0f} TFLOP/s dense bf16" if r["peak_bf16_flops"] else "none known"
    print(f"\n{r['device']} | peak used: {peak} | torch {r['torch']} | {r['date']} | "
          f"latents 4x{bench.args.size}x{bench.args.size}, text ({bench.args.text_len}, {bench.args.context_dim})")
    cols = ("item", "params M", "batch", "step ms", "smp|img/s", "peak GiB", "TFLOP/s", "MFU", "1st step s")
    print(f"{cols[0]:58s} {cols[1]:>8s} {cols[2]:>5s} {cols[3]:>8s} {cols[4]:>9s} {cols[5]:>8s} "
          f"{cols[6]:>8s} {cols[7]:>6s} {cols[8]:>10s}")
    for row in r["rows"]:
        if "error" in row:
            print(f"{row['item']:58s} ERROR {row['error']}")
            continue
        rate = row.get("samples_per_s", row.get("images_per_s", ""))
        if row.get("compile_mode", "default") != "default" or row.get("regional"):
            row = {**row, "item": f"{row['item']} ({row['compile_mode']}{', regional' if row['regional'] else ''})"}
        fmt = lambda k, spec: format(row[k], spec) if k in row else "-"  # noqa: E731
        print(f"{row['item']:58s} {fmt('params_M', '8.1f')} {fmt('batch', '5d')} {fmt('step_ms', '8.1f')} "
              f"{rate:>9} {fmt('peak_mem_gib', '8.2f'):>8s} {fmt('tflops', '8.1f'):>8s} {fmt('mfu', '6.1%'):>6s} "
              f"{fmt('first_step_s', '10.1f'):>10s}")
    for s in r["skipped"]:
        print(f"skipped: {s}")
    by = {row["item"]: row for row in r["rows"] if "error" not in row}

    def ratio(a_: str, b_: str, key: str) -> None:
        if a_ in by and b_ in by:
            print(f"ratio {a_} / {b_}: {by[a_][key] / by[b_][key]:.2f}x")

    ratio("train DiT-B/2 adaLN-single eager", "train PixArt (DiT-B/2 size) eager [diffusers]", "samples_per_s")
    ratio("train DiT-B/2 adaLN-single compiled", "train PixArt compiled [diffusers]", "samples_per_s")
    ratio("train DiT-B/2 adaLN-single compiled", "train PixArt (DiT-B/2 size) eager [diffusers]", "samples_per_s")
    ratio("train U-Net eager", "train UNet2DConditionModel eager [diffusers]", "samples_per_s")
    ratio("train U-Net eager channels_last", "train UNet2DConditionModel eager channels_last [diffusers]",
          "samples_per_s")
    ratio("train U-Net compiled channels_last", "train UNet2DConditionModel compiled channels_last [diffusers]",
          "samples_per_s")
    ratio("sample DiT-B/2 adaLN-single", "sample PixArt [diffusers]", "images_per_s")
    ratio("sample U-Net", "sample UNet2DConditionModel [diffusers]", "images_per_s")


def main() -> None:
    args = parse_args(parser=build_parser(__doc__))
    warnings.filterwarnings("ignore")
    # float32 work outside autocast (the loss, the VAE) may use TF32 tensor cores, as Lightning users set.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    bench = Bench(args)

    def on_alarm(signum, frame):
        raise OutOfTime()

    # A hard stop a little after the budget, for an item that overruns its estimate (a long compile).
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.budget + 30))
    print(f"device: {bench.device_name}, torch {torch.__version__}, diffusers: {bench.diffusers}", flush=True)
    if args.smoke:  # the closed-form DiT count against the counter, on the smoke shapes
        cfg = dit_profile("DiT-B/2", args)
        b = make_batch(1, args.text_len, args.context_dim, args.size, bench.device)
        counted = counted_forward_flops(ours_net(DiT(cfg).to(bench.device)), b, bench.device)
        closed = dit_forward_flops(cfg, args.size, args.text_len)
        print(f"DiT forward FLOPs per sample: counter {counted:.4g}, closed form {closed:.4g}", flush=True)
    try:
        plan(bench)
    except OutOfTime:
        bench.skipped.append("the rest: hard time limit reached during an item")
        print("hard time limit: stopping", flush=True)
    signal.alarm(0)
    bench.save()
    print_table(bench)
    print(f"total {time.perf_counter() - bench.start:.0f} s")


if __name__ == "__main__":
    main()
