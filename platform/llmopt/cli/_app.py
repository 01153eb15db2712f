"""The root command, its groups and what every command shares: consoles, config loading, failing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from llmopt.config import (
    ConfigError,
    load_config,
)

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Search, fine-tune and serve LLMs on Ray.")
config_app = typer.Typer(no_args_is_help=True, help="Validate, show and list run configs.")
models_app = typer.Typer(no_args_is_help=True, help="Build and inspect models of the zoo.")
data_app = typer.Typer(no_args_is_help=True, help="Generate and inspect datasets.")
runs_app = typer.Typer(no_args_is_help=True, help="Inspect fine-tuning run directories.")
app.add_typer(config_app, name="config")
app.add_typer(runs_app, name="runs")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")

console = Console()
err = Console(stderr=True)

Overrides = Annotated[list[str] | None, typer.Argument(help="Overrides as a.b=value (YAML values).")]


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _load(path: Path | None, overrides: list[str] | None):
    try:
        return load_config(path, overrides or [])
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None


def _split_args(args: list[str] | None) -> tuple[list[Path], list[str]]:
    """Positional arguments holding `=` are overrides; the others are config files."""
    args = args or []
    return [Path(a) for a in args if "=" not in a], [a for a in args if "=" in a]


ConfigArgs = Annotated[
    list[str] | None, typer.Argument(help="Config YAML file(s) and a.b=value overrides (YAML values).")
]
