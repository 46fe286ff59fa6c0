"""Classifier-free guidance (Ho & Salimans 2022) as a :class:`~diffusion.samplers.ModelFn` wrapper, and guidance
rescale (Lin et al. 2023): what every sampler of :mod:`diffusion.samplers` runs when a prompt steers the images.

The denoiser is trained with its caption dropped to the null caption some of the time (``train.caption_dropout``),
so one network predicts both the conditional and the unconditional output; sampling mixes the two at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from diffusion.samplers import ModelFn


def rescale_guidance(guided: Tensor, cond: Tensor, rescale: float) -> Tensor:
    """Guidance rescale, Lin et al. 2023 sec. 3.4 eq. 15-16 (diffusers ``rescale_noise_cfg``):
    x_rescaled = x_cfg * std(x_cond) / std(x_cfg) per sample (eq. 15), then mixed
    x = rescale * x_rescaled + (1 - rescale) * x_cfg (eq. 16), against over-exposure at high scales."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided


def _cat_pair(key: str, c: Tensor | None, u: Tensor | None) -> Tensor | None:
    """Concatenate the conditional and unconditional value of one keyword along the batch; an
    unconditional batch of 1 (e.g. the null caption encoded once) is broadcast to the conditional batch."""
    if c is None or u is None:
        if c is not u:
            raise ValueError(f"cond[{key!r}] and uncond[{key!r}] must both be tensors or both be None")
        return None
    if u.shape[0] == 1 and c.shape[0] != 1:
        u = u.expand(c.shape[0], *u.shape[1:])
    return torch.cat([c, u])


def classifier_free_guidance(
    net: Callable[..., Tensor],
    cond: Mapping[str, Tensor | None],
    uncond: Mapping[str, Tensor | None],
    scale: float,
    rescale: float = 0.0,
) -> ModelFn:
    """Wrap `net(x, t, **kwargs)` into a guided :class:`ModelFn` (Ho & Salimans 2022, eq. 6):

    out = uncond + scale * (cond - uncond), on every channel: eq. 6 with scale = 1 + w, the paper's w = 0
    being no guidance (scale is GLIDE's and LDM's s) (pitfall 5: DiT's
    ``forward_with_cfg`` guides only 3 of 4). One batched forward per step:
    ``net(cat[x, x], cat[t, t], **{k: cat[cond[k], uncond[k]]})``. scale == 1 is the conditional model
    alone and runs only the conditional half. `rescale` in [0, 1] is guidance rescale (:func:`rescale_guidance`).
    `cond` and `uncond` hold the same keys (e.g. context, context_mask, pooled); None values stay None.
    """
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale: expected a value in [0, 1], got {rescale}")
    if scale == 1.0:
        return lambda x_t, t: net(x_t, t, **cond)
    both = {k: _cat_pair(k, cond[k], uncond[k]) for k in cond}  # concatenated once, reused every step

    def guided(x_t: Tensor, t: Tensor) -> Tensor:
        out_c, out_u = net(torch.cat([x_t, x_t]), torch.cat([t, t]), **both).chunk(2)  # 2 x (B, C, H, W)
        out = out_u + scale * (out_c - out_u)
        return rescale_guidance(out, out_c, rescale) if rescale > 0 else out

    return guided
