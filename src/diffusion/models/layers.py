"""Building blocks shared by the text encoder, the VAE, the U-Net and the DiT.

Every attention in the project goes through :class:`Attention`, which calls
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels where the
hardware has them). Masks are passed only when some key is really padding, because a mask forces the
slower "math" kernel on several back-ends.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in Vaswani et al. 2017, sec. 3.5,
    and DDPM's U-Net (Ho et al. 2020, appendix B).

    Args:
        t: (B,) timesteps.
        dim: embedding width.
    Returns:
        (B, dim) float32 embedding: cos of the first half of the frequencies, then sin (the order DiT and
        diffusers' ``flip_sin_to_cos=True`` use).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features followed by a 2-layer MLP (DiT `TimestepEmbedder`, DDPM U-Net)."""

    def __init__(self, out_dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) -> (B, out_dim)."""
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head self- or cross-attention through scaled_dot_product_attention.

    Args:
        dim: query width.
        num_heads: heads; ``dim`` must be divisible by it.
        context_dim: key/value input width for cross-attention (None: self-attention, keys = queries).
        qkv_bias: bias on the input projections.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
            self.to_kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        else:
            # One fused projection for q, k and v: one matmul instead of three.
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.out = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """
        Args:
            x: (B, N, dim) queries.
            context: (B, M, context_dim) keys/values for cross-attention; ignored for self-attention.
            key_padding_mask: (B, M) bool, True where the key is a real token, False where it is padding.
            causal: causal self-attention (a token sees only itself and earlier ones).
        Returns:
            (B, N, dim).
        """
        B, N, C = x.shape
        h = self.num_heads
        if self.is_cross:
            if context is None:
                raise ValueError("cross-attention needs a context")
            q = self.to_q(x)
            k, v = self.to_kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        # (B, L, C) -> (B, h, L, C/h)
        q, k, v = (z.unflatten(-1, (h, C // h)).transpose(1, 2) for z in (q, k, v))
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, M), broadcast over heads, queries
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        y = y.transpose(1, 2).reshape(B, N, C)  # (B, h, N, C/h) -> (B, N, C)
        return self.out(y)
