"""`llmopt` command line: thin commands that parse, load the config and call the library."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llmopt.config import (
    ConfigError,
    backend_errors,
    dump_config,
    format_bytes,
    get_template,
    load_config,
    rule_based_recommendation,
    templates,
    validate_config,
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


@app.command("recommend")
def recommend(
    model: Annotated[str, typer.Option("--model", "-m", help="Preset name, local directory or hub id.")],
    mode: Annotated[str, typer.Option(help="`train` or `inference`.")] = "train",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the config YAML here.")] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option(
            "--memory-budget",
            help="Peak memory per worker (4GiB, 512MB; a bare number is GiB): rank a space.",
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", "-n", min=1, help="Workers per strategy.")
    ] = None,
    space: Annotated[
        Path | None,
        typer.Option("--space", help="Search space YAML (default tune_spaces/strategy[-moe].yaml)."),
    ] = None,
    config_file: Annotated[
        Path | None, typer.Option("--config", "-c", help="Run config the strategies start from.")
    ] = None,
    top: Annotated[int, typer.Option(min=1, help="Ranked strategies to show.")] = 10,
    calibrate: Annotated[
        bool,
        typer.Option("--calibrate", help="First measure a few training steps here (~10-30 s), cache it."),
    ] = False,
) -> None:
    """The seed's rule-based strategy by model size; with --memory-budget, the cost model's ranking.

    With --memory-budget (or --workers, --space, --calibrate) every strategy of the search space is
    predicted (peak memory per worker, tokens/s) without running anything, those that cannot fit are
    pruned, and the rest ranked; -o writes the best one as a config for jobs.finetune.
    """
    from llmopt.models import ModelLoadError, model_info

    if mode not in ("train", "inference"):
        raise _fail(f"--mode {mode!r} must be 'train' or 'inference'", 2)
    if memory_budget is not None or workers or space or calibrate or config_file:
        if mode != "train":
            raise _fail("--memory-budget ranks training strategies; drop --mode inference", 2)
        _recommend_ranked(model, memory_budget, workers, space, config_file, top, calibrate, output)
        return
    _quiet_transformers()
    try:
        info = model_info(model)
    except ModelLoadError as exc:
        raise _fail(str(exc)) from None
    rec = rule_based_recommendation(info.num_parameters, mode)  # type: ignore[arg-type]
    data = {"model": {"name_or_path": model}, **rec.config_data()}
    config = validate_config(data)
    console.print(
        f"[bold]{model}[/]: {info.num_parameters:,} parameters → tier {rec.tier}, "
        f"template [bold]{rec.template}[/]",
        highlight=False,
    )
    for reason in rec.reasons:
        console.print(f"  • {reason}", highlight=False)
    for problem in backend_errors(config) if mode == "train" else []:
        console.print(f"  [yellow]! not trainable on this backend as is:[/] {problem}", highlight=False)
    text = dump_config(config, output)
    if output:
        console.print(f"config written to {output}", highlight=False)
    else:
        sys.stdout.write(text)


# --- `recommend --memory-budget`: the cost model's ranking (llmopt.tune) -------------------------------
def _recommend_ranked(
    model: str,
    budget_text: str | None,
    workers: int | None,
    space_file: Path | None,
    config_file: Path | None,
    top: int,
    calibrate: bool,
    output: Path | None,
) -> None:
    from llmopt.models import ModelLoadError
    from llmopt.tune import (
        DEFAULT_PROBES,
        CostModel,
        Hardware,
        default_space_path,
        load_calibration,
        load_space,
        model_shape,
        parse_memory,
    )
    from llmopt.tune import calibrate as run_calibration
    from llmopt.tune import recommend as rank_space

    try:
        budget = parse_memory(budget_text) if budget_text is not None else None
    except ValueError as exc:
        raise _fail(f"--memory-budget: {exc}", 2) from None
    _quiet_transformers()
    base = _load(config_file, [f"model.name_or_path={model}"])
    try:
        shape = model_shape(model)
    except ModelLoadError as exc:
        raise _fail(str(exc)) from None
    hardware = Hardware.detect()
    space_path = space_file or default_space_path(shape.is_moe)
    if space_path is None:
        raise _fail("no search space found (tune_spaces/ is not here); pass --space FILE", 2)
    try:
        search_space = load_space(space_path)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    if calibrate:
        console.print(
            f"calibrating: a few real training steps of {len(DEFAULT_PROBES)} probe strategies here ..."
        )
        calibration = run_calibration(base, hardware=hardware, log=lambda line: console.print(f"  {line}"))
    else:
        calibration = load_calibration(model, hardware)
    cost = CostModel(shape, hardware, calibration.coefficients if calibration else None)
    try:
        ranking = rank_space(base, search_space, cost, budget, workers)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    n = workers or base.parallelism.num_workers
    limit = f"{format_bytes(budget)} per worker" if budget else "none (machine limits only)"
    console.print(
        f"[bold]{model}[/]: {shape.params:,} parameters; {n} worker(s) on {hardware.describe()}; "
        f"budget {limit}; space {space_path}",
        highlight=False,
    )
    if calibration is None:
        console.print(
            "cost model: uncalibrated defaults (add --calibrate to measure a few steps on this machine)",
            highlight=False,
        )
    else:
        errors = calibration.summary()
        console.print(
            f"cost model: calibrated {calibration.created} ({calibration.path}); probe errors: peak memory "
            f"{errors['memory_error']:.1%}, step time {errors['step_time_error']:.1%} (leave-one-out "
            f"{errors['loo_memory_error']:.1%} / {errors['loo_step_time_error']:.1%})",
            highlight=False,
        )
    table = Table("#", "strategy", "peak/worker", "tokens/s", "step", "fits?")
    for column in table.columns[2:]:
        column.no_wrap = True
    rows = [(str(i), c, extra) for i, (c, extra) in enumerate(ranking.distinct(top), 1)]
    rows += [("base", ranking.baseline, 0)] if ranking.baseline else []
    rows += [("pruned", c, 0) for c in ranking.pruned[:3]]
    notes = []
    for tag, c, extra in rows:
        p = c.prediction
        fits = "[green]yes[/]"
        if not p.fits:
            notes.append(f"  {c.label}: " + "; ".join(p.reasons))
            fits = "[red]no[/] (" + ", ".join(r.split(":", 1)[0] for r in p.reasons) + ")"
        label = c.label + (f" (+{extra} equivalent)" if extra else "")
        label += " (rule-based template)" if tag == "base" else ""
        peak = format_bytes(p.peak_bytes)
        table.add_row(tag, label, peak, f"{p.tokens_per_s:,.0f}", f"{p.step_time_s * 1000:.0f} ms", fits)
    console.print(table)
    for note in notes:
        console.print(note, highlight=False)
    counts = ranking.counts()
    kinds = ", ".join(
        f"{k.removeprefix('pruned_')}: {v}" for k, v in counts.items() if k.startswith("pruned_")
    )
    console.print(
        f"{counts['candidates']} candidates: {counts['fit']} fit, {counts['pruned']} pruned before running"
        f"{f' ({kinds})' if kinds else ''}, {counts['invalid']} rejected by the config schema",
        highlight=False,
    )
    best = ranking.best
    if best is None:
        raise _fail("no strategy is predicted to fit; raise --memory-budget or use fewer workers")
    if output:
        config = best.config
        if budget:
            config = config.model_copy(
                update={"resources": config.resources.model_copy(update={"memory_budget_gb": budget / 2**30})}
            )
        dump_config(config, output)
        console.print(
            f"best strategy written to {output} (run it: python -m jobs.finetune --config {output})"
        )


# --- end of `recommend --memory-budget` -------------------------------------------------------------------


# --- `tune`: the strategy search (llmopt.tune.run_search) ------------------------------------------------
@app.command("tune", context_settings={"allow_extra_args": False})
def tune_command(
    args: ConfigArgs = None,
    space: Annotated[Path | None, typer.Option("--space", help="Search space YAML.")] = None,
    num_samples: Annotated[int, typer.Option(min=1, help="Trials.")] = 12,
    max_concurrent: Annotated[int, typer.Option(min=1, help="Trials at once.")] = 1,
    time_budget_s: Annotated[float | None, typer.Option(help="Wall-clock limit of the search.")] = None,
    memory_budget: Annotated[str | None, typer.Option(help="Peak memory per worker, e.g. 1GiB.")] = None,
    objective: Annotated[str, typer.Option(help="`throughput` or `loss`.")] = "throughput",
    loss_ceiling: Annotated[str | None, typer.Option(help="Max held-out loss: number or 'baseline'.")] = None,
    trial_tokens: Annotated[int, typer.Option(min=1, help="Training tokens per trial.")] = 32768,
    eval_samples: Annotated[int, typer.Option(min=1, help="Held-out rows per trial.")] = 64,
    no_prune: Annotated[bool, typer.Option("--no-prune", help="Run every sampled strategy.")] = False,
    calibrate: Annotated[
        str, typer.Option(help="Measure the cost model first: auto (when none is cached), always, never.")
    ] = "auto",
    out: Annotated[Path | None, typer.Option("--out", help="Output directory.")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Tune experiment dir to continue.")] = None,
) -> None:
    """Search the fine-tuning strategy with Ray Tune (short real fine-tunes) against the rule-based
    baseline; writes best.yaml, trials.csv/json, pareto.png and summary.json (same as jobs.tune)."""
    from llmopt.models import ModelLoadError
    from llmopt.tune import (
        SearchSettings,
        default_space_path,
        load_space,
        model_shape,
        parse_memory,
        results_table,
        run_search,
    )

    files, overrides = _split_args(args)
    if len(files) > 1:
        raise _fail(f"tune takes one config file, got {len(files)}", 2)
    config = _load(files[0] if files else None, overrides)
    try:
        budget = parse_memory(memory_budget) if memory_budget else None
        ceiling = loss_ceiling if loss_ceiling in (None, "baseline") else float(loss_ceiling)
    except ValueError as exc:
        raise _fail(f"--memory-budget / --loss-ceiling: {exc}", 2) from None
    settings = SearchSettings(
        objective=objective,  # type: ignore[arg-type]
        memory_budget_bytes=budget,
        loss_ceiling=ceiling,  # type: ignore[arg-type]
        num_samples=num_samples,
        max_concurrent_trials=max_concurrent,
        time_budget_s=time_budget_s,
        trial_tokens=trial_tokens,
        eval_samples=eval_samples,
        prune=not no_prune,
        calibrate=calibrate,  # type: ignore[arg-type]
        name=f"{config.name}-search",
    )
    _quiet_transformers()
    try:
        space_path = space or default_space_path(model_shape(config.model.name_or_path).is_moe)
        if space_path is None:
            raise _fail("no search space found (tune_spaces/ is not here); pass --space FILE", 2)
        result = run_search(
            config, load_space(space_path), settings, out or Path("outputs/tune") / config.name, resume=resume
        )
    except (ConfigError, ModelLoadError) as exc:
        raise _fail(str(exc), 2) from None
    console.print(results_table(result))
    if result.speedup:
        console.print(f"speedup over the rule-based template: {result.speedup:.2f}x", highlight=False)
    if result.best_config is None:
        raise _fail("no feasible strategy found: raise --memory-budget or --loss-ceiling")
    console.print(
        f"best strategy: {result.out_dir / 'best.yaml'} (outputs: {result.out_dir})", highlight=False
    )


# --- end of `tune` ---------------------------------------------------------------------------------------


@app.command("eval")
def eval_command(
    config_file: Annotated[Path | None, typer.Option("--config", "-c", help="Run config YAML.")] = None,
    overrides: Overrides = None,
    split: Annotated[str | None, typer.Option(help="Split to evaluate; default data.eval_split.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the result as JSON.")] = None,
) -> None:
    """Exact match and response loss of the config's model on the held-out split (in this process)."""
    from llmopt.data import DatasetError
    from llmopt.devices import DeviceError, local_device
    from llmopt.evaluation import evaluate_config
    from llmopt.models import ModelLoadError
    from llmopt.runtime import set_torch_threads

    config = _load(config_file, overrides)
    _quiet_transformers()
    set_torch_threads(config.resources.cpus_per_worker)
    try:
        device = local_device(config.resources.accelerator, config.resources.gpus)
        result, seconds = evaluate_config(config, split, device=device)
    except DeviceError as exc:
        raise _fail(str(exc), 2) from None
    except (ModelLoadError, DatasetError) as exc:
        raise _fail(str(exc)) from None
    console.print(
        f"{config.model.name_or_path} on {config.data.dataset}/{split or config.data.eval_split}: "
        f"exact match {result.exact_match:.1%} ({result.num_correct}/{result.num_examples}), "
        f"loss {result.loss:.4f} ({seconds:.1f} s)",
        highlight=False,
    )
    for sample in result.samples[:3]:
        console.print(f"  expected {sample['expected']!r}, got {sample['completion']!r}", highlight=False)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result.to_dict(), indent=2))


