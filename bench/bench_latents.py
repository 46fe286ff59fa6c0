"""Benchmark: a diffusion training step on cached latents vs. encoding images with the VAE on the fly.

Both paths run the same step (text encoder + denoiser forward and backward, AdamW), batch and models:

    cached:   latent shards -> make_latent_loader (z ~ q(z|x) drawn at load time) -> step
    on the fly: image shards -> make_loader -> frozen VAE encode, z ~ q(z|x) -> step

and the script prints samples/s of each and their ratio (issue 4's target: cached >= 2x on the CPU at the
default sizes). Sizes come from params.yaml where its sections define them (``shard.resolution``,
``train_vae.model``, ``train.text_encoder``, ``train.batch_size``, and the denoiser ``train.denoising_type``
names: ``train.unet`` or ``train.dit``), else from the model configs' defaults; ``--tiny`` uses small sizes
for a quick check. The VAE has random weights: speed does not depend on them. A script that prints
figures, not a test (STYLE.md 15).

    python bench/bench_latents.py              # default sizes
    python bench/bench_latents.py --tiny
    python bench/bench_latents.py --profile gpu --batch-size 8 --steps 3   # LDM sizes: 256 px, f=8, DiT-B/2
    python bench/bench_latents.py -S unet.base_channels=64 -S batch_size=16
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffusion.config import ConfigError
from diffusion.data.latents import encode_records, rechunk, write_latent_shards
from diffusion.data.loader import make_loader
from diffusion.data.shapes import generate_shapes
from diffusion.data.shard_reading import iter_shards
from diffusion.data.shards import write_shards
from diffusion.data.tokenizer import train_tokenizer
from diffusion.data_configs import ShapesConfig
from diffusion.models.dit import DIT_PRESETS
from diffusion.models.text_encoder import TextEncoder, TextEncoderConfig
from diffusion.models.vae import AutoencoderKL, VAEConfig
from diffusion.params import apply_overrides, load_params
from diffusion.scheduler import DDPMScheduler

TINY = {
    "resolution": 32, "batch_size": 8, "denoising_type": "unet",
    "vae": {"latent_dim": 4, "base_channels": 16, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "norm_groups": 8},
    "unet": {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
             "norm_groups": 8, "context_dim": 64},
    "text_encoder": {"width": 64, "depth": 2, "num_heads": 2},
}


def _get(params: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(params, dict) or key not in params:
            return None
        params = params[key]
    return params


def sizes(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The sizes to run at, and where they came from."""
    if args.tiny:
        return TINY, "--tiny"
    try:
        params = load_params(args.params, [f"profile={args.profile}"] if args.profile else [])
    except ConfigError:
        params = {}
    found = {
        "resolution": _get(params, "shard", "resolution") or 64,
        "batch_size": args.batch_size or _get(params, "train", "batch_size") or 32,
        "vae": _get(params, "train_vae", "model") or {},
        "denoising_type": _get(params, "train", "denoising_type") or "unet",
        "unet": _get(params, "train", "unet") or {},
        # The preset over the DiT section, as TrainConfig.denoiser_config applies it.
        "dit": {**(_get(params, "train", "dit") or {}), **DIT_PRESETS.get(_get(params, "train", "dit_preset"), {})},
        "text_encoder": _get(params, "train", "text_encoder") or {},
    }
    used = [k for k in ("vae", found["denoising_type"], "text_encoder") if found[k]]
    where = f"{args.params} with profile {args.profile}" if args.profile else args.params
    return found, f"{where} ({', '.join(used) or 'no model sections: model config defaults'})"


def build_models(s: dict[str, Any], vocab_size: int) -> tuple[torch.nn.Module, ...]:
    """(vae, text encoder, denoiser, label of the denoiser): the denoiser the train stage would build."""
    from diffusion.models.dit import DiT, DiTConfig
    from diffusion.models.unet import UNet, UNetConfig

    vae = AutoencoderKL(VAEConfig.from_dict(s["vae"], "vae")).eval().requires_grad_(False)
    text = TextEncoder(TextEncoderConfig.from_dict({**s["text_encoder"], "vocab_size": vocab_size}, "text_encoder"))
    channels, width, kind = vae.cfg.latent_dim, text.cfg.width, s["denoising_type"]
    io = {"in_channels": channels, "context_dim": width}
    if kind == "dit":
        side = s["resolution"] // vae.downsample_factor
        cfg = DiTConfig.from_dict({**s["dit"], **io, "input_size": side}, "dit")
        return vae, text, DiT(cfg), "DiT"
    if kind == "unet":
        cfg = UNetConfig.from_dict({**s["unet"], **io, "out_channels": channels}, "unet")
        return vae, text, UNet(cfg), "UNet"
    raise ConfigError(f"train.denoising_type: expected unet or dit, got {kind!r}")


class Step:
    """One diffusion training step on latents z0: noise, predict, MSE to the target, AdamW."""

    def __init__(self, text: torch.nn.Module, denoiser: torch.nn.Module) -> None:
        self.text, self.denoiser = text.train(), denoiser.train()
        self.scheduler = DDPMScheduler()
        self.opt = torch.optim.AdamW([*text.parameters(), *denoiser.parameters()], lr=1e-4)
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, z0: torch.Tensor, tokens: torch.Tensor) -> float:
        t = torch.randint(0, self.scheduler.num_timesteps, (z0.shape[0],), generator=self.gen)  # (B,)
        noise = torch.randn(z0.shape, generator=self.gen)  # (B, C, h, w)
        mask = tokens != 0  # (B, T)
        states, pooled = self.text(tokens, mask)  # (B, T, D), (B, D)
        pred = self.denoiser(self.scheduler.add_noise(z0, noise, t), t, states, mask, pooled)
        loss = F.mse_loss(pred, self.scheduler.get_target(z0, noise, t))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()


