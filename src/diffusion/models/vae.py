"""KL-regularised autoencoder (the "first stage" of Latent Diffusion, Rombach et al. 2022, sec. 3 and app. G).

Images in [-1, 1] are compressed by a factor f = 2**(len(channel_mult) - 1) per side into a latent of
``latent_dim`` channels; the diffusion model then works on latents, which is what makes it affordable. The
layout follows LDM's ``ldm/modules/diffusionmodules/model.py`` (Encoder/Decoder) and diffusers'
``AutoencoderKL``:

    Encoder: conv_in -> per level [ResnetBlock x num_res_blocks, stride-2 Downsample (not the last)]
             -> mid [ResnetBlock, single-head attention, ResnetBlock] -> GroupNorm, SiLU -> conv_out (2C)
    Decoder: conv_in -> mid -> per level, reversed [ResnetBlock x (num_res_blocks + 1), nearest Upsample + conv
             (not the last)] -> GroupNorm, SiLU -> conv_out (3)

The encoder predicts a diagonal Gaussian q(z|x) (:class:`DiagonalGaussian`); its KL to N(0, I) is the
regulariser, weighted very lightly in training (LDM uses 1e-6) so the latent keeps detail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffusion.config import Config, ConfigError, param
from diffusion.models.layers import Attention


@dataclass(frozen=True)
class VAEConfig(Config):
    """Shape of the autoencoder. The downsampling factor is 2**(len(channel_mult) - 1)."""

    in_channels: int = param(3, "image channels", ge=1)
    latent_dim: int = param(4, "latent channels C (LDM's KL-f8 uses 4)", ge=1)
    base_channels: int = param(64, "channels of the first level (LDM: 128)", ge=1)
    channel_mult: tuple[int, ...] = param(
        (1, 2, 4, 4), "channel multiplier per resolution level; each level after the first halves H and W", ge=1
    )
    num_res_blocks: int = param(2, "ResnetBlocks per level in the encoder (the decoder has one more)", ge=1)
    mid_attention: bool = param(True, "single-head self-attention over positions in the middle blocks")
    norm_groups: int = param(32, "GroupNorm groups; must divide every level's channel count", ge=1)
    # tuple[float, ...] and a length check, not tuple[float, float]: config._coerce swaps value and type for
    # fixed-length tuples (reported to the lead).
    logvar_clamp: tuple[float, ...] = param(
        (-30.0, 20.0), "range the predicted log-variance is clamped to (LDM's values; keeps exp() finite)"
    )
    quant_conv: bool = param(True, "1x1 convs on the moments and before the decoder (LDM's quant_conv)")
    logvar_init: float | None = param(
        None,
        "initial bias of the predicted log-variance; null: PyTorch's default (about 0, a posterior as wide as the "
        "prior). A low value such as -8 starts q(z|x) nearly deterministic, as a trained KL-VAE ends up",
    )
    gradient_checkpointing: bool = param(False, "recompute ResnetBlocks in the backward pass to save memory")

    def __post_init__(self) -> None:
        if not self.channel_mult:
            raise ConfigError("channel_mult: expected at least one level, got ()")
        for ch in (self.base_channels * m for m in self.channel_mult):
            if ch % self.norm_groups:
                raise ConfigError(
                    f"norm_groups: must divide every channel count "
                    f"(base_channels * channel_mult = {[self.base_channels * m for m in self.channel_mult]}), "
                    f"got {self.norm_groups}"
                )
        if len(self.logvar_clamp) != 2 or self.logvar_clamp[0] >= self.logvar_clamp[1]:
            raise ConfigError(f"logvar_clamp: expected (low, high) with low < high, got {self.logvar_clamp}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))) (LDM ``DiagonalGaussianDistribution``).

    Args:
        mean, logvar: (B, C, h, w); logvar is clamped to ``clamp``.
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor, clamp: tuple[float, float] = (-30.0, 20.0)) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(*clamp)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar.float())  # float32 for kl(); built here, before sampling, as it always was

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps (reparameterised); the noise is drawn from ``generator`` on its own device."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) = 0.5 * sum(mean^2 + var - 1 - logvar) over the latent dims -> (B,), in float32:
        under bf16 autocast the moments are bf16, whose 8-bit mantissa a sum over thousands of terms would show."""
        # (.float() of a float32 tensor is the tensor itself: the float32 graph, and the order in which autograd
        # sums logvar's gradients from the sample and from this term, are unchanged.)
        return 0.5 * (self.mean.float().pow(2) + self.var - 1.0 - self.logvar.float()).flatten(1).sum(dim=1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # eps=1e-6 and affine, as LDM's Normalize.
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, conv3x3, twice, plus a 1x1 shortcut when the width changes (LDM, no timestep)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            _norm(in_ch, groups), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1),
            _norm(out_ch, groups), nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1),
        )
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, H, W) -> (B, out_ch, H, W)."""
        return self.shortcut(x) + self.block(x)


class SpatialAttention(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map, with a residual (LDM AttnBlock)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.attn = Attention(channels, num_heads=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        h = self.attn(h).transpose(1, 2).reshape(B, C, H, W)  # (B, H*W, C) -> (B, C, H, W)
        return x + h


class Downsample(nn.Module):
    """Stride-2 conv3x3 after padding one pixel right and bottom only: LDM's asymmetric padding, which
    keeps the output exactly H/2 x W/2 with the kernel's window aligned to the top-left."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x then conv3x3 (avoids transposed-conv checkerboards; Odena et al. 2016)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, cfg: VAEConfig) -> list[nn.Module]:
    attn = [SpatialAttention(channels, cfg.norm_groups)] if cfg.mid_attention else []
    return [ResnetBlock(channels, channels, cfg.norm_groups), *attn, ResnetBlock(channels, channels, cfg.norm_groups)]


