"""`llmopt finetune`, `llmopt eval` and `llmopt runs ...`: training, evaluation and run directories."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from llmopt.cli._app import (
    Overrides,
    _fail,
    _load,
    _quiet_transformers,
    app,
    console,
    runs_app,
)
from llmopt.config import (
    ConfigError,
)


@app.command("eval")
def eval_command(
    config_file: Annotated[Path | None, typer.Option("--config", "-c", help="Run config YAML.")] = None,
    overrides: Overrides = None,
    split: Annotated[str | None, typer.Option(help="Split to evaluate; default data.eval_split.")] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write the result as JSON (with --ray: default outputs/eval/NAME.json)."
        ),
    ] = None,
    on_ray: Annotated[
        bool,
        typer.Option(
            "--ray/--here",
            help="Run as a Ray task sized from the config's resources (the embedded cluster, or "
            "RAY_ADDRESS's) instead of in this process.",
        ),
    ] = False,
) -> dict[str, Any]:
    """Exact match and response loss of the config's model on the held-out split (`python -m jobs.evaluate`
    is this command with --ray)."""
    from llmopt.data import DatasetError
    from llmopt.devices import DeviceError
    from llmopt.evaluation import evaluate_here, evaluate_on_ray
    from llmopt.models import ModelLoadError

    config = _load(config_file, overrides)
    _quiet_transformers()
    try:
        result = evaluate_on_ray(config, split) if on_ray else evaluate_here(config, split)
    except (DeviceError, ConfigError) as exc:
        raise _fail(str(exc), 2) from None
    except (ModelLoadError, DatasetError) as exc:
        raise _fail(str(exc)) from None
    split = split or config.data.eval_split
    console.print(
        f"{config.model.name_or_path} on {config.data.dataset}/{split}: "
        f"exact match {result['exact_match']:.1%} ({result['num_correct']}/{result['num_examples']}), "
        f"loss {result['loss']:.4f} "
        f"({result['seconds']:.1f} s on {result['device']}, {result['torch_threads']} thread(s))",
        highlight=False,
    )
    for sample in result["samples"][:3]:
        console.print(f"  expected {sample['expected']!r}, got {sample['completion']!r}", highlight=False)
    output = output or (Path(f"outputs/eval/{config.name}.json") if on_ray else None)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        record = {"config": config.model_dump(mode="json"), "split": split, **result}
        output.write_text(json.dumps(record, indent=2))
        console.print(f"written: {output}", highlight=False)
    return result


@app.command("merge")
def merge_command(
    run: Annotated[Path, typer.Argument(help="Fine-tuning run directory, or a peft adapter folder.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to write (default: RUN/merged).")
    ] = None,
):
    """Merge a run's adapter (LoRA, DoRA, IA3, LoHa, LoKr) into its base model and save a plain model
    directory, for `model.name_or_path` anywhere (DoRA, IA3, LoHa and LoKr adapters are served this way)."""
    from llmopt.models import MergeError, merge_adapter

    _quiet_transformers()
    try:
        target = merge_adapter(run, output)
    except MergeError as exc:
        raise _fail(str(exc), 2) from None
    console.print(f"merged model: {target}", highlight=False)
    console.print(f"serve it: llmopt serve model.name_or_path={target}", highlight=False)


@app.command("prune")
def prune_command(
    config_file: Annotated[Path | None, typer.Option("--config", "-c", help="Run config YAML.")] = None,
    overrides: Overrides = None,
    sparsity: Annotated[
        float, typer.Option(help="Fraction of each decoder linear layer's weights to zero.")
    ] = 0.5,
    pattern: Annotated[
        str, typer.Option(help="`unstructured` (magnitude, per layer) or `2:4`.")
    ] = "unstructured",
    recover_steps: Annotated[
        int, typer.Option(help="LoRA recovery fine-tune steps on the config's data (0: none).")
    ] = 0,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Model directory (default: output_dir/NAME-prunedP)."),
    ] = None,
):
    """Prune the config's model (magnitude pruning of its decoder's linear layers through torch's pruning
    utilities), optionally recover with a short LoRA fine-tune on Ray Train, and write a model directory
    that `model.name_or_path` loads anywhere."""
    from llmopt.processes import ray_session
    from llmopt.train import prune_to_directory

    config = _load(config_file, overrides)
    _quiet_transformers()
    # Only the recovery fine-tune needs Ray (a local cluster, or RAY_ADDRESS's).
    with ray_session("llmopt prune") if recover_steps > 0 else contextlib.nullcontext():
        try:
            target, report = prune_to_directory(config, sparsity, pattern, output, recover_steps)
        except (ValueError, ConfigError) as exc:
            raise _fail(str(exc), 2) from None
        except RuntimeError as exc:
            raise _fail(str(exc)) from None
    console.print(
        f"pruned {report['layers']} linear layers of {report['source']}: {report['sparsity']:.1%} of their "
        f"weights are zero ({report['pattern']})",
        highlight=False,
    )
    if report["recovery"]:
        rec = report["recovery"]
        console.print(
            f"recovered with {rec['steps']} LoRA steps: held-out loss {rec['eval_loss']:.4f}, exact match "
            f"{rec['eval_exact_match']:.1%} (run {rec['run_dir']})",
            highlight=False,
        )
    console.print(f"model directory: {target}", highlight=False)
    console.print(f"use it: model.name_or_path={target}", highlight=False)


@app.command("finetune")
def finetune_command(
    config_file: Annotated[Path | None, typer.Option("--config", "-c", help="Run config YAML.")] = None,
    overrides: Overrides = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run directory (default: output_dir/name-time).")
    ] = None,
):
    """Fine-tune on Ray Train + DeepSpeed (the embedded local cluster, or RAY_ADDRESS's; `python -m
    jobs.finetune` is this command). A local cluster's dashboard listens on 127.0.0.1:8265; Ctrl-C or
    SIGTERM stops the run and its workers within seconds (exit 130 or 143)."""
    from llmopt.processes import ray_session
    from llmopt.train import finetune

    config = _load(config_file, overrides)
    _quiet_transformers()
    # A stop signal ends the run within seconds, its workers and embedded cluster with it (exit 130/143).
    with ray_session("llmopt finetune"):
        try:
            result = finetune(config, run_dir=run_dir)
        except ConfigError as exc:
            raise _fail(str(exc), 2) from None
    if not result.ok:
        raise _fail(f"fine-tuning failed: {result.error}; run directory {result.run_dir}")
    m = result.metrics
    console.print(
        f"finished {m.get('step')} steps in {result.seconds:.0f} s: loss {m.get('loss', float('nan')):.4f}, "
        f"held-out loss {m.get('eval_loss', float('nan')):.4f}, "
        f"exact match {m.get('eval_exact_match', 0):.1%}, "
        f"{m.get('tokens_per_s', 0):.0f} tokens/s, {m.get('trainable_parameters', 0):,} trainable parameters "
        f"({m.get('trainable_fraction', 0):.2%}, {m.get('peft_method', 'full')})",
        highlight=False,
    )
    _print_run(result.run_dir)
    console.print(f"run directory: {result.run_dir}", highlight=False)
    return result


def _print_run(run_dir: Path) -> None:
    from llmopt.train import show_run

    info = show_run(run_dir)
    table = Table("field", "value", title=info["run"])
    for key, value in info.items():
        if value is None or key == "run":
            continue
        if isinstance(value, float):
            value = f"{value:.1%}" if key == "eval_exact_match" else f"{value:.4g}"
        table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    console.print(table)


@runs_app.command("list")
def runs_list(
    output_dir: Annotated[Path, typer.Option(help="Where run directories live.")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List fine-tuning runs, newest first."""
    from llmopt.train import list_runs

    runs = list_runs(output_dir)
    if as_json:
        print(json.dumps(runs, indent=2))
        return
    if not runs:
        console.print(f"no runs under {output_dir}", highlight=False)
        return
    table = Table("run", "model", "method", "status", "steps", "loss", "held-out EM", "tokens/s")
    for r in runs:
        em = r["eval_exact_match"]
        table.add_row(
            r["run"],
            r["model"],
            r["method"],
            str(r["status"]),
            str(r["steps"] or "-"),
            f"{r['loss']:.4f}" if r["loss"] is not None else "-",
            f"{em:.1%}" if em is not None else "-",
            f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-",
        )
    console.print(table)


@runs_app.command("show")
def runs_show(
    run: Annotated[str, typer.Argument(help="Run directory, or its name under --output-dir.")],
    output_dir: Annotated[Path, typer.Option(help="Where run directories live.")] = Path("runs"),
    plot: Annotated[
        bool,
        typer.Option(
            "--plot/--no-plot",
            help="Write RUN/report.png: loss, held-out exact match, tokens/s, memory and learning rate over "
            "steps (from metrics.jsonl).",
        ),
    ] = True,
) -> None:
    """Show one run's status, final figures and artifacts, and plot its metrics to RUN/report.png."""
    from llmopt.train import plot_report, read_metrics, show_run

    path = Path(run) if Path(run).is_dir() else output_dir / run
    try:
        info = show_run(path)
    except FileNotFoundError as exc:
        raise _fail(str(exc)) from None
    report = None
    if plot:
        history = read_metrics(path)
        if history:
            # Before the table, so that the artifacts it lists include the report.
            report = plot_report(
                history, path / "report.png", title=f"{info['run']}: {info['model']}, {info['method']}"
            )
        else:
            console.print(f"no metrics recorded in {path / 'metrics.jsonl'}: no report.png", highlight=False)
    _print_run(path)
    if report is not None:
        console.print(f"report: {report}", highlight=False)
