"""The console the command line prints on, its one-line error, and the help texts its commands share."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.text import Text

console = Console()

MODEL_HELP = "digits-cnn | torchvision:NAME | hf:PATH | smollm2 | minilm | python:MODULE:FUNCTION"
DATA_HELP = "digits | pydoc | text:FILE | random:C,H,W"
LEVELS_HELP = "comma list (0.3,0.5,2:4) or start:stop:step (default 0.1:0.9:0.1; channel/head/neuron: the fractions every group can take)"


def fail(error: Exception) -> None:
    """Print the error literally (no rich markup or emoji codes: '[batch, tokens]' and ':x:' stay as written), exit 2."""
    console.print(Text.assemble(("error: ", "bold red"), str(error)))
    raise typer.Exit(2)


def echo(text: str) -> None:
    """Print a line holding user text (paths, specs, names) literally."""
    console.print(Text(text))
