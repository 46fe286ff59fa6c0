"""A small CLIP-like text encoder trained from scratch with the diffusion model.

Architecture after CLIP's text tower (Radford et al. 2021, sec. 2.4; itself GPT-2's Transformer): token and
learned position embeddings, pre-norm Transformer blocks (LayerNorm -> attention -> residual, LayerNorm ->
GELU MLP -> residual), a final LayerNorm. Two deliberate differences from CLIP:

* **Bidirectional attention.** CLIP's mask is causal because its authors wanted the option of a language
  model objective. Here the encoder is only a conditioning network for cross-attention, so every token may
  see the whole caption (as in T5 encoders used by Imagen). Padding tokens are masked as keys instead, which
  keeps the real tokens' states independent of how much padding follows them.
* **No text projection.** CLIP projects the pooled vector into a joint image-text space for its contrastive
  loss; there is no such loss here, so ``pooled`` is the final-LayerNorm state itself.

``pooled`` is the state at the EOS token, as in CLIP: the tokenizer writes ``[BOS] ... [EOS] [PAD]*``
(docs/INTERFACES.md), so the EOS is the last non-padding token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffusion.config import Config, ConfigError, param
from diffusion.models.layers import Attention, FeedForward, key_padding_mask_or_none


@dataclass(frozen=True)
class TextEncoderConfig(Config):
    """Shape of the text encoder. ``width`` is the context width the denoiser cross-attends to."""

    vocab_size: int = param(1000, "tokenizer vocabulary size (the train stage sets it from the tokenizer)", ge=2)
    max_length: int = param(32, "longest token sequence (learned position embeddings)", ge=2)
    width: int = param(256, "hidden width D of the states", ge=1)
    depth: int = param(4, "Transformer blocks", ge=1)
    num_heads: int = param(4, "attention heads; must divide width", ge=1)
    mlp_ratio: float = param(4.0, "MLP hidden width as a multiple of width", gt=0.0)
    pad_token_id: int = param(0, "id of the padding token (masked as an attention key)", ge=0)
    dropout: float = param(0.0, "dropout on embeddings and residual branches", ge=0.0, lt=1.0)

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ConfigError(f"num_heads: must divide width={self.width}, got {self.num_heads}")
        if self.pad_token_id >= self.vocab_size:
            raise ConfigError(f"pad_token_id: must be < vocab_size={self.vocab_size}, got {self.pad_token_id}")


class _Block(nn.Module):
    """Pre-norm Transformer block (GPT-2 / CLIP): x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, int(width * mlp_ratio), "gelu", dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, T, D); key_mask: (B, T) bool, True for real tokens, or None (no padding) -> (B, T, D)."""
        x = x + self.drop(self.attn(self.norm1(x), key_padding_mask=key_mask))
        return x + self.drop(self.mlp(self.norm2(x)))


class TextEncoder(nn.Module):
    """Token ids -> per-token states (for cross-attention) and a pooled caption vector (at the EOS)."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Parameter(torch.zeros(cfg.max_length, cfg.width))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            _Block(cfg.width, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)
        )
        self.final_norm = nn.LayerNorm(cfg.width)
        self.apply(self._init_weights)
        # CLIP initialises position embeddings with std 0.01 and tokens with 0.02; GPT-2 uses 0.02 for both.
        nn.init.normal_(self.position_embedding, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # normal(0, 0.02) for every projection and embedding, zero biases: GPT-2's and CLIP's scheme.
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            tokens: (B, T) long token ids, T <= max_length.
            mask: (B, T) bool, True for real tokens; defaults to ``tokens != pad_token_id``.
        Returns:
            states: (B, T, D) final-LayerNorm states (those at padding positions are not meaningful).
            pooled: (B, D) the state at the last real token, i.e. the EOS (CLIP's pooling).
        """
        B, T = tokens.shape
        if T > self.cfg.max_length:
            raise ValueError(f"token sequence of length {T} exceeds max_length={self.cfg.max_length}")
        mask = (tokens != self.cfg.pad_token_id) if mask is None else mask.to(torch.bool)
        x = self.drop(self.token_embedding(tokens) + self.position_embedding[:T])  # (B, T, D)
        # Padding is masked as keys only when there is some: a mask forces SDPA's slow kernel.
        key_mask = key_padding_mask_or_none(mask)
        for block in self.blocks:
            x = block(x, key_mask)
        states = self.final_norm(x)
        # Index of the last real token: arange * mask peaks there (0 for an all-padding row).
        eos = (torch.arange(T, device=tokens.device) * mask).argmax(dim=1)  # (B,)
        pooled = states[torch.arange(B, device=tokens.device), eos]  # (B, D)
        return states, pooled
