"""`llmopt config ...` and `llmopt models ...`: validate, show and list configs; the model zoo."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from llmopt.cli._app import (
    ConfigArgs,
    _fail,
    _load,
    _quiet_transformers,
    _split_args,
    config_app,
    console,
    err,
    models_app,
)
from llmopt.config import (
    ConfigError,
    backend_errors,
    dump_config,
    format_bytes,
    get_template,
    load_config,
    templates,
    validate_config,
)


@config_app.command("validate")
def config_validate(
    args: ConfigArgs = None,
    target: Annotated[
        str, typer.Option(help="`any`, or `train` to also check the training backend.")
    ] = "any",
) -> None:
    """Validate config files, reporting every error with its field path and the fix."""
    if target not in ("any", "train"):
        raise _fail(f"--target {target!r} must be 'any' or 'train'", 2)
    files, overrides = _split_args(args)
    if not files:
        raise _fail("give at least one config file, e.g. `llmopt config validate jobs/configs/*.yaml`", 2)
    failed = 0
    for path in files:
        try:
            config = load_config(path, overrides)
            problems = backend_errors(config) if target == "train" else []
        except ConfigError as exc:
            failed += 1
            err.print(f"[red]✗[/] {exc}", highlight=False)
            continue
        if problems:
            failed += 1
            listed = "\n".join(f"  - {p}" for p in problems)
            err.print(f"[red]✗[/] {len(problems)} backend error(s) in {path}:\n{listed}", highlight=False)
        else:
            console.print(f"[green]✓[/] {path}", highlight=False)
    if failed:
        raise typer.Exit(2)


@config_app.command("show")
def config_show(
    args: ConfigArgs = None,
    template: Annotated[str | None, typer.Option(help="Start from this template.")] = None,
) -> None:
    """Print the fully resolved config (every field, defaults included) as YAML."""
    files, overrides = _split_args(args)
    if len(files) > 1:
        raise _fail(f"show takes one config file, got {len(files)}", 2)
    if template:
        overrides.insert(0, f"template={template}")
    sys.stdout.write(dump_config(_load(files[0] if files else None, overrides)))


@config_app.command("templates")
def config_templates(
    name: Annotated[str | None, typer.Argument(help="Show this template's settings as YAML.")] = None,
) -> None:
    """List the seed system's strategy templates (the search's baseline)."""
    if name:
        try:
            tpl = get_template(name)
        except ConfigError as exc:
            raise _fail(str(exc), 2) from None
        import yaml

        sys.stdout.write(f"# {tpl.description}\n" + yaml.safe_dump(tpl.overlay, sort_keys=False))
        return
    table = Table("template", "description", title="Strategy templates (use `template: NAME` in a config)")
    for tpl in templates().values():
        validate_config({"template": tpl.name})  # shipped data must stay valid
        table.add_row(tpl.name, tpl.description)
    console.print(table)


@models_app.command("list")
def models_list() -> None:
    """List the built-in presets."""
    from llmopt.models import PRESETS

    table = Table("preset", "architecture", "built by default", "description")
    for p in PRESETS.values():
        table.add_row(p.name, p.model_type, "yes" if p.default_test else "on demand", p.description)
    console.print(table)


@models_app.command("build")
def models_build(
    names: Annotated[
        list[str] | None, typer.Argument(help="Presets to build; default: the tiny ones.")
    ] = None,
    all_presets: Annotated[
        bool, typer.Option("--all", help="Also build the ~100M benchmark preset.")
    ] = False,
) -> None:
    """Build presets into the content-addressed cache (instant when already built)."""
    import time

    from llmopt.models import PRESETS, ModelLoadError, build_preset

    _quiet_transformers()
    chosen = names or [p.name for p in PRESETS.values() if p.default_test or all_presets]
    for name in chosen:
        start = time.perf_counter()
        try:
            path = build_preset(name)
        except ModelLoadError as exc:
            raise _fail(str(exc)) from None
        console.print(f"{name}: {path} ({time.perf_counter() - start:.1f} s)", highlight=False)


@models_app.command("info")
def models_info(
    model: Annotated[str, typer.Argument(help="Preset name, local directory or hub id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Parameter count and weight memory at each dtype (computed without loading weights)."""
    from llmopt.models import ModelLoadError, model_info

    _quiet_transformers()
    try:
        info = model_info(model)
    except ModelLoadError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        print(json.dumps(info.to_dict(), indent=2))
        return
    table = Table("property", "value", title=f"{model} ({info.model_type})")
    table.add_row("parameters", f"{info.num_parameters:,}")
    table.add_row("  in linear layers (quantizable)", f"{info.linear_parameters:,}")
    table.add_row("  in the input embedding", f"{info.embedding_parameters:,}")
    table.add_row("layers / hidden / vocab", f"{info.num_layers} / {info.hidden_size} / {info.vocab_size}")
    table.add_row("context", str(info.max_position_embeddings))
    if info.num_experts:
        table.add_row("experts (per token)", f"{info.num_experts} ({info.experts_per_token})")
    for dtype, size in info.weight_bytes.items():
        table.add_row(f"weights at {dtype}", format_bytes(size))
    console.print(table)
