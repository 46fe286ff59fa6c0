"""The networks: CLIP-like text encoder, KL autoencoder, U-Net and DiT denoisers, and the latent diffusion
model that wires them (``from diffusion.models import LatentDiffusionModel``)."""

from diffusion.models.diffusion_model import LatentDiffusionModel
from diffusion.models.dit import DIT_PRESETS, DiT, DiTConfig
from diffusion.models.layers import reuse_text_keys_values
from diffusion.models.registry import DENOISERS, register_denoiser
from diffusion.models.text_encoder import TextEncoder, TextEncoderConfig
from diffusion.models.unet import UNet, UNetConfig
from diffusion.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

__all__ = [
    "DENOISERS",
    "DIT_PRESETS",
    "AutoencoderKL",
    "DiT",
    "DiTConfig",
    "DiagonalGaussian",
    "LatentDiffusionModel",
    "TextEncoder",
    "TextEncoderConfig",
    "UNet",
    "UNetConfig",
    "VAEConfig",
    "register_denoiser",
    "reuse_text_keys_values",
]
