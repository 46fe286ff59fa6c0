"""Training throughput of our denoisers against diffusers' at matched sizes (a script that prints, not a test).

Pairs, each at the same depth, widths, heads, context width and (nearly) the same parameter count:

* ``UNet`` vs ``diffusers.UNet2DConditionModel`` configured like ours: the same levels and ResBlocks,
  scale-shift time conditioning (``resnet_time_scale_shift="scale_shift"``), linear transformer
  projections, GEGLU, and the pooled text through an MLP added to the time embedding
  (``class_embed_type="projection"``).
* ``DiT(adaln_single=True)`` vs ``diffusers.PixArtTransformer2DModel`` (adaLN-single, cross-attention
  to the text states, GELU-tanh MLP). Ours also has a pooled-text projection and a LayerNorm before
  the cross-attention, which PixArt lacks: a fraction of a percent of the parameters. A row for our
  default DiT (per-block adaLN-Zero, more parameters) is printed for information.

One training step = forward + MSE loss + backward + AdamW step, in float32, on text with some padding
(the mask is passed to both). The two models of a pair are timed alternately, step by step, so a load
spike hits both alike; the figure is the median over the timed steps (``--stat min``: the fastest step,
steadier when other processes load the CPU).

    python bench/bench_models.py                 # default sizes, about 1-2 minutes on 2 quiet cores
    python bench/bench_models.py --steps 10 --threads 4 --channels-last
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from diffusion.models.dit import DiT, DiTConfig
from diffusion.models.unet import UNet, UNetConfig


def make_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Latents (B, 4, S, S), timesteps (B,), text states (B, T, D) with a padding mask (B, T), pooled (B, D)."""
    g = torch.Generator().manual_seed(0)
    B, T, D, S = args.batch, args.text_len, args.context_dim, args.size
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]  # (B, T)
    return {
        "x": torch.randn(B, 4, S, S, generator=g),
        "t": torch.randint(0, 1000, (B,), generator=g),
        "context": torch.randn(B, T, D, generator=g),
        "mask": mask,
        "pooled": torch.randn(B, D, generator=g),
        "target": torch.randn(B, 4, S, S, generator=g),
    }


def ours_step(model):
    def forward(b):
        return model(b["x"], b["t"], b["context"], b["mask"], pooled=b["pooled"])
    return forward


def diffusers_unet_step(model):
    def forward(b):
        return model(b["x"], b["t"], encoder_hidden_states=b["context"], class_labels=b["pooled"],
                     encoder_attention_mask=b["mask"], return_dict=False)[0]
    return forward


def pixart_step(model):
    def forward(b):
        return model(b["x"], encoder_hidden_states=b["context"], timestep=b["t"],
                     encoder_attention_mask=b["mask"], return_dict=False)[0]
    return forward


def build_unets(args):
    from diffusers import UNet2DConditionModel

    cfg = UNetConfig(base_channels=args.unet_channels, channel_mult=(1, 2, 4), num_res_blocks=2,
                     attention_levels=(1, 2), num_heads=4, context_dim=args.context_dim, norm_groups=32)
    ours = UNet(cfg)
    kinds = ["CrossAttn" if lvl in cfg.attention_levels else "" for lvl in range(len(cfg.channel_mult))]
    theirs = UNet2DConditionModel(
        sample_size=args.size, in_channels=4, out_channels=4, block_out_channels=cfg.widths,
        down_block_types=tuple(f"{k}DownBlock2D" for k in kinds),
        up_block_types=tuple(f"{k}UpBlock2D" for k in reversed(kinds)),
        layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim, attention_head_dim=cfg.num_heads,
        norm_num_groups=cfg.norm_groups, use_linear_projection=True, resnet_time_scale_shift="scale_shift",
        class_embed_type="projection", projection_class_embeddings_input_dim=cfg.context_dim,
    )
    return ours, theirs


