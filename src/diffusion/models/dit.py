"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") with
text cross-attention as in PixArt-alpha (Chen et al. 2023, sec. 2.3).

    x (B,C,H,W) ─ patchify (p x p conv, stride p) + 2D sin-cos positions ─> tokens (B, N, D), N = (H/p)(W/p)
    c = MLP(sinusoid(t)) + Linear(pooled text)                                 (B, D)
    N blocks:  x += gate1 * SelfAttn(modulate(LN(x), c))        adaLN-Zero (DiT sec. 3.2)
               x += CrossAttn(LN(x), text states, text mask)    not modulated, as PixArt-alpha's (which
                                                                 has no LN there: x += CrossAttn(x, ...))
               x += gate2 * MLP(modulate(LN(x), c))
    final:     Linear(modulate(LN(x), c)) ─ unpatchify ─> (B, C_out, H, W)

Initialisation follows DiT: xavier-uniform linears, normal(0.02) timestep MLP, and zero adaLN projections
and final layer, so every block starts as the identity and the network starts predicting zero. PixArt-alpha
also zero-initialises the cross-attention output projection; so do we.

With ``adaln_single`` the per-block adaLN projections are replaced by PixArt-alpha's "adaLN-single": one
shared ``Linear(D, 6D)`` of ``c`` plus a learned (6, D) table per block (started at zero here, keeping
adaLN-Zero's identity start), which removes about a quarter of the parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffusion.config import Config, ConfigError, param
from diffusion.models.layers import (
    Attention,
    FeedForward,
    TimestepEmbedder,
    key_padding_mask_or_none,
    time_text_embedding,
    modulate,
    SinCosPositions,
)

#: The DiT paper's model sizes (Peebles & Xie 2023, table 1): (depth, hidden_size, num_heads), times
#: patch sizes 2, 4, 8. Names as in the paper: "DiT-S/2" ... "DiT-XL/8".
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_PRESETS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{p}": {"depth": d, "hidden_size": w, "num_heads": h, "patch_size": p}
    for size, (d, w, h) in _SIZES.items()
    for p in (2, 4, 8)
}


