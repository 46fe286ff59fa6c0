"""What the command line shows: the commands' help as paragraphs, the project's own warnings as one line each."""

import warnings
from pathlib import Path

import pytest

from diffusion import cli_text
from diffusion.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_every_commands_help_is_its_docstring_one_line_per_paragraph():
    """Rich wraps help to the terminal and kept the docstring's own line breaks too: ragged lines."""
    cli_text.unwrap_command_help(app)
    helps = {info.callback.__name__: info.help for info in app.registered_commands}
    assert {"shard", "train", "evaluate", "sample"} <= set(helps)
    for name, text in helps.items():
        paragraphs = text.split("\n\n")
        assert len(paragraphs) >= 2 and all(p and "\n" not in p and "  " not in p for p in paragraphs), name
    assert "the final figures to <metrics_path>" in helps["train"]


@pytest.fixture
def plain_warnings():
    saved = warnings.formatwarning
    cli_text.show_warnings_plainly()
    yield
    warnings.formatwarning = saved


@pytest.mark.parametrize("filename, expected", [
    (ROOT / "pipeline/train.py", "warning: train.val_batches: 12 latents\n"),
    (ROOT / "src/diffusion/training/init_from.py", "warning: train.val_batches: 12 latents\n"),
    ("/elsewhere/torch/nn/x.py", "/elsewhere/torch/nn/x.py:7: UserWarning: train.val_batches: 12 latents\n"),
])
def test_the_projects_warnings_print_as_a_line_others_as_python_does(plain_warnings, filename, expected):
    shown = warnings.formatwarning("train.val_batches: 12 latents", UserWarning, str(filename), 7, line="")
    assert shown == expected