@app.command("finetune")
def finetune_command(
    config_file: Annotated[Path | None, typer.Option("--config", "-c", help="Run config YAML.")] = None,
    overrides: Overrides = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run directory (default: output_dir/name-time).")
    ] = None,
) -> None:
    """Fine-tune on Ray Train + DeepSpeed (the embedded local cluster, or RAY_ADDRESS)."""
    from llmopt.train import finetune

    config = _load(config_file, overrides)
    _quiet_transformers()
    try:
        result = finetune(config, run_dir=run_dir)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    if not result.ok:
        raise _fail(f"fine-tuning failed: {result.error}; run directory {result.run_dir}")
    _print_run(result.run_dir)


DEFAULT_APP = "serve_apps.llm:app"


def _import_app(app_path: str, app_dir: Path):
    """The object at `module:attr`, imported at run time as `serve run` does.

    The library must never import `serve_apps` (an import-linter contract keeps `llmopt` below the
    applications built on it), so the application is named by an import path and resolved here with
    Ray's own helper, the one `serve run` uses, after putting `app_dir` first on `sys.path`.
    """
    try:
        from ray._common.utils import import_attr
    except ImportError:  # Ray < 2.47 kept it in ray._private.utils
        from ray._private.utils import import_attr

    sys.path.insert(0, str(app_dir.resolve()))
    try:
        return import_attr(app_path)
    except (ImportError, AttributeError, ValueError) as exc:
        raise _fail(
            f"cannot import --app {app_path!r}: {exc}; give `module:attribute` importable from "
            f"--app-dir {str(app_dir)!r} (run from the repository root, or pass --app-dir)",
            2,
        ) from None


