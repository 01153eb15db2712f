"""Search the fine-tuning strategy with Ray Tune (OptunaSearch + ASHA), each trial a short real fine-tune.

    python -m jobs.tune --space tune_spaces/strategy.yaml --config jobs/configs/tiny-llama-reverse.yaml \
        --num-samples 12 --memory-budget 1GiB --loss-ceiling baseline
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.tune --config jobs/configs/tiny-llama-reverse.yaml --memory-budget 1GiB

CPU smoke run (a few minutes on 2 cores):
    python -m jobs.tune --config jobs/configs/tiny-llama-reverse.yaml --num-samples 3 \
        --trial-tokens 8192 --memory-budget 1GiB

Every trial (and the rule-based template, run first as the baseline) trains on the same number of
tokens and is evaluated on the same held-out rows. The cost model prunes strategies predicted above the
memory budget without running them; trials that still pass it, crash or time out are recorded as
infeasible. Writes to --out (default outputs/tune/<name>): best.yaml (run it with
`python -m jobs.finetune --config best.yaml`), trials.csv, trials.json, pareto.png, summary.json, and
Tune's experiment under tune/ (continue an interrupted search with --resume DIR).
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs._args import parse_job_args
from llmopt.config import ConfigError
from llmopt.tune import (
    SearchResult,
    SearchSettings,
    default_space_path,
    format_bytes,
    load_space,
    model_shape,
    parse_memory,
    results_table,
    run_search,
)


def _ceiling(text: str | None) -> float | str | None:
    if text is None or text == "baseline":
        return text
    try:
        return float(text)
    except ValueError:
        print(f"error: --loss-ceiling {text!r}: give a number or 'baseline'", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> SearchResult:
    config, args = parse_job_args(
        "Search the fine-tuning strategy with Ray Tune.",
        argv,
        space={"default": None, "help": "Search space YAML (default tune_spaces/strategy[-moe].yaml)."},
        num_samples={"type": int, "default": 12, "help": "Trials to run (default 12)."},
        max_concurrent={"type": int, "default": 1, "help": "Trials at once (default 1)."},
        time_budget_s={"type": float, "default": None, "help": "Wall-clock limit of the search."},
        memory_budget={"default": None, "help": "Peak memory per worker, e.g. 1GiB (bare number: GiB)."},
        objective={"choices": ["throughput", "loss"], "default": "throughput", "help": "What to optimise."},
        loss_ceiling={"default": None, "help": "Highest held-out loss allowed: a number or 'baseline'."},
        trial_tokens={"type": int, "default": 32768, "help": "Training tokens per trial (default 32768)."},
        trial_time_s={"type": float, "default": 600.0, "help": "Stop a trial after this long (infeasible)."},
        eval_samples={"type": int, "default": 64, "help": "Held-out rows every trial evaluates on."},
        workers={"type": int, "default": 1, "help": "Ray Train workers per trial (default 1)."},
        seeds={"type": int, "default": 4, "help": "Cost-model top strategies evaluated first."},
        scheduler={
            "choices": ["auto", "asha", "fifo"],
            "default": "auto",
            "help": "Trial scheduler (auto: ASHA unless a loss ceiling judges a throughput search).",
        },
        calibrate={
            "choices": ["auto", "always", "never"],
            "default": "auto",
            "help": "Measure the cost model's probes first (auto: when none is cached for this model here).",
        },
        no_prune={"action": "store_true", "help": "Run every sampled strategy (no cost-model pruning)."},
        no_baseline={"action": "store_true", "help": "Skip the rule-based baseline run."},
        seed={"type": int, "default": 0, "help": "Searcher seed."},
        out={"default": None, "help": "Output directory (default outputs/tune/<name>)."},
        resume={"default": None, "help": "Tune experiment directory of an interrupted search to continue."},
    )
    try:
        budget = parse_memory(args.memory_budget) if args.memory_budget else None
    except ValueError as exc:
        print(f"error: --memory-budget: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    settings = SearchSettings(
        objective=args.objective,
        memory_budget_bytes=budget,
        loss_ceiling=_ceiling(args.loss_ceiling),
        num_samples=args.num_samples,
        max_concurrent_trials=args.max_concurrent,
        time_budget_s=args.time_budget_s,
        trial_tokens=args.trial_tokens,
        trial_time_s=args.trial_time_s,
        eval_samples=args.eval_samples,
        workers=args.workers,
        seeds=args.seeds,
        scheduler=args.scheduler,
        prune=not args.no_prune,
        calibrate=args.calibrate,
        baseline=not args.no_baseline,
        seed=args.seed,
        name=f"{config.name}-search",
    )
    try:
        space_path = args.space or default_space_path(model_shape(config.model.name_or_path).is_moe)
        if space_path is None:
            print(
                "error: no search space found (tune_spaces/ is not here); pass --space FILE", file=sys.stderr
            )
            raise SystemExit(2)
        space = load_space(space_path)
        out = Path(args.out or f"outputs/tune/{config.name}")
        result = run_search(config, space, settings, out, resume=Path(args.resume) if args.resume else None)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    report(result)
    return result


def report(result: SearchResult) -> None:
    """Print the trial table and the comparison with the baseline."""
    from rich.console import Console

    console = Console(width=max(Console().width, 150))
    console.print(results_table(result))
    c = result.counts
    console.print(
        f"{c['sampled']} trials: {c['ok']} ok ({c['feasible']} feasible), {c['pruned']} pruned by the cost "
        f"model without running, {c['infeasible']} infeasible, {c['stopped']} stopped early, {c['error']} "
        f"errors; grid: {c['grid_pruned']} of {c['grid_candidates']} strategies pruned; "
        f"{result.seconds:.0f} s",
        highlight=False,
    )
    best, base = result.best, result.baseline
    if best and base and result.speedup:
        console.print(
            f"best {best['strategy']}: {best['tokens_per_s']:.0f} tokens/s, held-out loss "
            f"{best['eval_loss']:.4f}, peak {format_bytes(best['peak_memory_bytes'])} | baseline "
            f"{base['strategy']}: {base.get('tokens_per_s') or 0:.0f} tokens/s, held-out loss "
            f"{base.get('eval_loss') or float('nan'):.4f} | speedup {result.speedup:.2f}x",
            highlight=False,
        )
    if result.best_config is not None:
        console.print(
            f"best strategy: {result.out_dir / 'best.yaml'} "
            f"(run it: python -m jobs.finetune --config {result.out_dir / 'best.yaml'})",
            highlight=False,
        )
    else:
        console.print(
            "no feasible strategy found: raise the memory budget or the loss ceiling", highlight=False
        )
    console.print(f"outputs: {result.out_dir}; experiment: {result.experiment_path}", highlight=False)


if __name__ == "__main__":
    main()
