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
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

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
            if isinstance(value, bool) and any(isinstance(a, str) for a in get_args(tp)):
                # YAML 1.1 reads yes/no/on/off (any case) as booleans, in params.yaml and in -S alike.
                raise ConfigError(f"{err}: YAML reads yes, no, on and off as true or false; quote a word meant "
                                  "as text") from None
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
                value = float(value)
            except ValueError:
                raise err from None
        if not isinstance(value, (int, float)):
            raise err
        # No parameter here means anything at infinity or NaN (YAML's .inf and .nan), and bounds cannot catch them
        # all (inf >= 0 holds): refused at load rather than minutes later, at the step that uses the value.
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
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
