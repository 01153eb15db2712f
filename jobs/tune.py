"""Search the fine-tuning strategy with Ray Tune (OptunaSearch + ASHA), each trial a short real fine-tune
(`llmopt tune`).

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
`llmopt finetune --config best.yaml`), trials.csv, trials.json, pareto.png, summary.json, and
Tune's experiment under tune/ (continue an interrupted search with --resume DIR).
"""

from __future__ import annotations

from jobs._args import run_command
from llmopt.tune import SearchResult


def main(argv: list[str] | None = None) -> SearchResult:
    """`llmopt tune` with `argv` (default: the command line); returns the search's result."""
    return run_command("tune", argv, "python -m jobs.tune")


if __name__ == "__main__":
    main()
