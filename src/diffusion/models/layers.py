"""Building blocks shared by the text encoder, the VAE, the U-Net and the DiT.

Every attention in the project goes through :class:`Attention`, which calls
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels where the
hardware has them). Masks are passed only when some key is really padding, because a mask forces the
slower "math" kernel on several back-ends.

Two inference-only fast paths live here, both exact up to float rounding:

* :func:`reuse_text_keys_values`: while sampling, the text does not change from step to step, so each
  cross-attention projects it to keys and values once per sampling run instead of once per step.
* :class:`FeedForward` on a CPU without autograd runs its first linear and GELU as one oneDNN matrix product
  with the GELU fused into its output stage (:func:`_cpu_linear_gelu`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

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
        # Set by reuse_text_keys_values: {"entry": (the last text tensor, its projection)}, else None.
        self._kv_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _context_kv(self, context: torch.Tensor) -> torch.Tensor:
        """``to_kv(context)``: (B, M, 2 * dim); inside :func:`reuse_text_keys_values` and without autograd,
        reused while the same context tensor comes back (the guided sampler passes one tensor every step)."""
        cache = self._kv_cache
        if cache is None or torch.is_grad_enabled():
            return self.to_kv(context)
        # An identity test, not a value test: the cache holds the tensor, so its memory cannot be reused by
        # another one. Whoever enables the cache promises not to change the context or the weights in place.
        # Text and projection are read and written as one pair, so two threads sampling with one model get
        # each its own projection (at worst recomputed), never the other's.
        stamp = self._kv_stamp(context)
        entry = cache.get("entry")
        if entry is None or entry[0] is not context or entry[1] != stamp:
            entry = (context, stamp, self.to_kv(context))
            cache["entry"] = entry
        return entry[2]

    def _kv_stamp(self, context: torch.Tensor) -> tuple:
        """What a cached projection depends on besides the context's identity: the autocast state, and the
        version counters of the context and of ``to_kv``'s weights, which every in-place change bumps (an
        optimizer step, ``load_state_dict``, an EMA swap), so a changed input is projected anew."""
        device = context.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return (autocast, *(_version(t) for t in (context, self.to_kv.weight, self.to_kv.bias)))

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
            k, v = self._context_kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        # (B, L, C) -> (B, h, L, C/h)
        q, k, v = (z.unflatten(-1, (h, C // h)).transpose(1, 2) for z in (q, k, v))
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, M), broadcast over heads, queries
        if causal and mask is not None:
            # SDPA takes either is_causal or a mask; with both, fold causality into the mask.
            n, m = q.shape[-2], k.shape[-2]
            mask = mask & torch.ones(n, m, dtype=torch.bool, device=x.device).tril()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        y = y.transpose(1, 2).reshape(B, N, C)  # (B, h, N, C/h) -> (B, N, C)
        return self.out(y)


def _version(t: torch.Tensor | None) -> int | None:
    """A tensor's in-place version counter; None for no tensor or an inference tensor (which has none)."""
    if t is None:
        return None
    try:
        return t._version
    except RuntimeError:
        return None


@contextlib.contextmanager
def reuse_text_keys_values(model: nn.Module) -> Iterator[None]:
    """Within the block, every cross-attention of ``model`` projects a text tensor to keys and values once
    and reuses them for as long as the same tensor comes back, when autograd is off (sampling).

    A sampler calls the denoiser once per step with the same text states (classifier-free guidance
    concatenates the conditional and unconditional text once, before the loop), so the projections
    ``to_kv(context)`` of every cross-attention would be recomputed identically at every step. Caching
    them is exact: the result is bit for bit the same. A new text tensor replaces the cached one, and so does
    an in-place change to the text or the projection weights, or another autocast state (each checked per
    call: identity, version counters, autocast dtype). The caches are dropped on exit. With autograd on
    (training), nothing is cached.
    """
    cross = [m for m in model.modules() if isinstance(m, Attention) and m.is_cross]
    for m in cross:
        m._kv_cache = {}
    try:
        yield
    finally:
        for m in cross:
            m._kv_cache = None


