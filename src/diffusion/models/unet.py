"""The text-conditioned U-Net of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", sec. 3.3 and appendix; the layout of diffusers' ``UNet2DConditionModel``).

    x (B,C,h,w) -> conv_in -> [ResBlock (+ SpatialTransformer)] x n, Downsample -> ... -> mid
                                         | skips, concatenated on the way up            |
    out (B,C,h,w) <- GN-SiLU-conv <- ... <- [ResBlock (+ SpatialTransformer)] x (n+1), Upsample
    emb = MLP(sinusoid(t)) [+ MLP(pooled text)]: into every ResBlock (AdaGN scale and shift)
    text states (B,T,D) and mask (B,T): cross-attention in every SpatialTransformer

* ResBlocks take the embedding by scale and shift, ``h = norm(h) * (1 + scale) + shift`` ("AdaGN",
  Dhariwal & Nichol 2021, sec. 3), and their last convolution starts at zero so each block starts as the
  identity (as in their ``guided-diffusion`` code).
* Spatial transformers (GroupNorm, linear ``proj_in``, [self-attention, cross-attention, GEGLU], zero
  ``proj_out``, residual) run at the levels in ``attention_levels`` and in the middle.
* The output ``GroupNorm -> SiLU -> conv`` starts at zero, so the untrained network predicts zero.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffusion.config import Config, ConfigError, param
from diffusion.models.layers import (
    TimestepEmbedder,
    TransformerBlock,
    key_padding_mask_or_none,
    time_text_embedding,
    modulate,
    SinCosPositions,
)


@dataclasses.dataclass(frozen=True)
class UNetConfig(Config):
    """The U-Net denoiser. Widths at level ``i`` are ``base_channels * channel_mult[i]``."""

    in_channels: int = param(4, "latent channels in", ge=1)
    out_channels: int = param(4, "channels predicted (the scheduler's prediction_type target)", ge=1)
    base_channels: int = param(128, "width of the first level", ge=1)
    channel_mult: tuple[int, ...] = param(
        (1, 2, 4), "width multiplier per level; each level after the first halves h and w", ge=1
    )
    num_res_blocks: int = param(2, "ResBlocks per level on the way down (one more on the way up)", ge=1)
    attention_levels: tuple[int, ...] = param(
        (1, 2), "levels (0-based) with a spatial transformer after each ResBlock", ge=0
    )
    num_heads: int = param(4, "attention heads at every level (ignored when head_dim is set)", ge=1)
    head_dim: int | None = param(None, "channels per head; if set, heads = width // head_dim at each level", ge=1)
    context_dim: int = param(256, "width of the text states (the text encoder's width)", ge=1)
    use_pooled: bool = param(True, "add an MLP of the pooled text to the timestep embedding")
    dropout: float = param(0.0, "dropout in the ResBlocks and feed-forward layers", ge=0.0, lt=1.0)
    norm_groups: int = param(32, "GroupNorm groups; must divide every level's width", ge=1)
    position_embedding: bool = param(
        False, "add fixed 2-D sin-cos positions to the tokens of every spatial transformer (off: diffusers')"
    )
    gradient_checkpointing: bool = param(False, "recompute block activations in backward to save memory")

    def __post_init__(self) -> None:
        if not self.channel_mult:
            raise ConfigError("channel_mult: expected at least one level")
        levels = len(self.channel_mult)
        for lvl in self.attention_levels:
            if lvl >= levels:
                raise ConfigError(
                    f"attention_levels: level {lvl} out of range; channel_mult has {levels} levels (0..{levels - 1})"
                )
        for lvl, width in enumerate(self.widths):
            if width % self.norm_groups:
                raise ConfigError(f"norm_groups: {self.norm_groups} does not divide level {lvl}'s width {width}")
            if self.head_dim is not None and width % self.head_dim:
                raise ConfigError(f"head_dim: {self.head_dim} does not divide level {lvl}'s width {width}")
            if self.position_embedding and width % 4:
                raise ConfigError(f"position_embedding: level {lvl}'s width {width} is not divisible by 4")
            if self.head_dim is None and width % self.num_heads:
                raise ConfigError(f"num_heads: {self.num_heads} does not divide level {lvl}'s width {width}")

    @property
    def widths(self) -> tuple[int, ...]:
        """Channel width of each level."""
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def downsample_factor(self) -> int:
        """h and w must be divisible by this (each level after the first halves them)."""
        return 2 ** (len(self.channel_mult) - 1)

    def heads(self, width: int) -> int:
        """Attention heads for a level of this width."""
        return width // self.head_dim if self.head_dim is not None else self.num_heads


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, AdaGN by the embedding, SiLU-dropout-conv (zero-initialised), plus a skip.

    Args:
        in_ch, out_ch: channels in and out (a 1x1 conv matches the skip when they differ).
        emb_dim: width of the timestep (+ text) embedding.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (B, in_ch, H, W); emb: (B, emb_dim) -> (B, out_ch, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, out_ch, 1, 1) each
        h = F.silu(modulate(self.norm2(h), shift, scale))  # AdaGN, Dhariwal & Nichol 2021, sec. 3
        return self.skip(x) + self.conv2(self.drop(h))


class SpatialTransformer(nn.Module):
    """Self- and cross-attention over the pixels of a feature map (Rombach et al. 2022, fig. 3).

    GroupNorm, a linear ``proj_in`` over the channels, one :class:`TransformerBlock`, a zero-initialised
    ``proj_out``, and a residual around the whole, so it starts as the identity.

    With ``position_embedding`` the tokens get fixed 2-D sin-cos positions after ``proj_in``, as a DiT's
    patches do (Peebles & Xie 2023). A plain U-Net knows where it is only from the zero padding of its
    convolutions; with explicit positions a cross-attention query knows its own place and can match it
    against the caption's position words. Measured on the built-in shapes it was not what made position
    learnable (batch 32: 0.22 vs 0.20 after 2000 steps); the loss weighting was (diffusion_system).
    """

    def __init__(self, ch: int, num_heads: int, context_dim: int, groups: int, dropout: float,
                 position_embedding: bool = False) -> None:
        super().__init__()
        self.positions = SinCosPositions(ch) if position_embedding else None
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.block = TransformerBlock(ch, num_heads, context_dim, activation="geglu", dropout=dropout)
        self.proj_out = nn.Linear(ch, ch)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, C, H, W); context: (B, T, D); mask: (B, T) bool or None -> (B, C, H, W)."""
        B, C, H, W = x.shape
        # (B, C, H, W) -> (B, H, W, C) -> (B, HW, C); free when x is channels_last
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C))
        if self.positions is not None:
            h = h + self.positions(H, W, h.device, h.dtype)
        h = self.proj_out(self.block(h, context, mask))
        return x + h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, HW, C) -> (B, C, H, W)


