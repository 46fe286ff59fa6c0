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

import hashlib
import io
import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
            linear.weight = nn.Parameter(merged_weight(self.weight, self.lora_down.weight, self.lora_up.weight,
                                                       self.scale))
            if self.bias is not None:
                linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


def merged_weight(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B @ A, computed in float32 and returned in W's dtype and device (the merge of
    :meth:`LoRALinear.merged` and of :func:`apply_adapters`, the same operations: the same bits)."""
    delta = (up.to(weight.device).float() @ down.to(weight.device).float()) * scale
    return (weight.detach().float() + delta).to(weight.dtype)


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


# ---- the adapters' file ------------------------------------------------------------------------------------------
#
# Under train.lora the train stage writes, beside the merged model, the adapters alone (ADAPTER_FILE): r * (in + out)
# values per layer, 1-10% of the model, the file one shares or keeps per experiment (diffusers'
# ``pytorch_lora_weights.safetensors`` and ``pipe.load_lora_weights``). It holds, loadable with ``weights_only``:
#
#   format       ADAPTER_FORMAT
#   rank, alpha  of every adapter (the update is alpha / rank * B @ A)
#   base         the model folder the adapters were trained on (train.init_from, as given)
#   base_digest  sha256 of the adapted layers' base weights (weights_digest): applied to another model, or to one
#                they are already merged into, the adapters still load, with a warning (as in diffusers, a LoRA may
#                be put on a model fine-tuned from its base; the warning says when that is not what happens)
#   weights      {"<layer>.lora_down.weight": A, "<layer>.lora_up.weight": B}, the adapted model's state-dict keys

#: The adapters' file in a model folder the train stage wrote under train.lora.
ADAPTER_FILE = "lora.pt"
ADAPTER_FORMAT = 1
_DOWN, _UP = ".lora_down.weight", ".lora_up.weight"


def adapted_layers(module: nn.Module) -> dict[str, LoRALinear]:
    """The :class:`LoRALinear` layers of `module` by dotted name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LoRALinear)}


def weights_digest(module: nn.Module, names: Sequence[str]) -> str:
    """Hex sha256 of the weights and biases of the ``nn.Linear`` layers `names` of `module`, as float32, in sorted
    name order: of a :class:`LoRALinear`, its frozen base weight, so the digest taken while training equals the one
    of the plain layers of the model it started from."""
    h = hashlib.sha256()
    for name in sorted(names):
        layer = module.get_submodule(name)
        for t in (layer.weight, layer.bias):
            if t is not None:
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_adapters(module: nn.Module, path: str | Path, *, base: str) -> Path:
    """Write the adapters of `module` (a model after :func:`inject_lora`) to `path` in the format above, atomically.
    `base`: the model folder they were trained on. Raises ValueError when `module` has no adapter."""
    from diffusion.atomic import atomic_write_bytes

    layers = adapted_layers(module)
    if not layers:
        raise ValueError(f"the {type(module).__name__} has no LoRA adapter to save")
    (rank, alpha), *others = {(m.rank, float(m.alpha)) for m in layers.values()}
    if others:
        raise ValueError("the adapters differ in rank or alpha; the file records one of each")
    weights = {}
    for name, m in layers.items():
        weights[name + _DOWN] = m.lora_down.weight.detach().cpu().clone()
        weights[name + _UP] = m.lora_up.weight.detach().cpu().clone()
    buffer = io.BytesIO()
    torch.save({"format": ADAPTER_FORMAT, "rank": rank, "alpha": alpha, "base": str(base),
                "base_digest": weights_digest(module, list(layers)), "weights": weights}, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def read_adapters(path: str | Path) -> dict[str, Any]:
    """The adapters' file at `path` (a file, or a model folder holding :data:`ADAPTER_FILE`), checked: every layer
    has an A of shape (rank, in) and a B of shape (out, rank). Raises FileNotFoundError when there is none,
    ValueError naming the file when it is not an adapters' file."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected the {ADAPTER_FILE} a train.lora run writes in its "
                                "train.out_dir (or that folder)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # it may come from anyone (pitfall 14)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:  # torch's kinds for a file that is not an archive
        # Not torch's text, which for a file that is not weights-only suggests weights_only=False: that would run
        # whatever the file holds.
        raise ValueError(f"{path}: not a readable adapters' file ({type(e).__name__}: not an archive of tensors that "
                         "torch.save wrote)") from None
    if not isinstance(state, dict) or state.get("format") != ADAPTER_FORMAT \
            or not {"rank", "alpha", "base", "base_digest", "weights"} <= state.keys():
        raise ValueError(f"{path}: not an adapters' file of format {ADAPTER_FORMAT} (a model's model.pt? the "
                         f"adapters are {ADAPTER_FILE}, beside it in a train.lora run's folder)")
    rank, weights = state["rank"], state["weights"]
    names = sorted({k.removesuffix(_DOWN).removesuffix(_UP) for k in weights})
    if not names:
        raise ValueError(f"{path}: holds no adapter")
    for name in names:
        down, up = weights.get(name + _DOWN), weights.get(name + _UP)
        if down is None or up is None or down.ndim != 2 or up.ndim != 2 or down.shape[0] != rank \
                or up.shape[1] != rank:
            raise ValueError(f"{path}: the adapter of {name} is incomplete or not of rank {rank}")
    from diffusion.atomic import file_sha256

    return {**state, "path": str(path), "layers": names, "sha256": file_sha256(path)}


def apply_adapters(module: nn.Module, adapters: dict[str, Any], scale: float = 1.0) -> str | None:
    """Merge the adapters `adapters` (:func:`read_adapters`) into `module`'s layers in place, each layer's weight
    becoming W + scale * alpha / rank * B @ A (diffusers' ``fuse_lora(lora_scale=scale)``; scale 1 gives what the
    train stage exported, to the bit on the same device). Everything is checked before any weight changes: a scale
    that is not finite, or a layer the module lacks or has in another shape (another architecture), raises ValueError
    naming it. Returns a warning
    when the layers' weights are not the ones the adapters were trained on (``base_digest``), else None."""
    source = adapters["path"]
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    layers = {}
    for name in adapters["layers"]:
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            layer = None
        plain_linear = isinstance(layer, nn.Linear) and not isinstance(layer, LoRALinear)
        if not plain_linear:
            raise ValueError(f"{source}: adapts {name}, which this {type(module).__name__} has no plain nn.Linear "
                             "layer for: a model of another architecture than the adapters' base")
        down, up = adapters["weights"][name + _DOWN], adapters["weights"][name + _UP]
        if (up.shape[0], down.shape[1]) != tuple(layer.weight.shape):
            raise ValueError(f"{source}: the adapter of {name} is for a ({up.shape[0]}, {down.shape[1]}) weight; "
                             f"this model's is {tuple(layer.weight.shape)}: another architecture than the adapters' "
                             "base")
        layers[name] = (layer, down, up)
    warning = None
    if weights_digest(module, list(layers)) != adapters["base_digest"]:
        warning = (f"{source}: the adapted layers' weights here are not those of {adapters['base']}, which the "
                   "adapters were trained on: they are merged all the same (a model fine-tuned from that base can "
                   "take them), but were not trained for these weights")
    factor = scale * adapters["alpha"] / adapters["rank"]
    with torch.no_grad():
        for layer, down, up in layers.values():
            layer.weight.copy_(merged_weight(layer.weight, down, up, factor))
    return warning
