"""The denoiser registry of :class:`~diffusion.models.diffusion_model.LatentDiffusionModel`, and the config
resolution that makes its parts' widths agree.

Denoisers come from a registry, not an ``if/elif`` chain (STYLE.md 3). A new one is a config (a frozen
:class:`~diffusion.config.Config` with ``in_channels`` and ``context_dim`` fields, and ``out_channels`` if it
has one) and an ``nn.Module`` built from it whose ``forward(x, t, context, context_mask=None, pooled=None)``
returns the raw prediction (docs/INTERFACES.md)::

    @dataclass(frozen=True)
    class TinyConfig(Config):
        in_channels: int = param(4, "latent channels")
        context_dim: int = param(256, "text width")

    class Tiny(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.conv = nn.Conv2d(cfg.in_channels, cfg.in_channels, 3, padding=1)
        def forward(self, x, t, context, context_mask=None, pooled=None):
            return self.conv(x)

    register_denoiser("tiny", TinyConfig, Tiny)
    model = LatentDiffusionModel(vocab_size=1000, denoising_type="tiny")

The config may expose ``downsample_factor`` (the U-Net) or ``patch_size`` (the DiT): the latent side must be
a multiple of it, which :meth:`LatentDiffusionModel.generate` checks before doing any work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from diffusion.config import Config, ConfigError
from diffusion.models.dit import DiT, DiTConfig
from diffusion.models.unet import UNet, UNetConfig

DENOISERS: dict[str, tuple[type[Config], type[nn.Module]]] = {"unet": (UNetConfig, UNet), "dit": (DiTConfig, DiT)}


def register_denoiser(
    name: str, config_cls: type[Config], module_cls: type[nn.Module], *, overwrite: bool = False
) -> None:
    """Make ``LatentDiffusionModel(denoising_type=name)`` build ``module_cls(config_cls(...))``."""
    if name in DENOISERS and not overwrite:
        raise ValueError(f"denoiser {name!r} is already registered (pass overwrite=True to replace it)")
    if not (isinstance(config_cls, type) and issubclass(config_cls, Config)):
        raise TypeError(f"config_cls must be a Config subclass, got {config_cls!r}")
    fields = {f.name for f in dataclasses.fields(config_cls)}
    missing = {"in_channels", "context_dim"} - fields
    if missing:
        raise TypeError(f"{config_cls.__name__} lacks the field(s) {sorted(missing)} the model sets")
    DENOISERS[name] = (config_cls, module_cls)


def resolve_config(
    cls: type[Config], given: Config | Mapping[str, Any] | None, forced: dict[str, tuple[Any, str]], key: str
) -> Config:
    """Build ``cls`` from ``given`` with the ``forced`` fields (name -> (value, why)) set; refuse contradictions.

    In a mapping, any value given for a forced field must equal it. A config instance cannot tell an explicit
    value from a default, so there a field left at its default is overwritten and only other values must agree.
    """
    if given is None:
        data: dict[str, Any] = {}
        explicit = set()
    elif isinstance(given, Config):
        if not isinstance(given, cls):
            raise ConfigError(f"{key}: expected a {cls.__name__}, got a {type(given).__name__}")
        data = given.to_dict()
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        explicit = {k for k in forced if data.get(k) != defaults.get(k)}
    elif isinstance(given, Mapping):
        data, explicit = dict(given), set(given)
    else:
        raise ConfigError(f"{key}: expected a mapping or a {cls.__name__}, got {given!r}")
    for name, (value, why) in forced.items():
        if name in explicit and data[name] != value:
            raise ConfigError(f"{key}.{name}: is {data[name]!r} but must be {value!r} ({why})")
        data[name] = value
    return cls.from_dict(data, key)
