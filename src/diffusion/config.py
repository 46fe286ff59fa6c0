"""Typed, frozen, validated configuration: one dataclass per `params.yaml` section or model.

The pattern follows nanoGPT's `GPTConfig` (STYLE.md 1): a frozen dataclass whose fields are documented.
Validation happens once, on load, before any stage does work (STYLE.md 2): unknown keys, wrong types and
out-of-range values raise `ConfigError`, naming the dotted key (``train.lr``) and what was expected. The
CLI turns that error into exit code 2.

A field is declared with :func:`param`, which carries its help text and its bounds::

    @dataclass(frozen=True)
    class ShapesConfig(Config):
        num_train: int = param(10_000, "training images to generate", ge=1)
        level: Literal["single", "pair"] = param("single", "objects per image")

`ShapesConfig.from_dict({"num_train": 5}, "shard.shapes")` validates and builds one; nested `Config`
fields are built recursively, so a whole section is one call. The stages' configs are in
:mod:`diffusion.stage_configs`; the models' beside their models (``diffusion.models.dit.DiTConfig``, ...).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml

from . import dvcfile

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range. The message names the key."""


def param(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A documented config field with optional numeric bounds (checked on every element of a tuple)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple (immutable) as a default, not a mutable container")
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, Config):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it in the field's type (tuples, floats, Paths)."""
    origin = get_origin(tp)
    err = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin is Literal:
        # Equal and of the same type: 32.0 == 32 (and True == 1), but `precision: 32.0` is not the choice 32.
        if not any(value == a and type(value) is type(a) for a in get_args(tp)):
            raise err
        return value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise err
    if tp is type(None):
        if value is not None:
            raise err
        return None
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise err
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise err
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise err
        return tp.from_dict(value, key)
    return _coerce_scalar(value, tp, key, err)


def _coerce_scalar(value: Any, tp: Any, key: str, err: ConfigError) -> Any:
    """:func:`_coerce` for the leaf annotations: bool, int, float, str and Path."""
    if tp is bool:
        if not isinstance(value, bool):
            raise err
        return value
    if tp is int:
        # Whole floats are accepted (1.0e4), and numbers YAML 1.1 reads as strings ("1e4", no dot); bools are
        # refused (True is an int in Python).
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise err from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise err
        if isinstance(value, float) and not value.is_integer():
            raise err
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise err
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise err from None
        if not isinstance(value, (int, float)):
            raise err
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise err
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise err
        return Path(value)
    raise TypeError(f"{key}: unsupported annotation {tp!r}")


def _check_bounds(value: Any, meta: Mapping[str, Any], key: str) -> None:
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        for name, ok, word in (
            ("ge", lambda a, b: a >= b, ">="),
            ("gt", lambda a, b: a > b, ">"),
            ("le", lambda a, b: a <= b, "<="),
            ("lt", lambda a, b: a < b, "<"),
        ):
            bound = meta.get(name)
            if bound is not None and not ok(v, bound):
                raise ConfigError(f"{key}: expected a value {word} {bound}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every config: building from a mapping, validation, and conversion back to plain data."""

    #: Dotted name of the section this config is read from (used in error messages); set by subclasses.
    section: ClassVar[str] = ""

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any] | None, prefix: str | None = None) -> C:
        """Validate `data` against this config's fields and build it. Errors name `prefix.key`."""
        prefix = cls.section if prefix is None else prefix
        data = {} if data is None else data
        if not isinstance(data, Mapping):
            raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            where = f"{prefix}." if prefix else ""
            raise ConfigError(
                f"unknown key {where}{unknown[0]}; expected one of: {', '.join(sorted(fields))}"
            )
        kwargs = {}
        for name, f in fields.items():
            key = f"{prefix}.{name}" if prefix else name
            if name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ConfigError(f"{key}: missing (expected {_type_name(hints[name])})")
                continue
            value = _coerce(data[name], hints[name], key)
            _check_bounds(value, f.metadata, key)
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except ConfigError as e:
            # __post_init__ checks name keys relative to this config; add the section.
            msg = str(e)
            raise ConfigError(f"{prefix}.{msg}" if prefix and not msg.startswith(prefix) else msg) from None

    @classmethod
    def check_explicit(cls, data: Mapping[str, Any], explicit: Mapping[str, str]) -> None:
        """Checks that need to know which values a profile or an override set (``explicit``: dotted key ->
        where it was set) in the section's merged `data`, before it is built. None by default."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists, Paths as strings): what goes to YAML, JSON and MLflow."""
        return _plain(self)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed, validated like a load."""
        return type(self).from_dict({**self.to_dict(), **changes}, type(self).section)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text (with bounds), for `--help` and the docs."""
        out = {}
        for f in dataclasses.fields(cls):
            bounds = [f"{w} {f.metadata[n]}" for n, w in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                      if f.metadata.get(n) is not None]
            out[f.name] = f.metadata.get("help", "") + (f" ({', '.join(bounds)})" if bounds else "")
        return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------------------------------
# params.yaml and DVC-style overrides
# --------------------------------------------------------------------------------------------------


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
