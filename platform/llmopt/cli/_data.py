"""`llmopt data ...`: the shipped datasets' generator, and a look into any dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from llmopt.cli._app import (
    _fail,
    console,
    data_app,
)


@data_app.command("generate")
def data_generate(
    task: Annotated[str, typer.Option(help="Task: reverse, sort or add.")] = "reverse",
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("."),
    num_train: Annotated[int, typer.Option(help="Training rows.")] = 3000,
    num_test: Annotated[int, typer.Option(help="Held-out rows.")] = 300,
    seed: Annotated[int, typer.Option(help="RNG seed.")] = 0,
) -> None:
    """Generate a synthetic task as <task>.train.jsonl / <task>.test.jsonl (the shipped data's generator)."""
    from llmopt.data import write_task

    try:
        written = write_task(task, out_dir, num_train=num_train, num_test=num_test, seed=seed)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    for split, path in written.items():
        console.print(f"{split}: {path}", highlight=False)


@data_app.command("show")
def data_show(
    dataset: Annotated[str, typer.Argument(help="Built-in name, JSONL file or directory.")] = "reverse",
    split: Annotated[str, typer.Option(help="Split.")] = "train",
    rows: Annotated[int, typer.Option(help="Rows to print.")] = 3,
) -> None:
    """Count a dataset's rows and print a few."""
    from llmopt.data import DatasetError, load_rows

    try:
        loaded = load_rows(dataset, split)
    except DatasetError as exc:
        raise _fail(str(exc)) from None
    console.print(f"{dataset}/{split}: {len(loaded)} rows", highlight=False)
    for row in loaded[:rows]:
        console.print(json.dumps(row, ensure_ascii=False), highlight=False)
