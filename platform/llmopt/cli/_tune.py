"""`llmopt recommend` (the seed's rules, or the cost model's ranking) and `llmopt tune` (the search)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from llmopt.cli._app import (
    ConfigArgs,
    _fail,
    _load,
    _quiet_transformers,
    _split_args,
    app,
    console,
)
from llmopt.config import (
    ConfigError,
    backend_errors,
    dump_config,
    format_bytes,
    rule_based_recommendation,
    validate_config,
)


@app.command("recommend")
def recommend(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Preset, local model directory, config.json or hub id; with --hardware also a shipped "
            "config name (llama-3.1-8b, qwen3-30b-a3b).",
        ),
    ],
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
    hardware: Annotated[
        str | None,
        typer.Option(
            "--hardware", help="GPUs per node, e.g. 8xH100, 4xL4, H200: rank strategies for them (no GPU)."
        ),
    ] = None,
    nodes: Annotated[int, typer.Option(min=1, help="With --hardware: nodes of that kind.")] = 1,
    seq_len: Annotated[int, typer.Option(min=1, help="With --hardware: tokens per sequence.")] = 2048,
    global_batch: Annotated[
        int, typer.Option(min=1, help="With --hardware: sequences per optimizer step over all GPUs.")
    ] = 64,
    network_gbps: Annotated[
        float, typer.Option(min=0.001, help="With --hardware and --nodes > 1: one-way Gbit/s per node.")
    ] = 400.0,
    host_memory: Annotated[
        str | None,
        typer.Option(
            "--host-memory", help="With --hardware: host memory per node (e.g. 1TiB) that offload may fill."
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="With --hardware: also write the ranking as JSON here.")
    ] = None,
) -> None:
    """The seed's rule-based strategy by model size; with --memory-budget, the cost model's ranking;
    with --hardware, the GPU cost model's ranking for GPUs this machine need not have.

    With --memory-budget (or --workers, --space, --calibrate) every strategy of the search space is
    predicted (peak memory per worker, tokens/s) without running anything, those that cannot fit are
    pruned, and the rest ranked; -o writes the best one as a config for jobs.finetune.

    With --hardware 8xH100 (and --nodes) the model's config.json alone (no weights) and the GPU's profile
    give every strategy's peak memory per GPU and tokens/s; what does not fit is listed with why.
    """
    from llmopt.models import ModelLoadError, model_info

    if mode not in ("train", "inference"):
        raise _fail(f"--mode {mode!r} must be 'train' or 'inference'", 2)
    if hardware is not None:
        if mode != "train" or workers or calibrate:
            raise _fail("--hardware ranks training strategies on GPUs; drop --mode/--workers/--calibrate", 2)
        _recommend_hardware(
            model, hardware, nodes, memory_budget, host_memory, seq_len, global_batch, network_gbps, space,
            config_file, top, output, json_out,
        )  # fmt: skip
        return
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


# --- `recommend --hardware`: the GPU cost model's ranking (llmopt.tune._gpu_recommend) --------------------
def _recommend_hardware(
    model: str,
    hardware: str,
    nodes: int,
    budget_text: str | None,
    host_text: str | None,
    seq_len: int,
    global_batch: int,
    network_gbps: float,
    space_file: Path | None,
    config_file: Path | None,
    top: int,
    output: Path | None,
    json_out: Path | None,
) -> None:
    import json

    from llmopt.models import ModelLoadError
    from llmopt.tune import parse_memory, recommend_for_hardware, shipped_model_configs

    try:
        budget = parse_memory(budget_text) if budget_text is not None else None
    except ValueError as exc:
        raise _fail(f"--memory-budget: {exc}", 2) from None
    try:
        host = parse_memory(host_text) if host_text is not None else None
    except ValueError as exc:
        raise _fail(f"--host-memory: {exc}", 2) from None
    _quiet_transformers()
    base = _load(config_file, []) if config_file else None
    try:
        result = recommend_for_hardware(
            model,
            hardware,
            nodes=nodes,
            memory_budget=budget,
            seq_len=seq_len,
            global_batch=global_batch,
            network_gbps=network_gbps,
            host_memory=host,
            space=space_file,
            base=base,
        )
    except (ValueError, KeyError) as exc:
        raise _fail(f"--hardware {hardware!r}: {exc.args[0] if exc.args else exc}", 2) from None
    except ModelLoadError as exc:
        shipped = ", ".join(shipped_model_configs())
        raise _fail(f"{exc}; with --hardware a config.json is enough, or a shipped one: {shipped}") from None
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    shape = result.shape
    moe = f", {shape.num_experts} experts (top-{shape.top_k})" if shape.is_moe else ""
    console.print(
        f"[bold]{model}[/]: {shape.params / 1e9:.2f}B parameters{moe} on {result.hardware()} "
        f"({result.gpus} GPUs); sequences of {seq_len} tokens, {global_batch} a step; a GPU's limit "
        f"{format_bytes(result.limit_bytes)} ({result.limit_reason}); space {result.space}",
        highlight=False,
    )
    if nodes > 1:
        console.print(f"  network: {network_gbps:g} Gbit/s one way per node (--network-gbps)")
    if host is None:
        console.print("  host memory not checked: host/node is what offload puts there (--host-memory)")
    table = Table("#", "strategy", "peak/GPU", "tokens/s", "step", "host/node")
    for column in table.columns[2:]:
        column.no_wrap = True

    def add(tag: str, plan) -> None:
        host = plan.memory.host_offloaded * result.gpus_per_node
        table.add_row(
            tag,
            plan.label,
            format_bytes(plan.memory.device),
            f"{plan.tokens_per_s:,.0f}",
            f"{plan.step_s:.2f} s",
            format_bytes(host) if host else "-",
        )

    for i, plan in enumerate(result.fitting[:top], 1):
        add(str(i), plan)
    console.print(table)
    console.print("Best of each method:", highlight=False)
    closest = result.closest_per_method()
    for method, plan in result.best_per_method().items():
        if plan is not None:
            console.print(
                f"  {method}: {plan.label}: {format_bytes(plan.memory.device)} per GPU "
                f"({plan.breakdown()}), {plan.tokens_per_s:,.0f} tokens/s",
                highlight=False,
            )
        else:
            near = closest[method]
            console.print(
                f"  {method}: [red]nothing fits[/]; the smallest, {near.label}, {'; '.join(near.problems)} "
                f"({near.breakdown()})",
                highlight=False,
            )
    console.print(
        f"{len(result.plans)} strategies: {len(result.fitting)} fit, {len(result.rejected)} do not "
        f"(memory or batch), {result.invalid} not expressible for this model",
        highlight=False,
    )
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.summary(), indent=2) + "\n")
        console.print(f"ranking written to {json_out}", highlight=False)
    best = result.best
    if best is None:
        raise _fail("no strategy is predicted to fit; add GPUs or nodes, or shorten --seq-len")
    if output:
        dump_config(result.config(best), output)
        console.print(
            f"best strategy written to {output} (run it on those GPUs: python -m jobs.finetune --config "
            f"{output}; set data.* to your dataset)",
            highlight=False,
        )


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
    config_file: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Run config YAML (or give it as the first argument)."),
    ] = None,
    space: Annotated[
        Path | None,
        typer.Option("--space", help="Search space YAML (default tune_spaces/strategy[-moe].yaml)."),
    ] = None,
    num_samples: Annotated[int, typer.Option(min=1, help="Trials.")] = 12,
    max_concurrent: Annotated[
        str,
        typer.Option(
            help="Trials at once: a number, or auto (GPU trials: as many as the cluster's GPUs hold; CPU "
            "trials: one per node, as trials on shared cores measure each other)."
        ),
    ] = "auto",
    time_budget_s: Annotated[float | None, typer.Option(help="Wall-clock limit of the search.")] = None,
    memory_budget: Annotated[
        str | None, typer.Option(help="Peak memory per worker, e.g. 1GiB (a bare number is GiB).")
    ] = None,
    memory_margin: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=0.49,
            help="Prune strategies predicted within this share of --memory-budget (default: the cost "
            "model's measured memory error on this machine, 0 uncalibrated).",
        ),
    ] = None,
    objective: Annotated[str, typer.Option(help="`throughput` or `loss`.")] = "throughput",
    loss_ceiling: Annotated[
        str | None, typer.Option(help="Highest held-out loss allowed: a number or 'baseline'.")
    ] = None,
    trial_tokens: Annotated[int, typer.Option(min=1, help="Training tokens per trial.")] = 32768,
    trial_time_s: Annotated[
        float, typer.Option(min=1, help="Stop a trial after this many seconds (infeasible).")
    ] = 600.0,
    eval_samples: Annotated[int, typer.Option(min=1, help="Held-out rows every trial evaluates on.")] = 64,
    workers: Annotated[int, typer.Option(min=1, help="Ray Train workers per trial.")] = 1,
    seeds: Annotated[int, typer.Option(min=0, help="Cost-model top strategies evaluated first.")] = 4,
    scheduler: Annotated[
        str, typer.Option(help="auto (ASHA unless a loss ceiling judges a throughput search), asha or fifo.")
    ] = "auto",
    no_prune: Annotated[bool, typer.Option("--no-prune", help="Run every sampled strategy.")] = False,
    no_baseline: Annotated[
        bool, typer.Option("--no-baseline", help="Skip the rule-based baseline run.")
    ] = False,
    calibrate: Annotated[
        str, typer.Option(help="Measure the cost model first: auto (when none is cached), always, never.")
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Searcher seed.")] = 0,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default outputs/tune/NAME).")
    ] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Tune experiment dir to continue.")] = None,
):
    """Search the fine-tuning strategy with Ray Tune (short real fine-tunes) against the rule-based
    baseline; writes best.yaml, trials.csv/json, pareto.png and summary.json (`python -m jobs.tune` is this
    command). A local cluster's dashboard listens on 127.0.0.1:8265; Ctrl-C or SIGTERM stops the search and
    its trials within seconds (exit 130 or 143)."""
    from llmopt.models import ModelLoadError
    from llmopt.processes import ray_session
    from llmopt.tune import (
        SearchSettings,
        default_space_path,
        load_space,
        model_shape,
        parse_memory,
        run_search,
    )

    files, overrides = _split_args(args)
    if config_file is not None:
        files = [config_file, *files]
    if len(files) > 1:
        raise _fail(f"tune takes one config file, got {len(files)}", 2)
    config = _load(files[0] if files else None, overrides)
    if max_concurrent != "auto" and not (max_concurrent.isdigit() and int(max_concurrent) >= 1):
        raise _fail(f"--max-concurrent {max_concurrent!r}: give a number of trials (1, 2, ...) or auto", 2)
    try:
        budget = parse_memory(memory_budget) if memory_budget else None
        ceiling = loss_ceiling if loss_ceiling in (None, "baseline") else float(loss_ceiling)
    except ValueError as exc:
        raise _fail(
            f"--memory-budget / --loss-ceiling: {exc} (a loss ceiling is a number or 'baseline')", 2
        ) from None
    settings = SearchSettings(
        objective=objective,  # type: ignore[arg-type]
        memory_budget_bytes=budget,
        memory_margin=memory_margin,
        loss_ceiling=ceiling,  # type: ignore[arg-type]
        num_samples=num_samples,
        max_concurrent_trials=None if max_concurrent == "auto" else int(max_concurrent),
        time_budget_s=time_budget_s,
        trial_tokens=trial_tokens,
        trial_time_s=trial_time_s,
        eval_samples=eval_samples,
        workers=workers,
        seeds=seeds,
        scheduler=scheduler,  # type: ignore[arg-type]
        prune=not no_prune,
        calibrate=calibrate,  # type: ignore[arg-type]
        baseline=not no_baseline,
        seed=seed,
        name=f"{config.name}-search",
    )
    _quiet_transformers()
    try:
        settings.check()
        space_path = space or default_space_path(model_shape(config.model.name_or_path).is_moe)
        if space_path is None:
            raise _fail("no search space found (tune_spaces/ is not here); pass --space FILE", 2)
        space_data = load_space(space_path)
        # A stop signal ends the search within seconds, its trials and embedded cluster with it.
        with ray_session("llmopt tune"):
            result = run_search(
                config, space_data, settings, out or Path("outputs/tune") / config.name, resume=resume
            )
    except (ConfigError, ModelLoadError) as exc:
        raise _fail(str(exc), 2) from None
    _report(result)
    return result


def _report(result) -> None:
    """The trial table, the counts and the comparison with the baseline."""
    from rich.console import Console

    from llmopt.tune import results_table

    wide = Console(width=max(Console().width, 150))
    wide.print(results_table(result))
    c = result.counts
    wide.print(
        f"{c['sampled']} trials: {c['ran']} ran, {c['feasible']} of them feasible; {c['pruned']} pruned "
        f"without running ({c['pruned'] - c['pruned_loss']} by the cost model"
        + (f", {c['pruned_margin']} of them within its memory margin" if c.get("pruned_margin") else "")
        + f", {c['pruned_loss']} "
        f"projected to miss the loss ceiling), {c['infeasible']} infeasible, {c['stopped']} stopped early, "
        f"{c['error']} errors; grid: {c['grid_pruned']} of {c['grid_candidates']} strategies pruned; "
        f"{result.seconds:.0f} s",
        highlight=False,
    )
    best, base = result.best, result.baseline
    if best and base and result.speedup:
        wide.print(
            f"best {best['strategy']}: {best['tokens_per_s']:.0f} tokens/s, held-out loss "
            f"{best['eval_loss']:.4f}, peak {format_bytes(best['peak_memory_bytes'])} | baseline "
            f"{base['strategy']}: {base.get('tokens_per_s') or 0:.0f} tokens/s, held-out loss "
            f"{base.get('eval_loss') or float('nan'):.4f} | speedup over the rule-based template "
            f"{result.speedup:.2f}x",
            highlight=False,
        )
    if result.best_config is not None:
        wide.print(
            f"best strategy: {result.out_dir / 'best.yaml'} "
            f"(run it: llmopt finetune --config {result.out_dir / 'best.yaml'})",
            highlight=False,
        )
    else:
        wide.print("no feasible strategy found: raise the memory budget or the loss ceiling", highlight=False)
    wide.print(f"outputs: {result.out_dir}; experiment: {result.experiment_path}", highlight=False)


# --- end of `tune` ---------------------------------------------------------------------------------------
