"""What the command line shows a person: each command's help as paragraphs, followed by its section's parameters
with the values this command line would run with, and the project's warnings as lines.

Kept out of ``cli.py`` so that it stays a list of commands.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffusion.config import Config, ConfigError
from diffusion.params import load_section

#: The folders whose warnings are the project's: this package and the pipeline's stages beside it.
OUR_CODE = (Path(__file__).resolve().parent, Path(__file__).resolve().parents[2] / "pipeline")


def unwrap_command_help(app: Any) -> None:
    """Give each command of the typer `app` its docstring with every paragraph on one line. Rich wraps the help to
    the terminal's width itself and keeps the line breaks of the source too, so a docstring wrapped at 100
    columns showed a ragged help ("... the final figures" / "to <metrics_path>")."""
    for info in app.registered_commands:
        if info.help is None and info.callback is not None and info.callback.__doc__:
            paragraphs = inspect.cleandoc(info.callback.__doc__).split("\n\n")
            info.help = "\n\n".join(" ".join(p.split()) for p in paragraphs)


def show_warnings_plainly() -> None:
    """Show the project's own warnings as ``warning: <message>``, as ``sample`` prints its own. Python's default
    form adds the file and line that warned and that line of code, which tell a user nothing: the message names
    the key or file to look at. Other libraries' warnings (torch, Lightning) keep Python's form."""
    default = warnings.formatwarning

    def formatwarning(message: Any, category: type[Warning], filename: str, lineno: int, line: str | None = None
                      ) -> str:
        if any(Path(filename).resolve().is_relative_to(folder) for folder in OUR_CODE):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning


def epilog_when_asked(command: str, config: Callable[[], type[Config]]) -> str | None:
    """`_params_epilog` of `config`, built only when this process shows ``<command> --help``.

    It reads params.yaml (the values shown), and the training configs nest model configs that live beside
    their networks (``models/vae.py``), so building their defaults imports torch, about 3 s that every other
    command would pay at start-up.
    """
    argv = sys.argv[1:]
    if command in argv and any(a in ("--help", "-h") for a in argv):
        return _params_epilog(config())
    return None


def _argv_params() -> tuple[Path, list[str]]:
    """The ``--params`` file and ``-S`` overrides on this command line, for the help to read them."""
    params, overrides, argv = Path("params.yaml"), [], sys.argv[1:]
    for i, arg in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg in ("--params", "-p") and nxt:
            params = Path(nxt)
        elif arg.startswith("--params="):
            params = Path(arg.split("=", 1)[1])
        elif arg in ("--set", "-S") and nxt:
            overrides.append(nxt)
        elif arg.startswith("--set="):
            overrides.append(arg.split("=", 1)[1])
    return params, overrides


def _params_epilog(cls: type[Config]) -> str:
    """The section's keys with their help, built-in defaults and (where they differ) the values this command
    would run with: the params file, its profile and the command line's ``-S``, appended to --help."""
    params, overrides = _argv_params()
    try:
        current: Config | None = load_section(cls, params, overrides)
        source = f"{params}" + (f" with -S {' -S '.join(overrides)}" if overrides else "")
        header = (f"Parameters (section '{cls.section}'): '= value' is what {source} sets (its profile included) "
                  f"where it differs from the built-in default; override with -S {cls.section}.KEY=VALUE:")
    except (ConfigError, OSError) as error:  # no params file here, or a bad one: the defaults alone
        current = None
        header = (f"Parameters (section '{cls.section}' of params.yaml), with their built-in defaults ({params} "
                  f"not read: {error}); override with -S {cls.section}.KEY=VALUE:")
    lines = [header, ""]
    lines += _help_lines(cls(), current, cls.section)
    # Typer/rich rewraps epilog text; a blank line between entries keeps one per line.
    return "\n\n".join(lines)


def _help_lines(default: Config, current: Config | None, prefix: str) -> list[str]:
    """One line per key, nested configs (train.scheduler, train.dit, ...) key by key under their own: the
    built-in default, and the value `current` (params.yaml) gives it where that differs."""
    lines, defaults = [], default.to_dict()
    values = current.to_dict() if current is not None else defaults
    for key, text in type(default).help().items():
        value = getattr(default, key)
        if isinstance(value, Config):
            lines.append(f"  {prefix}.{key}: {text}")
            lines += _help_lines(value, getattr(current, key) if current is not None else None, f"{prefix}.{key}")
        elif values[key] != defaults[key]:
            lines.append(f"  {prefix}.{key} = {values[key]!r} (default {defaults[key]!r}): {text}")
        else:
            lines.append(f"  {prefix}.{key} (default {defaults[key]!r}): {text}")
    return lines
