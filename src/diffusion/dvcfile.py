"""What dvc.yaml declares, read without DVC: the params keys it interpolates and the stages' outputs.

dvc.yaml names each stage's data paths after keys of params.yaml (``${train.out_dir}``), which DVC resolves
from params.yaml when it loads the file, so ``dvc exp run -S train.out_dir=models/big`` moves the output DVC
tracks along with the one the stage writes. Two readers need the same resolution without importing DVC (a
stage runs in a fraction of DVC's import time): the profile check in :mod:`.config` (a profile cannot move
such a path: DVC reads params.yaml alone) and the ``git_dirty`` tag in :mod:`.tracking` (outputs are not
changed code).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

#: ``${section.key}`` (at least one dot: ``${profile}`` selects the profile file and is no path).
_REFERENCE = re.compile(r"\$\{\s*([A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)+)\s*\}")


def interpolated_keys(root: str | Path) -> set[str]:
    """The dotted params keys that ``root/dvc.yaml`` interpolates (``${train.out_dir}`` -> ``train.out_dir``);
    empty without a dvc.yaml."""
    try:
        text = (Path(root) / "dvc.yaml").read_text()
    except OSError:
        return set()
    return set(_REFERENCE.findall(text))


def resolve(value: str, params: Mapping[str, Any]) -> str:
    """`value` with each ``${section.key}`` replaced by that key of `params`, as DVC resolves dvc.yaml from
    params.yaml (a reference `params` lacks is left as written)."""

    def lookup(match: re.Match) -> str:
        node: Any = params
        for part in match.group(1).split("."):
            if not isinstance(node, Mapping) or part not in node:
                return match.group(0)
            node = node[part]
        return str(node)

    return _REFERENCE.sub(lookup, value)


def outputs(root: Path) -> tuple[str, ...]:
    """The paths ``root/dvc.yaml`` declares as stage outputs (outs, metrics, plots), resolved against
    ``root/params.yaml`` as DVC resolves them."""
    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return ()
    try:
        params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        params = {}
    paths = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in (stage or {}).get(kind) or []:
                paths.extend(entry if isinstance(entry, dict) else [entry])
    return tuple(resolve(str(p), params if isinstance(params, Mapping) else {}).rstrip("/") for p in paths)
