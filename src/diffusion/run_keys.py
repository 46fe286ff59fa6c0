"""Run keys and fingerprints: short hashes of what decides a stage's result, without Lightning.

A stage that can resume (the training stages' checkpoints, encode_latents' finished shards) keeps its partial
work in a folder named by a **run key**: a hash of its resolved parameters (minus those that do not change the
result) and of `extra` inputs the parameters do not capture, fingerprints of the input data, of model files
and of the code. A rerun with the same key continues that work; any change gives a new key, so a resume never
mixes work of two different runs. ``training.checkpointing`` says how the training stages use them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from diffusion.data.locations import is_remote

#: Fields shared by the training configs (`diffusion.stage_configs.TrainerFields`) that change how often things
#: happen, or where, but not the trained weights. Stages add their own (output paths, eval sizes).
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "log_every_n_steps",
    "val_every_n_steps",
    "checkpoint_dir",
)


# --------------------------------------------------------------------------------------------------
# Run keys
# --------------------------------------------------------------------------------------------------


def _drop(params: Mapping[str, Any], exclude: Iterable[str]) -> dict[str, Any]:
    """A deep copy of `params` without the dotted keys in `exclude` (``"model.dropout"`` drops a nested key)."""
    out = json.loads(json.dumps(dict(params), sort_keys=True, default=str))
    for dotted in exclude:
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def run_key(
    params: Mapping[str, Any],
    *,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    extra: Mapping[str, Any] | None = None,
    length: int = 12,
) -> str:
    """A short stable hash of `params` (minus `exclude`) and `extra`: equal iff the run is the same run.

    Args:
        params: the stage's resolved config as plain data (``cfg.to_dict()``).
        exclude: dotted keys that do not change the result.
        extra: other inputs of the result (data and code fingerprints), JSON-serialisable.
        length: hex digits kept (12 = 48 bits; collisions between a user's runs are not a concern).
    """
    payload = {"params": _drop(params, exclude), "extra": dict(extra or {})}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def contents_fingerprint(paths: Iterable[str | Path]) -> str:
    """Hash of the names and bytes of `paths` (files, or folders: every file under them, in path order).

    For small inputs whose content, not size, tells versions apart: a retrained VAE's ``model.pt`` has the same
    size as the one before, a tokenizer of another vocabulary may too. Missing paths count as absent.
    """
    h = hashlib.sha256()
    for root in sorted(Path(p) for p in paths):
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root] if root.is_file() else []
        for f in files:
            h.update(f"{f.name}\0".encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def files_fingerprint(paths: Iterable[str | Path]) -> str:
    """Hash of `paths` (sorted) by content, without reading them: each local shard by the sha256 its folder's
    manifest records (``<split>/../manifest.json``, written by the shard and encode_latents stages), else by
    name and size.

    Not the bytes themselves: hashing gigabytes of shards at every start would cost more than it saves. And
    not the sizes alone: tar pads every file to 10 KiB, so edited captions or a changed image usually keep
    each shard's size, and a rerun would have resumed, and exported, the model of the old data.
    Shards read through a URL (``pipe:``, ``https://``: ``diffusion.data.locations``) count by their full
    URL, since a size would cost a request per shard: keep each version of a dataset under its own prefix.
    """
    manifests: dict[Path, dict] = {}

    def recorded(path: Path) -> str | None:
        folder = path.parent.parent
        if folder not in manifests:
            try:
                manifests[folder] = json.loads((folder / "manifest.json").read_text()).get("sha256") or {}
            except (OSError, ValueError, AttributeError):
                manifests[folder] = {}
        return (manifests[folder].get(path.parent.name) or {}).get(path.name)

    h = hashlib.sha256()
    for p in sorted((str(p) for p in paths), key=Path):  # Path order, as before URLs were accepted
        if is_remote(p):
            h.update(f"{p}\n".encode())
        else:
            path = Path(p)
            h.update(f"{path.name}\0{recorded(path) or path.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def source_fingerprint(*roots: str | Path) -> str:
    """Hash of the contents of every ``.py`` file under `roots` (files or folders), in path order."""
    h = hashlib.sha256()
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for f in files:
            h.update(f"{f.relative_to(root.parent) if f != root else f.name}\0".encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]