def _build_app(target, args: dict):
    """An Application as is, or an application builder called with the `serve run`-style args dict."""
    from ray.serve import Application

    if isinstance(target, Application):
        return target
    if not callable(target):
        raise _fail(f"--app must name a Serve Application or a builder function, got {type(target)}", 2)
    try:
        built = target(args)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    if not isinstance(built, Application):
        raise _fail(f"the --app builder returned {type(built).__name__}, not a Serve Application", 2)
    return built


def _endpoints(url: str) -> list[str]:
    """`METHOD /path` of each route the running app documents (FastAPI's /openapi.json), if any."""
    from urllib.error import URLError
    from urllib.request import urlopen

    try:
        with urlopen(f"{url}/openapi.json", timeout=10) as response:
            paths = json.load(response)["paths"]
    except (URLError, OSError, ValueError, KeyError, TypeError):
        return []
    return [f"{method.upper():6} {url}{path}" for path, methods in paths.items() for method in methods]


def _stop_serve(name: str, joined: bool, serve_ran: bool) -> None:
    """Shut Serve down; on a joined cluster, leave Serve as it was found.

    There, if Serve ran before or now runs other applications, only this application is deleted
    (unlike `serve run`, whose Ctrl-C shuts Serve down with every application on the cluster).
    """
    from ray import serve

    if joined and (serve_ran or set(serve.status().applications) - {name}):
        serve.delete(name)
    else:
        serve.shutdown()


