"""Low-rank adaptation (LoRA; Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Fine-tuning changes a pretrained weight W (out x in) by some update; LoRA trains that update in factored form,

    W' = W + (alpha / r) * B @ A,    A: (r, in),  B: (out, r),  r << min(in, out),

with W frozen. Only A and B train: r * (in + out) numbers per layer instead of in * out, so the optimizer's moments
and the gradients are a small fraction of full fine-tuning's, and the update is a small file. B starts at zero, so
the adapted model is exactly the pretrained one before the first step (the paper's sec. 4.1); A starts as
``nn.Linear``'s default (Kaiming-uniform), as peft's does. ``alpha / r`` keeps the update's size independent of the
rank, so a learning rate tuned at one rank carries to another (sec. 4.1 again).

This is diffusers' LoRA fine-tuning (``train_text_to_image_lora.py``: rank r, ``lora_alpha = r``, adapters on the
U-Net's attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0``, the text encoder frozen). Our attention
fuses its projections (``to_qkv`` for self-attention, ``to_kv`` for the text's keys and values), so one adapter
covers what diffusers gives two or three: its rank is shared between them, the same number of trainable values as
one of diffusers' at that rank for a fused pair, fewer than two.

:class:`LoRALinear` is an ``nn.Linear`` (its ``weight`` and ``bias`` keep their state-dict keys), so a pretrained
state dict loads into an adapted model and :func:`merge_lora` turns it back into plain ``nn.Linear`` layers holding
W': the exported model is an ordinary one, which every stage, sampler and served model reads unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a trainable low-rank update: ``y = x W^T + b + (alpha / r) x A^T B^T``.

    The base ``weight`` and ``bias`` are frozen; ``lora_down`` (A) and ``lora_up`` (B) train. Built from an existing
    layer by :meth:`from_linear`, which shares its weight and bias tensors.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if rank < 1:
            raise ValueError(f"rank: expected >= 1, got {rank}")
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.lora_down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_up = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora()
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def reset_lora(self) -> None:
        """A as ``nn.Linear``'s default (Kaiming-uniform, as peft's), B = 0: the layer computes its base's function."""
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float) -> LoRALinear:
        """An adapted copy of `linear` sharing its weight and bias (frozen), on its device and dtype."""
        w = linear.weight
        # Built on the meta device, then given storage: the base weight is `linear`'s, not a second copy.
        layer = cls(linear.in_features, linear.out_features, rank, alpha, bias=linear.bias is not None,
                    device=torch.device("meta"), dtype=w.dtype).to_empty(device=w.device)
        layer.reset_lora()
        layer.weight = nn.Parameter(w.detach(), requires_grad=False)
        layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two thin products, never the (out, in) matrix B @ A: in activation space the update costs
        # r * (in + out) multiply-adds per token, and its backward never forms a full-size weight gradient.
        return F.linear(x, self.weight, self.bias) + self.lora_up(self.lora_down(x)) * self.scale

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding W + (alpha / r) B @ A and the bias: the same function, one product."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=torch.device("meta"))
        with torch.no_grad():
            delta = (self.lora_up.weight.float() @ self.lora_down.weight.float()) * self.scale
            linear.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


def _matches(name: str, targets: Sequence[str]) -> bool:
    """`name` (a dotted module path) is a target or ends with one: ``to_qkv`` matches ``blocks.0.attn.to_qkv``,
    ``adaLN_modulation.1`` matches ``blocks.3.adaLN_modulation.1``."""
    return any(name == t or name.endswith(f".{t}") for t in targets)


def target_linears(module: nn.Module, targets: Sequence[str]) -> list[str]:
    """The dotted names of the ``nn.Linear`` layers of `module` that `targets` name (:func:`_matches`)."""
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear)
            and not isinstance(m, LoRALinear) and name and _matches(name, targets)]


def linear_names(module: nn.Module) -> list[str]:
    """The targets one could give for `module`: each ``nn.Linear``'s name without its block index (the part after
    the last number, or the whole name), in order of appearance, without repeats."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and name:
            parts = name.split(".")
            last_index = max((i for i, p in enumerate(parts[:-1]) if p.isdigit()), default=-1)
            out[".".join(parts[last_index + 1:])] = None
    return list(out)


def inject_lora(module: nn.Module, targets: Sequence[str], rank: int, alpha: float) -> list[str]:
    """Replace every ``nn.Linear`` of `module` that `targets` name by a :class:`LoRALinear` of `rank` sharing its
    weights, and freeze everything else of `module`. Returns the adapted layers' names. Raises ValueError when the
    targets name no layer (naming the layers there are)."""
    names = target_linears(module, targets)
    if not names:
        raise ValueError(f"no nn.Linear layer of the {type(module).__name__} matches {list(targets)}; its layers "
                         f"are {', '.join(linear_names(module))}")
    module.requires_grad_(False)
    for name in names:
        module.set_submodule(name, LoRALinear.from_linear(module.get_submodule(name), rank, alpha))
    return names


def merge_lora(module: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` in `module` (in place) by its merged plain ``nn.Linear``; returns `module`,
    whose state dict then has the keys of the model before :func:`inject_lora`."""
    for name, m in list(module.named_modules()):
        if isinstance(m, LoRALinear):
            module.set_submodule(name, m.merged())
    return module


def lora_parameter_count(module: nn.Module) -> int:
    """The number of trainable values the adapters in `module` hold."""
    return sum(p.numel() for m in module.modules() if isinstance(m, LoRALinear)
               for p in (m.lora_down.weight, m.lora_up.weight))
