"""params.yaml, its profiles and DVC-style overrides: what a stage reads before its config is built.

Three layers, each over the one before (a profile is "params.yaml with these keys changed")::

    params.yaml  <-  profiles/<profile>.yaml  <-  overrides (-S section.key=value)

:func:`load_section` gives one stage's section as its config (:mod:`diffusion.config`), validated; errors
name the file, or the override, and the dotted key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from . import dvcfile
from .config import Config, ConfigError

C = TypeVar("C", bound=Config)

def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one DVC-style override ``section.key=value`` (value read as YAML: ``1e-4``, ``[1, 2]``, ``dit``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected the form section.key=value")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: expected the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return parts, value


def apply_overrides(params: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a deep copy of `params` with ``section.key=value`` overrides set (nested keys allowed).

    A key that does not exist is still set here; the section's config then refuses it by name.
    """
    import copy

    out = copy.deepcopy(params)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a mapping")
            node = child
        node[parts[-1]] = value
    return out


#: The profile that is params.yaml as written (the laptop-CPU run). Its file, profiles/cpu.yaml, holds only
#: empty sections and may be absent: it exists because dvc.yaml names ``profiles/${profile}.yaml``.
BASE_PROFILE = "cpu"
_PROFILE_NAME = re.compile(r"[A-Za-z0-9_-]+")


def profile_path(params_path: str | Path, name: str) -> Path:
    """The file of profile `name` for a params file: ``profiles/<name>.yaml`` beside it."""
    return Path(params_path).parent / "profiles" / f"{name}.yaml"


def _read_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping of sections. Raises ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def read_profile(params: Mapping[str, Any], params_path: str | Path,
                 sections_of: Mapping[str, Any] | None = None) -> tuple[Path | None, dict[str, Any]]:
    """The profile that `params` selects with its ``profile`` key (BASE_PROFILE if absent): (its file, its sections).

    The file is None for the base profile without a file. Raises ConfigError naming the file and the key for
    an unknown profile, and for a key of the profile file that is not a section of params.yaml (of
    `sections_of`, params.yaml as written, when `params` has overrides applied: ``-S train=5`` is the
    override's mistake, not the profile's).
    """
    name = params.get("profile", BASE_PROFILE)
    if not isinstance(name, str) or not _PROFILE_NAME.fullmatch(name):
        raise ConfigError(f"profile: expected a profile name (letters, digits, '_', '-'), got {name!r}")
    path = profile_path(params_path, name)
    if not path.is_file():
        if name == BASE_PROFILE:
            return None, {}
        known = sorted({BASE_PROFILE, *(p.stem for p in path.parent.glob("*.yaml"))})
        raise ConfigError(f"profile: {path} not found for profile {name!r}; expected one of: {', '.join(known)}")
    layer = _read_mapping(path, "profile file")
    sections = [k for k, v in (params if sections_of is None else sections_of).items() if isinstance(v, dict)]
    for section, values in layer.items():
        if section not in sections:
            raise ConfigError(
                f"{path}: unknown key {section!r}; a profile holds sections of {params_path}: {', '.join(sections)}"
            )
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"{path}: {section}: expected a mapping of that section's keys, got {values!r}")
    # dvc.yaml names each stage's data paths after params.yaml's keys (``${train.out_dir}``), and DVC reads
    # params.yaml alone: a profile that moved a path would make the stage write where DVC does not look.
    dvc_keys = dvcfile.interpolated_keys(Path(params_path).parent)
    for section, values in layer.items():
        for key in values or {}:
            if f"{section}.{key}" in dvc_keys:
                raise ConfigError(
                    f"{path}: {section}.{key}: a profile cannot set a path that dvc.yaml reads from "
                    f"{params_path} (DVC does not read profiles); set it in {params_path} or with -S"
                )
    return path, {k: v or {} for k, v in layer.items()}


def merge_layer(base: Mapping[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with `layer`'s values set over it: mappings merge key by key, anything else
    (a value, a list) replaces. A key `base` lacks is added; the section's config judges it."""
    import copy

    out = copy.deepcopy(dict(base))
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_layer(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _layers(path: Path, overrides: list[str] | tuple[str, ...]) -> tuple[dict[str, Any], Path | None, dict[str, Any]]:
    """params.yaml, the selected profile's file and its sections. An override may select the profile."""
    base = _read_mapping(path, "parameters file")
    for text in overrides:  # a misspelt section would otherwise be set, read by no stage, and ignored
        top = parse_override(text)[0][0]
        if top not in base and top != "profile":
            hint = (" (DVC's form for another params file; here -S section.key=value applies over the profile)"
                    if ":" in text.split("=", 1)[0] else "")
            raise ConfigError(f"override {text!r}: {path} has no key {top!r}{hint}; expected one of: {', '.join(base)}")
    profile_file, layer = read_profile(apply_overrides(base, overrides), path, sections_of=base)
    return base, profile_file, layer


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read params.yaml, layer the selected profile over it, then the overrides. Errors name the file.

    Three layers, each over the one before (a profile is "params.yaml with these keys changed"):

        params.yaml  <-  profiles/<profile>.yaml  <-  overrides (``-S section.key=value``)

    ``profile`` is a top-level key of params.yaml (``cpu``, the file as written, by default), so one override
    selects another: ``-S profile=gpu``. DVC's ``dvc exp run -S`` writes into params.yaml itself, the bottom
    layer; a key that the profile sets is changed for DVC in the profile file
    (``-S profiles/gpu.yaml:train.batch_size=128``).
    """
    base, _, layer = _layers(Path(path), overrides)
    return apply_overrides(merge_layer(base, layer), overrides)


def load_section(cls: type[C], path: str | Path = "params.yaml", overrides: tuple[str, ...] | list[str] = ()) -> C:
    """Load one section (``cls.section``) of a params file into its config: profile and overrides applied."""
    path = Path(path)
    base, profile_file, layer = _layers(path, overrides)
    if cls.section not in base:
        raise ConfigError(f"{path}: section {cls.section!r} is missing")
    if layer.get(cls.section):
        # The profile's own values first, so that a mistake in it names its file (not an -S override).
        try:
            cls.from_dict(merge_layer(base[cls.section], layer[cls.section]), cls.section)
        except ConfigError as e:
            try:  # params.yaml's own section is valid by itself (it is the cpu profile), or the mistake is there
                cls.from_dict(base[cls.section], cls.section)
            except ConfigError as own:
                raise ConfigError(f"{path}: {own}") from None
            raise ConfigError(f"{profile_file}: {e}") from None
    params = apply_overrides(merge_layer(base, layer), overrides)
    explicit = dict.fromkeys(_leaves(layer.get(cls.section) or {}), str(profile_file))
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] == cls.section:
            explicit.update(dict.fromkeys(_leaves(value, ".".join(parts[1:])), f"the override {text!r}"))
    if isinstance(params[cls.section], Mapping):
        cls.check_explicit(params[cls.section], explicit)
    return cls.from_dict(params[cls.section], cls.section)


def _leaves(value: Any, prefix: str = "") -> list[str]:
    """The dotted keys of a nested mapping's leaves (`prefix` itself for a value that is not a mapping)."""
    if not isinstance(value, Mapping):
        return [prefix] if prefix else []
    return [leaf for k, v in value.items() for leaf in _leaves(v, f"{prefix}.{k}" if prefix else str(k))]