def _check_port_free(host: str, port: int, fix: str = "pass a free --port") -> None:
    """Fail fast, before a local cluster starts, when Serve could not listen on host:port."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise _fail(f"cannot listen on {host}:{port} ({exc.strerror}); {fix}", 2) from None


@app.command("serve")
def serve_command(
    config_file: Annotated[Path | None, typer.Option("--config", "-c", help="Run config YAML.")] = None,
    overrides: Overrides = None,
    app_path: Annotated[
        str, typer.Option("--app", help="Serve application or builder, as `module:attribute`.")
    ] = DEFAULT_APP,
    app_dir: Annotated[
        Path, typer.Option(help="Directory put first on sys.path to import --app (as `serve run -d`).")
    ] = Path("."),
    address: Annotated[
        str | None,
        typer.Option(
            help="Join this Ray cluster (`auto`, `host:port`, `ray://...`); default RAY_ADDRESS "
            "or a local cluster started in-process."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="HTTP host the Serve proxy listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port the Serve proxy listens on.")] = 8000,
    name: Annotated[str, typer.Option(help="Serve application name.")] = "llm",
    route_prefix: Annotated[str, typer.Option(help="Route prefix of the application.")] = "/",
    dashboard: Annotated[
        bool, typer.Option(help="Start the Ray dashboard with a local cluster (`serve status` needs it).")
    ] = True,
    throughput_optimized: Annotated[
        bool,
        typer.Option(
            help="Start the local cluster in Ray Serve's high-throughput mode: HAProxy instead of the "
            "Python proxy, ingress replicas listening directly, gRPC between deployments "
            "(RAY_SERVE_THROUGHPUT_OPTIMIZED=1, RAY_SERVE_ENABLE_HA_PROXY=1). A joined cluster keeps the "
            "mode it was started with."
        ),
    ] = False,
) -> None:
    """Serve the config's model over HTTP on Ray Serve until Ctrl-C (the embedded cluster, or --address)."""
    import signal
    import time

    from llmopt.cluster import use_serve_throughput_mode

    # Every check that can fail runs before Ray starts: config, ports, import path, application builder.
    config = _load(config_file, overrides)
    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    side_ports: dict[str, int] = {}
    if throughput_optimized:
        # Before the app's import below: the driver reads Serve's settings when it imports ray.serve.
        try:
            side_ports = use_serve_throughput_mode(joined)
        except ValueError as exc:
            raise _fail(str(exc), 2) from None
    if not joined:
        _check_port_free(host, port)
    for variable, side_port in side_ports.items():
        _check_port_free("0.0.0.0", side_port, f"set {variable} to a free port")
    target = _import_app(app_path, app_dir)
    args = {"config": str(config_file.resolve()) if config_file else None, "overrides": list(overrides or [])}
    application = _build_app(target, args)

    import ray
    from ray import serve

    from llmopt.cluster import check_resources, init_ray

    if not joined:
        # Replicas import the app too; the workers of a local cluster inherit this environment. (A
        # joined cluster must import it already: start it from the repository, or with PYTHONPATH.)
        paths = [str(app_dir.resolve()), os.environ.get("PYTHONPATH", "")]
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    init_ray(address, **({} if joined else {"include_dashboard": dashboard}))
    try:  # replicas the cluster cannot place would leave Serve waiting for resources forever
        check_resources(config, "serving")
    except ConfigError as exc:
        ray.shutdown()
        raise _fail(str(exc), 2) from None

    def _interrupt(signum, frame):
        raise KeyboardInterrupt  # SIGTERM (docker stop, kill) stops the server as Ctrl-C does

    signal.signal(signal.SIGTERM, _interrupt)
    serve_ran = joined and bool(serve.status().proxies)
    try:
        try:
            serve.start(http_options={"host": host, "port": port})
            serve.run(application, name=name, route_prefix=route_prefix)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            _stop_serve(name, joined, serve_ran)
            # Ray has logged the whole traceback already: its last line says what went wrong.
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise _fail(f"Serve failed to start or deploy {app_path}: {reason}") from None
        url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
        console.print(f"[bold]{config.model.name_or_path}[/] is served at {url}/", highlight=False)
        for endpoint in _endpoints(url):
            console.print(f"  {endpoint}", highlight=False)
        console.print("Press Ctrl-C to stop.", highlight=False)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("shutting down...", highlight=False)
        _stop_serve(name, joined, serve_ran)
    finally:
        ray.shutdown()  # stops the embedded cluster; only disconnects from a joined one
    console.print("stopped.", highlight=False)


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
) -> None:
    """Show one run's status, final figures and artifacts."""
    path = Path(run) if Path(run).is_dir() else output_dir / run
    try:
        _print_run(path)
    except FileNotFoundError as exc:
        raise _fail(str(exc)) from None


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


