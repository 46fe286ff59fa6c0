"""Fine-tuning: the train stage started from a trained model's weights (``train.init_from``), not random ones.

As diffusers' training scripts start from ``--pretrained_model_name_or_path``: the text encoder and the denoiser take
the (EMA) weights of a model folder the train stage wrote, ``models/diffusion`` of an earlier run, and training goes
on from there on this run's latents with a fresh optimizer, warm-up, learning-rate schedule and EMA (whose average
starts at those weights). The typical use: a model trained long on a large dataset, fine-tuned on a small folder of
one's own images in a few hundred steps. The VAE is not trained here in any case; the run's own (``train.vae_dir``)
is used, and must be the one the weights were trained with: the model folder itself holds it, and every stage takes
a model folder as its ``vae_dir`` (``latent_stats``).

Those weights mean something only with the inputs they were trained with, so before any work (:func:`check_init`)
the stage checks that this run has the same ones and names the key to change where it does not:

- the tokenizer (``train.tokenizer_path``): the same vocabulary, id for id, and the same length. The text
  encoder's embedding rows are indexed by those ids; a tokenizer retrained on the new captions (the shard stage
  trains one) numbers its pieces otherwise. The model's own ``tokenizer.json`` is the one to give. New words are
  no problem for it: a BPE spells any word made of characters it has seen, in smaller pieces; the characters it
  never saw become [UNK], and the stage warns with the share of the captions' tokens they make.
- the VAE: the same encoder weights (``latent_stats.encoder_digest``) and the same latent scale and shift. The
  denoiser learned one latent space, at one scale (Rombach et al. 2022, sec. 4.3.2): latents of
  another VAE are other numbers. The latents' manifest ties them to ``train.vae_dir`` already
  (``training.train_inputs._check_latents_vae``), so the images must be encoded with that model's VAE
  (``encode_latents.vae_dir``: the model folder) too.
- the architecture: the text encoder and denoiser configs this run would build, field by field, except
  ``gradient_checkpointing``, which changes how the backward pass runs, not what the weights are.

What may differ: the data, the batch size, the learning rate and its schedule, the EMA, and the noise schedule and
prediction type (Stable Diffusion 2's v-prediction model was resumed from its epsilon-prediction base model; a
change of target needs more steps to settle).

With ``train.lora.rank`` > 0 the model's weights stay frozen and only low-rank adapters on the layers
``train.lora.targets`` names train (LoRA, Hu et al. 2021; models/lora.py): :func:`add_adapters`. The targets are
checked against the networks before any work too (:func:`check_lora`).
"""

from __future__ import annotations

import copy
import itertools
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from diffusion.config import ConfigError

#: Config fields that do not change the weights (how the backward pass runs): not compared.
RUNTIME_FIELDS = ("gradient_checkpointing",)
#: The parts of the LatentDiffusionModel whose weights are taken; the VAE is the run's own.
TRAINED_PARTS = ("text_encoder", "denoiser")
#: Captions of the first train shard read for the [UNK] warning.
CAPTIONS_CHECKED = 1000


