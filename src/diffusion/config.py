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
fields are built recursively, so a whole section is one call.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml

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
        if value not in get_args(tp):
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
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
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
    if tp is bool:
        if not isinstance(value, bool):
            raise err
        return value
    if tp is int:
        # YAML reads 1e4 as a float; accept whole floats, refuse bools (True is an int in Python).
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


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read params.yaml (a mapping of sections) and apply overrides. Raises ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return apply_overrides(params, overrides)


def load_section(cls: type[C], path: str | Path = "params.yaml", overrides: tuple[str, ...] | list[str] = ()) -> C:
    """Load one section (``cls.section``) of a params file into its config, overrides applied."""
    params = load_params(path, overrides)
    if cls.section not in params:
        raise ConfigError(f"{path}: section {cls.section!r} is missing")
    return cls.from_dict(params[cls.section], cls.section)


# --------------------------------------------------------------------------------------------------
# Stage: shard
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShapesConfig(Config):
    """The built-in procedural dataset (`diffusion.data.shapes`): coloured shapes with captions."""

    num_train: int = param(10_000, "training images to generate", ge=1)
    num_val: int = param(500, "validation images to generate", ge=1)
    level: Literal["single", "pair"] = param(
        "single", "'single': one object per image; 'pair': two objects and a spatial relation"
    )
    holdout: tuple[str, ...] = param(
        (),
        "attribute combinations kept out of the training split, as 'colour shape' (e.g. 'purple triangle'); "
        "they appear only in val, to measure compositional generalisation",
    )
    holdout_val_fraction: float = param(
        0.2, "fraction of val images drawn from the held-out combinations (when there are any)", ge=0.0, le=1.0
    )


@dataclasses.dataclass(frozen=True)
class ShardConfig(Config):
    """Stage `shard`: a source of images and captions -> WebDataset shards, a tokenizer and a manifest."""

    section: ClassVar[str] = "shard"

    source: Literal["shapes", "folder", "webdataset"] = param(
        "shapes", "'shapes' (built in), 'folder' (your images), or 'webdataset' (existing .tar shards)"
    )
    path: str | None = param(None, "folder or tar glob/list for 'folder' and 'webdataset' sources")
    folder_layout: Literal["auto", "metadata", "captions", "classes"] = param(
        "auto",
        "'metadata': metadata.jsonl with file_name/text; 'captions': side-car .txt per image; "
        "'classes': one subfolder per class; 'auto' picks in that order",
    )
    caption_template: str = param("a photo of a {label}", "caption for class-folder images; {label} is the class")
    resolution: int = param(64, "side of the square images written (resized, centre-cropped)", ge=8)
    val_fraction: float = param(0.05, "fraction of a user source held out for validation", ge=0.0, lt=1.0)
    samples_per_shard: int = param(2_000, "samples in each .tar shard", ge=1)
    image_format: Literal["png", "jpg"] = param("png", "encoding of images in the shards (png is lossless)")
    seed: int = param(0, "seed for generation and the train/val split", ge=0)
    out_dir: str = param("data/shards", "where {train,val}/*.tar and manifest.json are written")
    tokenizer_path: str = param("data/tokenizer.json", "where the trained tokenizer is written")
    vocab_size: int = param(1_000, "tokenizer vocabulary size (BPE, trained on the train captions)", ge=16)
    max_length: int = param(32, "tokens per caption, begin/end included (longer captions are truncated)", ge=4)
    shapes: ShapesConfig = param(ShapesConfig(), "the built-in dataset's options (source: shapes)")

    def __post_init__(self) -> None:
        if self.source != "shapes" and not self.path:
            raise ConfigError(f"path: required for source {self.source!r} (a folder or tar files)")
        if "{label}" not in self.caption_template:
            raise ConfigError(f"caption_template: must contain {{label}}, got {self.caption_template!r}")