class _Tower(nn.Module):
    """conv_in -> blocks -> GroupNorm, SiLU, conv_out; the shared skeleton of Encoder and Decoder."""

    def __init__(self, cfg: VAEConfig, in_ch: int, first: int, blocks: list[nn.Module], last: int, out_ch: int):
        super().__init__()
        self.checkpointing = cfg.gradient_checkpointing
        self.conv_in = nn.Conv2d(in_ch, first, 3, padding=1)
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = _norm(last, cfg.norm_groups)
        self.conv_out = nn.Conv2d(last, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def encoder(cfg: VAEConfig) -> _Tower:
    """(B, in_channels, H, W) -> (B, 2 * latent_dim, H/f, W/f): the moments (mean, logvar) of q(z|x)."""
    chans = [cfg.base_channels * m for m in cfg.channel_mult]
    blocks: list[nn.Module] = []
    ch = chans[0]
    for level, out in enumerate(chans):
        for _ in range(cfg.num_res_blocks):
            blocks.append(ResnetBlock(ch, out, cfg.norm_groups))
            ch = out
        if level != len(chans) - 1:
            blocks.append(Downsample(ch))
    blocks += _mid(ch, cfg)
    return _Tower(cfg, cfg.in_channels, chans[0], blocks, ch, 2 * cfg.latent_dim)


def decoder(cfg: VAEConfig) -> _Tower:
    """(B, latent_dim, h, w) -> (B, in_channels, h*f, w*f), mirroring :func:`encoder`."""
    chans = [cfg.base_channels * m for m in cfg.channel_mult]
    ch = chans[-1]
    blocks: list[nn.Module] = _mid(ch, cfg)
    for level in reversed(range(len(chans))):
        for _ in range(cfg.num_res_blocks + 1):
            blocks.append(ResnetBlock(ch, chans[level], cfg.norm_groups))
            ch = chans[level]
        if level != 0:
            blocks.append(Upsample(ch))
    return _Tower(cfg, cfg.latent_dim, chans[-1], blocks, ch, cfg.in_channels)


def _cpu_channels_last(x: torch.Tensor) -> torch.Tensor:
    """`x` in NHWC memory (channels_last) on a CPU, as it is.

    Given an NHWC input, oneDNN runs every convolution of a tower in NHWC and keeps its output so, instead of
    reordering each layer's input and output to its blocked layout and back; GroupNorm, SiLU and the mid
    attention (whose (B, HW, C) tokens are then a free view) follow the layout. With the default VAE on 2
    cores, NHWC against NCHW in one process: encode and decode ~20%, a training step ~9% faster.
    The results (made NCHW again) differ from NCHW's only by float rounding. Not on a GPU, where eager
    channels_last measured slower for this VAE (H200: 976 vs 1197 images/s, docs/performance.md).
    """
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" and x.dim() == 4 else x


class AutoencoderKL(nn.Module):
    """Encoder, Gaussian posterior, decoder. Images in [-1, 1]; latents are *not* scaled here (the measured
    latent scale and shift belong to the diffusion model, pitfall 4)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.latent_dim
        self.encoder = encoder(cfg)
        self.decoder = decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.quant_conv else nn.Identity()
        if cfg.logvar_init is not None:
            # With the default init the posterior starts with std ~1 against latents of std ~1, and only the
            # tiny KL weight and the reconstruction gradient through the noise shrink it, slowly: a short run
            # (our CPU profile) ends with posterior std ~0.5, a decoder that learned to average over that noise
            # (blurred shapes), and diffusion trained on noisy samples. A trained LDM KL-f8 posterior is nearly a
            # point (std << 1), so starting it there costs nothing and removes the slow phase.
            moments = self.quant_conv if cfg.quant_conv else self.encoder.conv_out
            with torch.no_grad():
                moments.bias[c:].fill_(cfg.logvar_init)

    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, in_channels, H, W) in [-1, 1], H and W divisible by the factor -> q(z|x) over (B, C, H/f, W/f)."""
        f = self.downsample_factor
        H, W = x.shape[-2:]
        if H % f or W % f:
            raise ValueError(f"image size {H}x{W} is not divisible by the VAE's downsampling factor {f}")
        moments = self.quant_conv(self.encoder(_cpu_channels_last(x))).contiguous()
        mean, logvar = moments.chunk(2, dim=1)  # 2 x (B, C, h, w)
        return DiagonalGaussian(mean, logvar, self.cfg.logvar_clamp)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, C, h, w) -> (B, in_channels, h*f, w*f), unclamped (about [-1, 1] once trained)."""
        return self.decoder(self.post_quant_conv(_cpu_channels_last(z))).contiguous()

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """x: (B, in_channels, H, W) -> (reconstruction of the same shape, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