class Stage(nn.Module):
    """One ResBlock, optionally followed by a SpatialTransformer (diffusers' CrossAttn*Block2D unit)."""

    def __init__(self, res: ResBlock, attn: SpatialTransformer | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H, W)."""
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x, context, mask)


class Downsample(nn.Module):
    """3x3 convolution with stride 2: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """Text-conditioned U-Net denoiser. See the module docstring for the layout.

    Call ``model.to(memory_format=torch.channels_last)`` and pass channels_last inputs for the faster
    convolution path; every op here keeps that layout.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths, c0 = cfg.widths, cfg.base_channels
        emb_dim = 4 * c0
        self.time_embed = TimestepEmbedder(emb_dim, freq_dim=c0)
        # Pooled text through an MLP, added to the timestep embedding (SDXL's pooled-text embedding).
        self.pooled_embed = (
            nn.Sequential(nn.Linear(cfg.context_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            if cfg.use_pooled else None
        )
        # The first level's width, base_channels * channel_mult[0], is what conv_in makes and the up path ends at
        # (diffusers' block_out_channels[0]).
        w0 = widths[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, w0, 3, padding=1)
        self.down, skip_chs = self._down_path(emb_dim)
        mid = widths[-1]
        self.mid = nn.ModuleList([self._stage(mid, mid, emb_dim, attention=True), self._stage(mid, mid, emb_dim)])
        self.up = self._up_path(emb_dim, skip_chs)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, w0)
        self.conv_out = nn.Conv2d(w0, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _stage(self, in_ch: int, out_ch: int, emb_dim: int, attention: bool = False) -> Stage:
        """A ResBlock (in_ch -> out_ch), followed by a SpatialTransformer if ``attention``."""
        cfg = self.cfg
        res = ResBlock(in_ch, out_ch, emb_dim, cfg.norm_groups, cfg.dropout)
        if not attention:
            return Stage(res, None)
        attn = SpatialTransformer(out_ch, cfg.heads(out_ch), cfg.context_dim, cfg.norm_groups, cfg.dropout,
                                  position_embedding=cfg.position_embedding)
        return Stage(res, attn)

    def _down_path(self, emb_dim: int) -> tuple[nn.ModuleList, list[int]]:
        """Stages and Downsamples, and the channels of every skip they leave (conv_in's output first)."""
        cfg, widths = self.cfg, self.cfg.widths
        down, skip_chs, ch = nn.ModuleList(), [widths[0]], widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                down.append(self._stage(ch, width, emb_dim, attention=level in cfg.attention_levels))
                ch = width
                skip_chs.append(ch)
            if level < len(widths) - 1:
                down.append(Downsample(ch))
                skip_chs.append(ch)
        return down, skip_chs

    def _up_path(self, emb_dim: int, skip_chs: list[int]) -> nn.ModuleList:
        """num_res_blocks + 1 stages per level, each taking one skip (last in, first out), and Upsamples."""
        cfg, widths = self.cfg, self.cfg.widths
        up, ch, skip_chs = nn.ModuleList(), widths[-1], list(skip_chs)
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                up.append(self._stage(ch + skip_chs.pop(), widths[level], emb_dim, level in cfg.attention_levels))
                ch = widths[level]
            if level > 0:
                up.append(Upsample(ch))
        return up

    def _call(self, module: nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
        """Run a stage, through activation checkpointing when it is on and we are training."""
        if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def embed(self, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None,
              pooled: torch.Tensor | None) -> torch.Tensor:
        """Timestep embedding plus, if ``use_pooled``, the pooled-text embedding: (B, 4 * base_channels)."""
        return time_text_embedding(self.time_embed, self.pooled_embed, t, context, mask, pooled)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the scheduler's target for noisy latents.

        Args:
            x: (B, in_channels, h, w) noisy latents; h and w divisible by ``cfg.downsample_factor``.
            t: (B,) timesteps, float or long.
            context: (B, T, context_dim) text states.
            context_mask: (B, T) bool, True on real tokens; padding keys are ignored by cross-attention.
            pooled: (B, context_dim) pooled text; None with ``use_pooled``: the masked mean of ``context``.
        Returns:
            (B, out_channels, h, w).
        """
        f = self.cfg.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not divisible by {f} (2 ** (levels - 1))")
        emb = self.embed(t, context, context_mask, pooled)
        mask = key_padding_mask_or_none(context_mask)
        h = self.conv_in(x)
        skips = [h]
        for m in self.down:
            h = m(h) if isinstance(m, Downsample) else self._call(m, h, emb, context, mask)
            skips.append(h)
        for m in self.mid:
            h = self._call(m, h, emb, context, mask)
        for m in self.up:
            if isinstance(m, Upsample):
                h = m(h)
            else:
                h = self._call(m, torch.cat([h, skips.pop()], dim=1), emb, context, mask)  # (B, C + C_skip, H, W)
        return self.conv_out(F.silu(self.norm_out(h)))
