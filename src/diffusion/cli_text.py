"""What the command line shows a person: each command's help as paragraphs, and the project's warnings as lines.

Kept out of ``cli.py`` so that it stays a list of commands.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

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
