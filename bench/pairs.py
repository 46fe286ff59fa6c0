"""The model pairs the benchmarks compare: inputs, diffusers' models configured like ours, forward adapters that
give every model one call signature, and the two guided-sampling paths. Shared by ``bench_models.py`` (CPU),
``gpu.py``, ``gpu_kernels.py`` and ``gpu_common.py`` (GPU); see ``bench_models.py`` for what each pair is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from diffusion.guidance import classifier_free_guidance
from diffusion.models.dit import DiTConfig
from diffusion.models.layers import reuse_text_keys_values
from diffusion.models.unet import UNetConfig

#: A denoiser as the benchmarks call it: (x, t, context, context_mask, pooled) -> prediction (B, C, H, W).
Net = Callable[..., torch.Tensor]


def make_batch(batch: int, text_len: int, context_dim: int, size: int, device: str = "cpu",
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Latents x (B, 4, S, S), timesteps t (B,), text states (B, T, D) with a padding mask (B, T) (every
    caption between T/4 and T tokens long), pooled text (B, D) and a regression target (B, 4, S, S)."""
    g = torch.Generator().manual_seed(seed)
    B, T, D, S = batch, text_len, context_dim, size
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    batch_ = {
        "x": torch.randn(B, 4, S, S, generator=g),
        "t": torch.randint(0, 1000, (B,), generator=g),
        "context": torch.randn(B, T, D, generator=g),
        "mask": torch.arange(T)[None] < lengths[:, None],  # (B, T)
        "pooled": torch.randn(B, D, generator=g),
        "target": torch.randn(B, 4, S, S, generator=g),
    }
    return {k: v.to(device) for k, v in batch_.items()}


def diffusers_unet_like(cfg: UNetConfig, size: int):
    """``UNet2DConditionModel`` with our U-Net's levels, widths, heads and conditioning."""
    from diffusers import UNet2DConditionModel

    kinds = ["CrossAttn" if lvl in cfg.attention_levels else "" for lvl in range(len(cfg.channel_mult))]
    return UNet2DConditionModel(
        sample_size=size, in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=cfg.widths,
        down_block_types=tuple(f"{k}DownBlock2D" for k in kinds),
        up_block_types=tuple(f"{k}UpBlock2D" for k in reversed(kinds)),
        layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
        # diffusers' `attention_head_dim` is, for this model, the number of heads per level.
        attention_head_dim=tuple(cfg.heads(w) for w in cfg.widths),
        norm_num_groups=cfg.norm_groups, use_linear_projection=True, resnet_time_scale_shift="scale_shift",
        class_embed_type="projection", projection_class_embeddings_input_dim=cfg.context_dim,
    )


def pixart_like(cfg: DiTConfig):
    """``PixArtTransformer2DModel`` with our DiT's depth, width, heads, patch and context width."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        cross_attention_dim=cfg.context_dim, sample_size=cfg.input_size, patch_size=cfg.patch_size,
        caption_channels=None, use_additional_conditions=False,
    )


def ours_net(model) -> Net:
    return lambda x, t, context, mask, pooled: model(x, t, context, mask, pooled=pooled)


def diffusers_unet_net(model) -> Net:
    return lambda x, t, context, mask, pooled: model(
        x, t, encoder_hidden_states=context, class_labels=pooled, encoder_attention_mask=mask, return_dict=False)[0]


def pixart_net(model) -> Net:
    return lambda x, t, context, mask, pooled: model(
        x, encoder_hidden_states=context, timestep=t, encoder_attention_mask=mask, return_dict=False)[0]


def call(net: Net, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return net(b["x"], b["t"], b["context"], b["mask"], b["pooled"])


def diffusers_style_guidance(net: Net, cond: dict, uncond: dict, scale: float):
    """The guided model function of diffusers' pipelines, written out: the prompt and negative-prompt
    embeddings concatenated once, then per step ``noise_pred = net(cat([x, x]))``, ``chunk(2)``, combined."""
    B = cond["context"].shape[0]
    both = {k: torch.cat([cond[k], uncond[k].expand(B, *uncond[k].shape[1:])]) for k in cond}

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_c, out_u = net(torch.cat([x, x]), torch.cat([t, t]), both["context"], both["mask"],
                           both["pooled"]).chunk(2)
        return out_u + scale * (out_c - out_u)

    return model_fn


def guidance_inputs(batch: int, text_len: int, context_dim: int, device: str = "cpu") -> tuple[dict, dict]:
    """Conditional text (B rows, padded) and one unconditional row (the null caption: 2 real tokens)."""
    b = make_batch(batch, text_len, context_dim, 4, device, seed=1)
    cond = {"context": b["context"], "mask": b["mask"], "pooled": b["pooled"]}
    g = torch.Generator().manual_seed(2)
    uncond = {
        "context": torch.randn(1, text_len, context_dim, generator=g).to(device),
        "mask": (torch.arange(text_len) < 2)[None].to(device),
        "pooled": torch.randn(1, context_dim, generator=g).to(device),
    }
    return cond, uncond


def sampling_scope(model: torch.nn.Module, ours: bool) -> contextlib.AbstractContextManager:
    """What a sampling run of the model runs inside: ours, ``reuse_text_keys_values`` (as
    ``LatentDiffusionModel.generate``); diffusers', nothing. One scope per run (the text keys and values
    are projected once in it)."""
    return reuse_text_keys_values(model) if ours else contextlib.nullcontext()


def ours_guided(net: Net, cond: dict, uncond: dict, scale: float):
    """Our path: ``guidance.classifier_free_guidance`` over the keyword form of the denoiser."""
    def kw_net(x, t, context, context_mask, pooled):
        return net(x, t, context, context_mask, pooled)
    rename = lambda d: {"context": d["context"], "context_mask": d["mask"], "pooled": d["pooled"]}  # noqa: E731
    return classifier_free_guidance(kw_net, rename(cond), rename(uncond), scale)