@dataclasses.dataclass(frozen=True)
class DiTConfig(Config):
    """The DiT denoiser. ``DiTConfig.from_preset("DiT-S/2", depth=2)`` builds a paper size, overridden."""

    in_channels: int = param(4, "latent channels in", ge=1)
    input_size: int = param(32, "nominal latent side (other sides divisible by patch_size also work)", ge=1)
    patch_size: int = param(2, "side of the square patches that become tokens", ge=1)
    hidden_size: int = param(384, "token width D; divisible by num_heads and by 4 (2D sin-cos positions)", ge=4)
    depth: int = param(12, "transformer blocks", ge=1)
    num_heads: int = param(6, "attention heads", ge=1)
    mlp_ratio: float = param(4.0, "MLP inner width as a multiple of hidden_size", gt=0.0)
    mlp_activation: Literal["gelu_tanh", "gelu"] = param(
        "gelu_tanh", "the MLP's GELU: 'gelu_tanh', the tanh approximation of DiT and PixArt, or 'gelu', the exact "
        "(erf) one, the same function within 5e-4; PyTorch's CPU kernel for the tanh form is 3-5x slower, a DiT "
        "training step ~2-6% (sampling on a CPU fuses either form into the matrix product: same speed); on a GPU "
        "both are one fused kernel"
    )
    context_dim: int = param(256, "width of the text states (the text encoder's width)", ge=1)
    learn_sigma: bool = param(False, "also predict the variance: output 2 * in_channels channels (DiT)")
    use_pooled: bool = param(True, "add a projection of the pooled text to the timestep conditioning")
    adaln_single: bool = param(False, "PixArt-alpha's shared adaLN-single instead of DiT's per-block adaLN-Zero")
    qkv_bias: bool = param(True, "bias on the attention input projections")
    gradient_checkpointing: bool = param(False, "recompute block activations in backward to save memory")

    def __post_init__(self) -> None:
        if self.input_size % self.patch_size:
            raise ConfigError(f"patch_size: {self.patch_size} does not divide input_size {self.input_size} (the "
                              "nominal latent side)")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"num_heads: {self.num_heads} does not divide hidden_size {self.hidden_size}")
        if self.hidden_size % 4:
            raise ConfigError(f"hidden_size: {self.hidden_size} must be divisible by 4 (2D sin-cos positions)")

    @property
    def out_channels(self) -> int:
        """Channels predicted: ``in_channels``, doubled with ``learn_sigma``."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DiTConfig:
        """A config from :data:`DIT_PRESETS` (e.g. "DiT-B/4"), with fields overridden by keyword."""
        if name not in DIT_PRESETS:
            raise ConfigError(f"preset: unknown DiT preset {name!r}; expected one of: {', '.join(DIT_PRESETS)}")
        return cls.from_dict({**DIT_PRESETS[name], **overrides})


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, PixArt cross-attention, adaLN-Zero MLP (DiT fig. 3; PixArt-alpha fig. 4).

    Args:
        dim: token width D.
        adaln_single: take the shared (B, 6D) modulation and add this block's (6, D) table, instead of
            projecting the (B, D) conditioning with this block's own zero-initialised ``Linear(D, 6D)``.
        mlp_activation: "gelu_tanh" or "gelu" (:attr:`DiTConfig.mlp_activation`).
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int, mlp_ratio: float, qkv_bias: bool,
                 adaln_single: bool, mlp_activation: str = "gelu_tanh") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = Attention(dim, num_heads, context_dim=context_dim, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), activation=mlp_activation)
        if adaln_single:
            self.scale_shift_table = nn.Parameter(torch.zeros(6 * dim))
            self.adaLN_modulation = None
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, N, D); cond: (B, D), or (B, 6D) with adaln_single; context: (B, T, C); mask: (B, T) or None."""
        mod = self.adaLN_modulation(cond) if self.adaLN_modulation is not None else cond + self.scale_shift_table
        shift1, scale1, gate1, shift2, scale2, gate2 = mod[:, None].chunk(6, dim=-1)  # (B, 1, D) each
        # x + gate * f(x) as one addcmul kernel
        x = torch.addcmul(x, gate1, self.attn(modulate(self.norm1(x), shift1, scale1)))
        x = x + self.cross_attn(self.norm_cross(x), context, key_padding_mask=mask)
        return torch.addcmul(x, gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear to p*p*C_out values per token (zero-initialised).

    The modulation is a zero-initialised ``Linear(D, 2D)`` of ``c`` (DiT), or with ``adaln_single`` a
    learned (2, D) table plus ``c`` (PixArt-alpha).
    """

    def __init__(self, dim: int, patch_size: int, out_channels: int, adaln_single: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        if adaln_single:
            self.scale_shift_table = nn.Parameter(torch.randn(2 * dim) / dim**0.5)
            self.adaLN_modulation = None
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D); c: (B, D) -> (B, N, p*p*C_out)."""
        if self.adaLN_modulation is not None:
            mod = self.adaLN_modulation(c)
        else:
            mod = self.scale_shift_table + c.repeat(1, 2)  # (B, 2D)
        shift, scale = mod[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer denoiser with text cross-attention. See the module docstring."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(D)
        self.pooled_embedder = nn.Linear(cfg.context_dim, D) if cfg.use_pooled else None
        self.adaln_single = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D)) if cfg.adaln_single else None
        self.blocks = nn.ModuleList(
            DiTBlock(D, cfg.num_heads, cfg.context_dim, cfg.mlp_ratio, cfg.qkv_bias, cfg.adaln_single,
                     cfg.mlp_activation)
            for _ in range(cfg.depth)
        )
        self.final_layer = FinalLayer(D, p, cfg.out_channels, cfg.adaln_single)
        self.pos_embed = SinCosPositions(cfg.hidden_size)  # (1, gh * gw, D) for a gh x gw token grid
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation (``DiT.initialize_weights``), plus zero cross-attention outputs (PixArt)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the patch embedding as a linear layer
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [self.final_layer.linear, self.adaln_single[1] if self.adaln_single is not None else None]
        zero += [self.final_layer.adaLN_modulation[1] if self.final_layer.adaLN_modulation is not None else None]
        for block in self.blocks:
            zero.append(block.cross_attn.out)
            if block.adaLN_modulation is not None:
                zero.append(block.adaLN_modulation[1])
        for m in zero:
            if m is not None:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """(B, C, gh * p, gw * p) latents -> (B, gh * gw, D) tokens: ``x_embedder``, the DiT's strided p x p
        convolution, computed as what it is, one linear map of each flattened patch.

        Same weights and result as ``x_embedder(x).flatten(2).transpose(1, 2)``, but (1) the tokens come out
        contiguous, where the transposed view would set the memory layout of the whole residual stream
        (elementwise ops keep their first input's strides) and make every LayerNorm copy its input, forward
        and backward (12% more training memory in bench/bench_models.py, 224 vs 198 MiB); and (2) it is one
        matrix product instead of cuDNN's convolution kernels, whose weight gradient over a few input channels
        reduces over every token: 5.1 ms of a 161 ms DiT-B/2 step in a profile on an H200 (bench/gpu_kernels.py,
        docs/performance.md), the same in PixArt.
        """
        p, B, C = self.cfg.patch_size, x.shape[0], x.shape[1]
        patches = x.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
        patches = patches.reshape(B, gh * gw, C * p * p)  # in the order of the conv weight's (C, p, p)
        return F.linear(patches, self.x_embedder.weight.flatten(1), self.x_embedder.bias)

    def unpatchify(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """(B, gh * gw, p*p*C) tokens -> (B, C, gh * p, gw * p) image."""
        p, c = self.cfg.patch_size, self.cfg.out_channels
        x = x.reshape(x.shape[0], gh, gw, p, p, c)  # (B, gh, gw, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, gh, p, gw, p)
        return x.reshape(x.shape[0], c, gh * p, gw * p)  # (B, C, H, W)

    def condition(self, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None,
                  pooled: torch.Tensor | None) -> torch.Tensor:
        """c = MLP(sinusoid(t)) + Linear(pooled): (B, D). Without ``pooled``, the masked mean of ``context``."""
        return time_text_embedding(self.t_embedder, self.pooled_embedder, t, context, mask, pooled)

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
            x: (B, in_channels, H, W) noisy latents; H and W divisible by ``patch_size`` (any such size,
                not only ``input_size``: positions are computed for the actual grid).
            t: (B,) timesteps, float or long.
            context: (B, T, context_dim) text states.
            context_mask: (B, T) bool, True on real tokens; padding keys are ignored by cross-attention.
            pooled: (B, context_dim) pooled text; None: the mean of ``context`` over its real tokens.
        Returns:
            (B, out_channels, H, W); ``out_channels`` is ``2 * in_channels`` with ``learn_sigma``.
        """
        p = self.cfg.patch_size
        H, W = x.shape[-2:]
        if H % p or W % p:
            raise ValueError(f"latent size {(H, W)} is not divisible by patch_size {p}")
        gh, gw = H // p, W // p
        h = self.patchify(x, gh, gw)  # (B, gh * gw, D)
        h = h + self.pos_embed(gh, gw, h.device, h.dtype)
        c = self.condition(t, context, context_mask, pooled)  # (B, D)
        cond = self.adaln_single(c) if self.adaln_single is not None else c  # (B, 6D) or (B, D)
        mask = key_padding_mask_or_none(context_mask)
        ckpt = self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if ckpt:
                h = checkpoint(block, h, cond, context, mask, use_reentrant=False)
            else:
                h = block(h, cond, context, mask)
        return self.unpatchify(self.final_layer(h, c), gh, gw)  # (B, gh * gw, p*p*C) -> (B, C, H, W)
