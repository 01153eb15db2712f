"""Fine-tune a model on Ray Train with DeepSpeed workers, as a run config says.

    python -m jobs.finetune --config jobs/configs/tiny-llama-reverse.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.finetune --config jobs/configs/tiny-llama-reverse.yaml parallelism.num_workers=2

CPU smoke run (about a minute on 2 cores):
    python -m jobs.finetune --config jobs/configs/tiny-llama-reverse.yaml training.max_steps=5

Writes a run directory (default runs/<name>-<timestamp>/) with config.yaml, deepspeed.json,
metrics.jsonl, summary.json, loss.png and the adapter; `llmopt runs list` shows it.
"""

from __future__ import annotations

import sys

from jobs._args import parse_job_args
from llmopt.config import ConfigError
from llmopt.train import FinetuneResult, finetune


def main(argv: list[str] | None = None) -> FinetuneResult:
    config, args = parse_job_args(
        "Fine-tune on Ray Train + DeepSpeed.",
        argv,
        run_dir={"default": None, "help": "Run directory (default: <output_dir>/<name>-<timestamp>)."},
    )
    try:
        result = finetune(config, run_dir=args.run_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    m = result.metrics
    if not result.ok:
        print(f"fine-tuning failed: {result.error}\nrun directory: {result.run_dir}", file=sys.stderr)
        raise SystemExit(1)
    print(
        f"finished {m.get('step')} steps in {result.seconds:.0f} s: loss {m.get('loss', float('nan')):.4f}, "
        f"held-out loss {m.get('eval_loss', float('nan')):.4f}, "
        f"exact match {m.get('eval_exact_match', 0):.1%}, "
        f"{m.get('tokens_per_s', 0):.0f} tokens/s, {m.get('trainable_parameters', 0):,} trainable parameters"
    )
    print(f"run directory: {result.run_dir}")
    return result


if __name__ == "__main__":
    main()
