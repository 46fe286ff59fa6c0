"""A module's folder on disk: ``config.json`` (the arguments that rebuild it, STYLE.md 4) beside ``model.pt``
(its state dict). Used by the diffusion model and the evaluation judge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"


def save_module(module: torch.nn.Module, config: dict[str, Any], directory: str | Path) -> Path:
    """Write `config` as JSON and the module's state dict to `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    torch.save(module.state_dict(), directory / WEIGHTS_FILE)
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / CONFIG_FILE).read_text())


def load_weights(module: torch.nn.Module, directory: str | Path, map_location: str | torch.device = "cpu") -> None:
    """Load ``model.pt`` into `module` with ``weights_only=True``: a folder may come from anyone (pitfall 14)."""
    state = torch.load(Path(directory) / WEIGHTS_FILE, map_location=map_location, weights_only=True)
    module.load_state_dict(state)