def read_init(init_from: str) -> dict[str, Any]:
    """The config.json of the model folder `init_from`, after checking the folder holds a trained model (config.json
    with a denoising_type, model.pt and tokenizer.json). Raises ConfigError naming ``train.init_from``."""
    folder = Path(init_from)
    if not folder.is_dir():
        raise ConfigError(f"train.init_from: {folder} is not a folder; expected a model folder the train stage wrote "
                          "(its out_dir, e.g. models/diffusion of the run to start from)")
    missing = [name for name in ("config.json", "model.pt", "tokenizer.json") if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"train.init_from: {folder} holds no {' or '.join(missing)}; expected a model folder the "
                          "train stage wrote (its out_dir, e.g. models/diffusion of the run to start from)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"train.init_from: {folder / 'config.json'} is not readable JSON ({e})") from None
    if not isinstance(config, dict) or "denoising_type" not in config:
        raise ConfigError(f"train.init_from: {folder / 'config.json'} is not a text-to-image model's (no "
                          "denoising_type; a VAE's folder?); expected a folder the train stage wrote")
    return config


def _tokenizer_difference(ours: Any, theirs: Any) -> str | None:
    """What differs between two tokenizers in what the text encoder's weights depend on, or None."""
    from diffusion.data.tokenizer import max_length_of

    vocab, init_vocab = ours.get_vocab(), theirs.get_vocab()
    if vocab != init_vocab:
        same = sum(init_vocab.get(piece) == i for piece, i in vocab.items())
        return f"its vocabulary differs ({same} of {len(init_vocab)} pieces have the same id)"
    if max_length_of(ours) != max_length_of(theirs):
        return f"it pads to {max_length_of(ours)} tokens, the model's to {max_length_of(theirs)}"
    return None


def _architecture_differences(cfg: Any, config: dict[str, Any]) -> list[str]:
    """``train.<part>.<field>: <ours> here, <theirs> in the model`` for each field of the text encoder and denoiser
    configs `cfg` builds that differs from the model's `config` (runtime fields left out)."""
    parts = {"text_encoder": ("text_encoder", cfg.text_encoder.to_dict()),
             "denoiser": (cfg.denoising_type, cfg.denoiser_config().to_dict())}
    out = []
    for part, (key, ours) in parts.items():
        theirs = config.get(part) or {}
        for name in sorted(set(ours) | set(theirs)):
            if name not in RUNTIME_FIELDS and ours.get(name) != theirs.get(name):
                out.append(f"train.{key}.{name}: {ours.get(name)!r} here, {theirs.get(name)!r} in the model")
    return out


def _vae_difference(cfg: Any, config: dict[str, Any]) -> str | None:
    """What differs between the run's VAE (train.vae_dir) and the one the model in train.init_from was trained
    with, in what its latents depend on: the encoder, the log-variance clamp, the scale and the shift. Or None."""
    from diffusion.training.latent_stats import encoder_digest, read_vae_config

    vae = read_vae_config(cfg.vae_dir)
    for name in ("latent_scale", "latent_shift"):
        if float(vae[name]) != float(config.get(name, float("nan"))):
            return f"its {name} is {vae[name]}, the model's {config.get(name)}"
    if encoder_digest(cfg.vae_dir) != encoder_digest(cfg.init_from):  # a model folder holds its VAE (latent_stats)
        return "its encoder's weights differ from the model's"
    return None


def check_init(cfg: Any, urls: list[str]) -> None:
    """Refuse, before any work, a ``train.init_from`` whose model was trained with another tokenizer, VAE or
    architecture than this run's (module docstring), and warn about the characters of the captions of the train
    latent shards `urls` its tokenizer never saw (:func:`warn_unknown_characters`). `cfg` as
    ``pipeline.train.resolve_derived`` left it. Raises ConfigError naming the key to change."""
    from diffusion.data.tokenizer import load_tokenizer

    folder = Path(cfg.init_from)
    if folder.resolve() == Path(cfg.out_dir).resolve():
        raise ConfigError(f"train.init_from: {folder} is train.out_dir, which this run replaces (and `dvc repro` "
                          f"removes before the stage runs); copy the model first (cp -r {folder} "
                          f"{folder.parent / 'pretrained'}) and start from the copy")
    config = read_init(cfg.init_from)
    if problem := _tokenizer_difference(load_tokenizer(cfg.tokenizer_path), load_tokenizer(folder / "tokenizer.json")):
        raise ConfigError(f"train.tokenizer_path: {cfg.tokenizer_path} is not the tokenizer of the model in "
                          f"train.init_from ({problem}); the text encoder's weights are indexed by its ids: set "
                          f"train.tokenizer_path to {folder / 'tokenizer.json'}")
    if config.get("denoising_type") != cfg.denoising_type:
        raise ConfigError(f"train.denoising_type: {cfg.denoising_type!r} here, but the model in train.init_from "
                          f"({folder}) is a {config.get('denoising_type')!r}; set train.denoising_type to it")
    if differences := _architecture_differences(cfg, config):
        raise ConfigError(f"train.init_from: the model in {folder} has another architecture than this run builds; "
                          f"set {len(differences)} key(s) to the model's: " + "; ".join(differences))
    if problem := _vae_difference(cfg, config):
        raise ConfigError(f"train.vae_dir: {cfg.vae_dir} is not the VAE the model in train.init_from ({folder}) "
                          f"was trained with ({problem}): its latents are another space. Set train.vae_dir and "
                          f"encode_latents.vae_dir to {folder} (a model folder holds its VAE) and encode the images "
                          "again (`python cli.py encode-latents`)")
    if cfg.lora.rank:
        check_lora(cfg)
    warn_unknown_characters(urls, load_tokenizer(cfg.tokenizer_path), cfg.init_from)


def _adapted_parts(lora: Any) -> tuple[str, ...]:
    return ("denoiser", "text_encoder") if lora.text_encoder else ("denoiser",)


def check_lora(cfg: Any) -> None:
    """Refuse ``train.lora.targets`` when an adapted network has no layer they name, or when one of them names no
    layer of any adapted network (a typo beside good names would otherwise train less than asked, without a word),
    listing the layers there are. The networks are built on the meta device: no memory, no time. Raises
    ConfigError."""
    from diffusion.models import DENOISERS
    from diffusion.models.lora import linear_names, target_linears
    from diffusion.models.text_encoder import TextEncoder

    with torch.device("meta"):
        nets = {"denoiser": DENOISERS[cfg.denoising_type][1](cfg.denoiser_config()),
                "text_encoder": TextEncoder(cfg.text_encoder)}
    targets, parts = list(cfg.lora.targets), _adapted_parts(cfg.lora)
    layers = {part: ", ".join(linear_names(nets[part])) for part in parts}
    for part in parts:
        if not target_linears(nets[part], targets):
            raise ConfigError(f"train.lora.targets: {targets} name no layer of the {part} "
                              f"({type(nets[part]).__name__}); its nn.Linear layers are {layers[part]}")
    unmatched = [t for t in targets if not any(target_linears(nets[part], [t]) for part in parts)]
    if unmatched:
        raise ConfigError(f"train.lora.targets: {', '.join(map(repr, unmatched))} name(s) no layer of the "
                          f"{' or the '.join(parts)}; " + "; ".join(f"the {part}'s nn.Linear layers are {layers[part]}"
                                                                    for part in parts))


def add_adapters(model: torch.nn.Module, lora: Any) -> None:
    """Freeze the text encoder and the denoiser of `model` and give the layers that `lora` (a LoRAConfig) targets
    low-rank adapters: in the denoiser, and in the text encoder with ``lora.text_encoder``."""
    from diffusion.models.lora import inject_lora

    model.text_encoder.requires_grad_(False)  # inject_lora freezes the networks it adapts
    alpha = lora.alpha if lora.alpha is not None else lora.rank  # diffusers' lora_alpha = rank: scale 1
    for part in _adapted_parts(lora):
        inject_lora(getattr(model, part), lora.targets, lora.rank, alpha)


def lora_summary(model: torch.nn.Module) -> str:
    """What trains in `model` after :func:`add_adapters`, e.g. ``LoRA rank 4 on 30 layers: 58,368 trainable
    parameters, 1.1% of the text encoder's and denoiser's 5.4M`` (the default DiT)."""
    from diffusion.models.lora import LoRALinear, lora_parameter_count

    nets = [getattr(model, part) for part in TRAINED_PARTS]
    adapted = [m for net in nets for m in net.modules() if isinstance(m, LoRALinear)]
    trainable = sum(lora_parameter_count(net) for net in nets)
    total = sum(p.numel() for net in nets for p in net.parameters()) - trainable
    return (f"LoRA rank {adapted[0].rank} on {len(adapted)} layers: {trainable:,} trainable parameters, "
            f"{trainable / total:.1%} of the text encoder's and denoiser's {total / 1e6:.1f}M")


def start_from(model: torch.nn.Module, cfg: Any) -> None:
    """Fine-tuning's start: the text encoder's and denoiser's weights of the model in ``cfg.init_from`` loaded
    into `model` (:func:`load_init_weights`), then, with ``cfg.lora.rank``, frozen under LoRA adapters
    (:func:`add_adapters`)."""
    load_init_weights(model, cfg.init_from)
    if cfg.lora.rank:
        add_adapters(model, cfg.lora)


def exported_model(model: torch.nn.Module, lora: Any) -> torch.nn.Module:
    """`model` as the train stage exports it: under LoRA (``lora.rank``), a copy with each adapter merged into its
    layer (``models.lora.merge_lora``), an ordinary model with the pretrained one's state-dict keys; else `model`."""
    from diffusion.models.lora import merge_lora

    return merge_lora(copy.deepcopy(model)) if lora.rank else model


def save_adapters(model: torch.nn.Module, folder: Path, cfg: Any) -> None:
    """Under ``train.lora``, write the adapters of `model` (the EMA model before :func:`exported_model` merges
    them) to `folder`'s ``lora.pt`` (models/lora.py: the small file to share, ``cli.py sample --lora``, ``cli.py
    merge-lora``); without it, nothing."""
    from diffusion.models.lora import ADAPTER_FILE, save_adapters

    if cfg.lora.rank:
        save_adapters(model, folder / ADAPTER_FILE, base=cfg.init_from)


def load_init_weights(model: torch.nn.Module, init_from: str) -> None:
    """Load the text encoder's and the denoiser's weights of the model folder `init_from` into `model` (a
    LatentDiffusionModel of the same architecture, :func:`check_init`); its VAE stays the run's."""
    from diffusion.training.latent_stats import WEIGHTS_FILE

    # weights_only: a folder may come from anyone (pitfall 14).
    state = torch.load(Path(init_from) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    for part in TRAINED_PARTS:
        prefix = f"{part}."
        getattr(model, part).load_state_dict({k.removeprefix(prefix): v for k, v in state.items()
                                              if k.startswith(prefix)})


def warn_unknown_characters(urls: list[str], tokenizer: Any, init_from: str) -> float:
    """Warn when the captions of the first train shard (up to CAPTIONS_CHECKED) hold characters the tokenizer of
    the model in `init_from` never saw: they become [UNK], which the text encoder cannot tell apart. Returns the
    share of [UNK] among their tokens (special tokens and padding left out)."""
    from diffusion.data import tokenizer as tok
    from diffusion.data.latents import iter_latents

    captions = [s["caption"] for s in itertools.islice(iter_latents(urls[:1]), CAPTIONS_CHECKED)]
    if not captions:
        return 0.0
    tokens = tok.encode(tokenizer, captions)
    text = tokens[(tokens != tok.PAD_ID) & (tokens != tok.BOS_ID) & (tokens != tok.EOS_ID)]
    share = float((text == tok.UNK_ID).float().mean()) if text.numel() else 0.0
    if share > 0:
        words = dict.fromkeys(w for c in captions for w in tok.unknown_words(tokenizer, c))
        chars = dict.fromkeys(ch for w in words for ch in tok.unknown_characters(tokenizer, w))
        warnings.warn(f"train.init_from: {share:.1%} of the caption tokens (first {len(captions)} captions) are "
                      f"[UNK] to the tokenizer of {init_from}, which never saw the characters "
                      f"{''.join(list(chars)[:20])!r} (in e.g. {', '.join(list(words)[:5])}); the text encoder "
                      "cannot tell those apart", stacklevel=3)
    return share