# --- llmopt kuberay ... (begin) -------------------------------------------------------------------------


def _kuberay_cli():
    """The `kuberay.cli` module, imported at run time from the repository.

    `kuberay/` is a top-level package beside `jobs/` and `serve_apps/` (docs/architecture.md), built on
    llmopt; the library never imports it (an import-linter contract), so, as `llmopt serve` resolves
    `serve_apps.llm:app`, this command finds it by name on `sys.path`, adding the working directory
    (the repository root) when the interpreter's path lacks it, as the console script's does.
    """
    import importlib

    for path in (None, str(Path.cwd())):
        if path is not None:
            sys.path.insert(0, path)
            importlib.invalidate_caches()
        try:
            return importlib.import_module("kuberay.cli")
        except ModuleNotFoundError as exc:
            if exc.name not in ("kuberay", "kuberay.cli"):
                raise  # kuberay is there but one of its own imports is missing: show that
    raise _fail(
        "`llmopt kuberay` needs the repository's kuberay/ package: run it from the repository root "
        "(or set PYTHONPATH to the repository)",
        2,
    )


@app.command(
    "kuberay",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def kuberay_command(ctx: typer.Context) -> None:
    """KubeRay: render, validate, apply, wait for and delete RayJob / RayService / RayCluster."""
    _kuberay_cli().main(list(ctx.args), prog_name="llmopt kuberay")


# --- llmopt kuberay ... (end) ---------------------------------------------------------------------------


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