def on_the_fly(loader: Iterable[dict], vae: torch.nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    for batch in loader:
        with torch.no_grad():
            z = vae.encode(batch["image"]).sample(gen)  # (B, C, h, w); scale 1, shift 0 (random VAE)
        yield z, batch["tokens"]


def cached(loader: Iterable[dict]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in loader:
        yield batch["latents"], batch["tokens"]


def compare(paths: dict[str, tuple[Iterator, Step]], steps: int) -> dict[str, tuple[float, float]]:
    """Median seconds per batch of each path: (data: load, and encode on the fly; step), over `steps`.

    The paths take turns, batch by batch, so both see the same load from anything else on the machine;
    one warm-up batch each first (allocator, first shard opened).
    """
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in paths}
    for i in range(steps + 1):
        for name, (batches, step) in paths.items():
            start = time.perf_counter()
            batch = next(batches)
            middle = time.perf_counter()
            step(*batch)
            if i:
                times[name][0].append(middle - start)
                times[name][1].append(time.perf_counter() - middle)
    return {name: (statistics.median(d), statistics.median(t)) for name, (d, t) in times.items()}


def report(timings: dict[str, tuple[float, float]], batch_size: int) -> None:
    """Samples/s of each path and the ratio, measured and with the step time pooled.

    The step is the same computation on same-shaped tensors in both paths, so a difference in its
    measured time is noise from other processes; the pooled ratio uses one step time for both.
    """
    (fly_data, fly_step), (lat_data, lat_step) = timings["fly"], timings["cached"]
    pooled = statistics.mean([fly_step, lat_step])
    for label, (data, step) in (("on the fly (load images + VAE encode + step)", timings["fly"]),
                                ("cached latents (load latents + step)        ", timings["cached"])):
        print(f"{label}: {batch_size / (data + step):8.2f} samples/s "
              f"(data {data:.3f} s + step {step:.3f} s per batch)")
    measured = (fly_data + fly_step) / (lat_data + lat_step)
    print(f"ratio cached / on the fly: {measured:.2f}x measured, "
          f"{(fly_data + pooled) / (lat_data + pooled):.2f}x with the step time pooled (target >= 2x)")


def prepare(tmp: Path, s: dict[str, Any], vae: torch.nn.Module, n: int) -> tuple[list[str], list[str], Any, float]:
    """Image shards, latent shards (encoded here, timed), and a tokenizer."""
    shapes = ShapesConfig(num_train=n, num_val=1)
    images = write_shards(generate_shapes(shapes, "train", s["resolution"], 0), tmp / "images",
                          samples_per_shard=max(1, n // 4))
    start = time.perf_counter()
    records = encode_records(vae, iter_shards([str(p) for p in images]), s["batch_size"])
    latents = write_latent_shards(rechunk(records, max(1, n // 4)), tmp / "latents")
    encode_s = time.perf_counter() - start
    captions = [x["caption"] for x in iter_shards([str(p) for p in images])]
    tok = train_tokenizer(captions, vocab_size=256, max_length=32)
    return [str(p) for p in images], [str(p) for p in latents], tok, encode_s


def main() -> None:
    from diffusion.data.latents import make_latent_loader

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None,
                        help="read the sizes of this profile (profiles/<name>.yaml over params.yaml), e.g. gpu")
    parser.add_argument("--tiny", action="store_true", help="small models and images, for a quick check")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE",
                        help="override a size, e.g. -S unet.base_channels=64 -S resolution=32 (repeatable)")
    args = parser.parse_args()
    s, source = sizes(args)
    if args.set:
        s, source = apply_overrides(s, args.set), f"{source} with {' '.join(args.set)}"
    torch.manual_seed(0)
    bs, n = s["batch_size"], max(4 * s["batch_size"], s["batch_size"] * (args.steps + 1))
    with tempfile.TemporaryDirectory() as tmp:
        vae = AutoencoderKL(VAEConfig.from_dict(s["vae"], "vae")).eval().requires_grad_(False)
        images, latents, tok, encode_s = prepare(Path(tmp), s, vae, n)
        _, text, denoiser, label = build_models(s, tok.get_vocab_size())
        # Two copies of the same initial networks, one per path, each with its own optimizer.
        steps = {name: Step(copy.deepcopy(text), copy.deepcopy(denoiser)) for name in ("fly", "cached")}
        common = dict(batch_size=bs, shuffle_buffer=bs, epoch_steps=args.steps + 1, caption_dropout=0.1)
        timings = compare({
            "fly": (on_the_fly(make_loader(images, tok, **common), vae), steps["fly"]),
            "cached": (cached(make_latent_loader(latents, tok, latent_scale=1.0, latent_shift=0.0, **common)),
                       steps["cached"]),
        }, args.steps)
    params = sum(p.numel() for p in denoiser.parameters())
    print(f"sizes from {source}: {s['resolution']}px images, batch {bs}, VAE f={vae.downsample_factor} "
          f"C={vae.cfg.latent_dim}, denoiser {label} ({params / 1e6:.2f} M params), "
          f"{torch.get_num_threads()} threads")
    print(f"one-time encode of {n} images: {encode_s:.1f} s ({n / encode_s:.1f} img/s)")
    report(timings, bs)

if __name__ == "__main__":
    main()
