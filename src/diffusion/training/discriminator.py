"""The patch discriminator and the GAN losses of the VAE's optional adversarial term.

Latent Diffusion trains its first stage with "a patch-based adversarial objective" (Rombach et al. 2022,
sec. 3.1), taken from VQGAN (Esser et al. 2021, sec. 3.1): a PatchGAN (Isola et al. 2017, sec. 3.2.2)
judges overlapping patches as real or reconstructed, which pushes the decoder towards sharp local texture
that an L1 loss alone blurs. The network is LDM's / taming-transformers' ``NLayerDiscriminator``; the
losses are ``hinge_d_loss`` and ``vanilla_d_loss`` from ``taming/modules/losses/vqperceptual.py``, and the
adaptive weight is VQGAN's eq. 7.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NLayerDiscriminator(nn.Module):
    """PatchGAN: `num_layers` stride-2 4x4 convs, then two stride-1 4x4 convs, one logit per patch.

    Args:
        in_channels: image channels.
        channels: width of the first conv (doubles per layer, capped at 8x).
        num_layers: stride-2 layers; each patch logit sees a receptive field of 9 * 2**num_layers - 2 px
            (70x70 for 3 layers, the pix2pix default: from one logit back through the two 4x4 convolutions of
            stride 1, 4 then 7 px, then each 4x4 of stride 2 maps r to 2r + 2). An input side must be at least
            3 * 2**num_layers.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        self.num_layers = num_layers
        # BatchNorm follows pix2pix/taming; the conv before a BatchNorm needs no bias.
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    @staticmethod
    def min_size(num_layers: int) -> int:
        """The smallest input side that leaves one patch: n stride-2 convs, then two 4x4 stride-1 convs each
        take one pixel off, so H / 2**n - 2 >= 1."""
        return 3 * 2**num_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) in [-1, 1] -> patch logits (B, 1, h, w)."""
        return self.net(x)


def _init_weights(m: nn.Module) -> None:
    # DCGAN initialisation, as taming's weights_init: N(0, 0.02) convs, N(1, 0.02) norm scales.
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator (Lim & Ye 2017): 0.5 * (E relu(1 - D(x)) + E relu(1 + D(G(z))))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The standard (binary cross-entropy) GAN loss of the discriminator (Goodfellow et al. 2014, eq. 1), in
    softplus form (taming's ``vanilla_d_loss``)."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's (decoder's) adversarial loss, -E D(G(z)), as LDM uses with either D loss."""
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN's adaptive weight (Esser et al. 2021, eq. 7): lambda = |grad_L rec| / (|grad_L g| + delta), with
    delta = 1e-4 as in taming's and LDM's code (the paper states 1e-6).

    The gradients are taken at the decoder's last layer L, so the adversarial term moves the output as
    strongly as the reconstruction term does, whatever their raw scales. Both losses must still have
    their graphs (the caller backpropagates afterwards); the weight itself is a constant (detached).

    Args:
        rec_loss, g_loss: scalar losses.
        last_layer: the weight of the decoder's final conv.
        max_weight: clamp, as LDM (1e4), for the first steps where the GAN gradient is tiny.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