def build_dits(args, adaln_single: bool):
    from diffusers import PixArtTransformer2DModel

    cfg = DiTConfig(input_size=args.size, patch_size=2, hidden_size=args.dit_hidden, depth=args.dit_depth,
                    num_heads=args.dit_heads, context_dim=args.context_dim, adaln_single=adaln_single)
    theirs = PixArtTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads, in_channels=4,
        out_channels=4, num_layers=cfg.depth, cross_attention_dim=cfg.context_dim, sample_size=args.size,
        patch_size=cfg.patch_size, caption_channels=None, use_additional_conditions=False,
    )
    return DiT(cfg), theirs


def train_step(model, forward, opt, batch) -> float:
    """One timed optimizer step; returns seconds."""
    start = time.perf_counter()
    loss = F.mse_loss(forward(batch), batch["target"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def bench_pair(name, pair, args, batch) -> dict:
    """Time both models of a pair alternately; samples/s from the median step."""
    runs = []
    for model, forward in pair:
        model.train()
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        runs.append((model, forward, torch.optim.AdamW(model.parameters(), lr=1e-4), []))
    if args.channels_last:
        batch = {**batch, "x": batch["x"].contiguous(memory_format=torch.channels_last)}
    for i in range(args.warmup + args.steps):
        for model, forward, opt, times in runs:
            dt = train_step(model, forward, opt, batch)
            if i >= args.warmup:
                times.append(dt)
    (ours, _, _, t_ours), (theirs, _, _, t_theirs) = runs
    stat = statistics.median if args.stat == "median" else min
    sps = [args.batch / stat(t) for t in (t_ours, t_theirs)]
    params = [sum(p.numel() for p in m.parameters()) for m in (ours, theirs)]
    return {"name": name, "params": params, "sps": sps, "ratio": sps[0] / sps[1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every model")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=16, help="latent side (4 channels)")
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--context-dim", type=int, default=256)
    p.add_argument("--unet-channels", type=int, default=64, help="U-Net base width (levels x1, x2, x4)")
    p.add_argument("--dit-hidden", type=int, default=256)
    p.add_argument("--dit-depth", type=int, default=6)
    p.add_argument("--dit-heads", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=15, help="timed steps per model (median reported)")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="step time reported: the median, or the fastest (steadier on a loaded machine)")
    p.add_argument("--channels-last", action="store_true", help="channels_last models and latents (both sides)")
    p.add_argument("--no-default-dit", action="store_true", help="skip the informational adaLN-Zero DiT row")
    args = p.parse_args()

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = make_batch(args)
    rows = []
    ours, theirs = build_unets(args)
    pair = [(ours, ours_step(ours)), (theirs, diffusers_unet_step(theirs))]
    rows.append(bench_pair("UNet vs UNet2DConditionModel", pair, args, batch))
    ours, theirs = build_dits(args, adaln_single=True)
    pair = [(ours, ours_step(ours)), (theirs, pixart_step(theirs))]
    rows.append(bench_pair("DiT (adaLN-single) vs PixArt", pair, args, batch))
    if not args.no_default_dit:
        ours, theirs = build_dits(args, adaln_single=False)
        pair = [(ours, ours_step(ours)), (theirs, pixart_step(theirs))]
        rows.append(bench_pair("DiT (adaLN-Zero) vs PixArt [info]", pair, args, batch))
    print_table(rows, args)


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\ntorch {torch.__version__}, {args.threads} threads, float32, batch {args.batch}, "
          f"latents 4x{args.size}x{args.size}, text ({args.batch},{args.text_len},{args.context_dim}) padded, "
          f"{args.stat} of {args.steps} steps after {args.warmup} warm-up{', channels_last' if args.channels_last else ''}")
    cols = ("pair", "params ours", "params diffusers", "ours smp/s", "diffusers smp/s", "ours/diffusers")
    head = f"{cols[0]:36s} {cols[1]:>12s} {cols[2]:>17s} {cols[3]:>11s} {cols[4]:>16s} {cols[5]:>15s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        (po, pd), (so, sd) = r["params"], r["sps"]
        print(f"{r['name']:36s} {po:12,d} {pd:17,d} {so:11.2f} {sd:16.2f} {r['ratio']:14.2f}x")

if __name__ == "__main__":
    main()