# --------------------------------------------------------------------------------------------------
# Blocks shared by the U-Net and the DiT
# --------------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive normalisation's affine step ``x * (1 + scale) + shift`` (DiT's ``modulate``; the AdaGN of
    Dhariwal & Nichol 2021, sec. 3). ``shift`` and ``scale`` must already broadcast against ``x``."""
    return torch.addcmul(shift, x, 1 + scale)


def masked_mean(states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens: states (B, T, D), mask (B, T) bool (True = real) or None -> (B, D)."""
    if mask is None:
        return states.mean(dim=1)
    w = mask.to(states.dtype).unsqueeze(-1)  # (B, T, 1)
    return (states * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def time_text_embedding(
    time_embed: nn.Module, pooled_embed: nn.Module | None, t: torch.Tensor, context: torch.Tensor,
    mask: torch.Tensor | None, pooled: torch.Tensor | None,
) -> torch.Tensor:
    """The conditioning vector of both denoisers: embed(t) (+ a projection of the pooled text).

    Adding a pooled text vector to the timestep embedding is how the U-Nets of Imagen and SDXL condition on
    the caption as a whole (DiT adds its class embedding the same way; PixArt-alpha's adaLN sees only the
    timestep, its text enters by cross-attention alone); without a given `pooled`, the masked mean of the
    text states stands in. Returns (B, D).
    """
    emb = time_embed(t)
    if pooled_embed is not None:
        if pooled is None:
            pooled = masked_mean(context, mask)
        emb = emb + pooled_embed(pooled.to(emb.dtype))
    return emb


def key_padding_mask_or_none(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The text padding mask to hand to :class:`Attention`, or None when no key is padding.

    Without padding the mask is dropped, so scaled_dot_product_attention may use its fast kernels. A row
    with no real token at all (an all-False mask) would make softmax return NaN; such a row attends to
    every token instead. mask: (B, T) bool, True where the token is real.

    Whether the mask can be dropped is decided only for a CPU tensor outside ``torch.compile``. For a
    tensor on an accelerator, ``bool(mask.all())`` would make the host wait for the device on every
    forward (a host sync inside the training step), and under ``torch.compile`` it would break the graph;
    there the mask is always kept: the attention result is the same (an all-True mask masks nothing) and
    the memory-efficient kernels, which take a mask, cost about the same as flash attention on the short
    text sequences this mask is for.
    """
    if mask is None:
        return None
    mask = mask.to(torch.bool)
    if mask.device.type == "cpu" and not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    return mask | ~mask.any(dim=-1, keepdim=True)


#: oneDNN's matrix product with a fused elementwise output stage (the op ``torch.compile`` uses for the same
#: fusion on a CPU); None in a PyTorch build without oneDNN.
_linear_pointwise = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def _cpu_linear_gelu(x: torch.Tensor, linear: nn.Linear, approximate: str) -> torch.Tensor | None:
    """``gelu(linear(x))`` as one oneDNN call, or None where that path does not apply.

    ATen's CPU GELU is a separate pass over the (..., 4D) hidden activations, and its tanh form (DiT's,
    PixArt's) is 3-5x slower than the erf form on AVX-512 (docs/performance.md). oneDNN applies either
    form in the matrix product's output stage, while the tile is still in cache: an MLP's first half of a
    (8, 64, 256) -> 1024 DiT forward takes ~2.6 instead of ~3.0 ms on 2 cores. The result equals
    ``F.gelu(linear(x), approximate=...)`` up to float rounding (1e-7 here).

    Inference only (no autograd: the backward would need the pre-activation, which the fused op does not
    keep), float32 CPU tensors outside autocast (which would run the plain path in bfloat16), and not while
    ``torch.compile`` traces (it does this fusion itself). If oneDNN refuses the call (a build without this
    fusion), the plain path is used from then on.
    """
    global _linear_pointwise
    if (_linear_pointwise is None or torch.is_grad_enabled() or x.device.type != "cpu" or not _plain_linear(linear)
            or x.dtype != torch.float32 or linear.weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()
            or not torch.backends.mkldnn.is_available()):
        return None
    algorithm = "tanh" if approximate == "tanh" else "none"
    try:
        return _linear_pointwise(x, linear.weight, linear.bias, "gelu", [], algorithm)
    except (RuntimeError, NotImplementedError):
        _linear_pointwise = None  # the plain path raises any error that is not this op's
        return None


def _plain_linear(linear: nn.Linear) -> bool:
    """An ``nn.Linear`` whose forward is its own weight and bias: no subclass, and no forward hooks on it or on
    every module (weight_norm, spectral_norm, a user's hook), which the fused call would bypass."""
    module = nn.modules.module
    return (type(linear) is nn.Linear and not linear._forward_hooks and not linear._forward_pre_hooks
            and not getattr(module, "_global_forward_hooks", None)
            and not getattr(module, "_global_forward_pre_hooks", None))


class FeedForward(nn.Module):
    """Position-wise MLP ``Linear -> activation -> Linear`` (Vaswani et al. 2017, sec. 3.3).

    Args:
        dim: input and output width.
        hidden_dim: inner width.
        activation: "gelu" (exact), "gelu_tanh" (DiT, PixArt) or "geglu" (Shazeer 2020, eq. 6; Stable
            Diffusion's U-Net): ``(x W + b) * gelu(x V + c)`` with W and V fused in one projection.
        dropout: dropout on the inner activations.
    """

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__()
        if activation not in ("gelu", "gelu_tanh", "geglu"):
            raise ValueError(f"activation: expected one of 'gelu', 'gelu_tanh', 'geglu', got {activation!r}")
        self.activation = activation
        self.fc1 = nn.Linear(dim, 2 * hidden_dim if activation == "geglu" else hidden_dim)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim)."""
        if self.activation == "geglu":
            h, gate = self.fc1(x).chunk(2, dim=-1)  # (..., hidden_dim) each
            h = h * F.gelu(gate)
        else:
            approximate = "tanh" if self.activation == "gelu_tanh" else "none"
            h = _cpu_linear_gelu(x, self.fc1, approximate)
            if h is None:
                h = F.gelu(self.fc1(x), approximate=approximate)
        return self.fc2(self.drop(h))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block with self-attention, cross-attention to text and a feed-forward layer,
    each residual (Stable Diffusion's ``BasicTransformerBlock``; Rombach et al. 2022, sec. 3.3).

    Args:
        dim: token width.
        num_heads: attention heads.
        context_dim: width of the text states attended to.
        ff_mult: feed-forward inner width as a multiple of ``dim``.
        activation: feed-forward activation (see :class:`FeedForward`).
        dropout: dropout inside the feed-forward layer.
        qkv_bias: bias on the attention input projections (Stable Diffusion has none).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int,
        ff_mult: float = 4.0,
        activation: str = "geglu",
        dropout: float = 0.0,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, num_heads, context_dim=context_dim, qkv_bias=qkv_bias)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, int(dim * ff_mult), activation, dropout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, N, dim); context: (B, T, context_dim); context_mask: (B, T) bool or None -> (B, N, dim)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, key_padding_mask=context_mask)
        return x + self.ff(self.norm3(x))


def sincos_pos_embed_2d(dim: int, gh: int, gw: int) -> torch.Tensor:
    """Fixed 2D sin-cos positions (DiT / MAE ``get_2d_sincos_pos_embed``) for a gh x gw grid.

    Half the channels encode the column, half the row, each as [sin, cos] of ``pos / 10000^(2i/(dim/2))``
    (Vaswani et al. 2017, sec. 3.5). Returns (gh * gw, dim) float32, tokens in row-major (row, column) order.
    """
    quarter = dim // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                                indexing="ij")  # (gh, gw) each

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]  # (gh * gw, dim/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (gh * gw, dim/2)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()  # (gh * gw, dim), column half first as DiT


class SinCosPositions:
    """``positions(gh, gw, device, dtype)`` -> (1, gh * gw, dim) fixed sin-cos positions, computed once per grid
    size, device and dtype and kept (no parameters or buffers: the state dict is unchanged)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, gh: int, gw: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (gh, gw, device, dtype)
        if key not in self._cache:
            self._cache[key] = sincos_pos_embed_2d(self.dim, gh, gw).to(device, dtype)[None]
        return self._cache[key]
