"""Fine-tune a model on Ray Train with DeepSpeed workers, as a run config says (`llmopt finetune`).

    python -m jobs.finetune --config jobs/configs/tiny-llama-reverse.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.finetune --config jobs/configs/tiny-llama-reverse.yaml parallelism.num_workers=2

CPU smoke run (about a minute on 2 cores):
    python -m jobs.finetune --config jobs/configs/tiny-llama-reverse.yaml training.max_steps=5

Writes a run directory (default runs/<name>-<timestamp>/) with config.yaml, deepspeed.json,
metrics.jsonl, summary.json, loss.png and the adapter; `llmopt runs list` shows it.
"""

from __future__ import annotations

from jobs._args import run_command
from llmopt.train import FinetuneResult


def main(argv: list[str] | None = None) -> FinetuneResult:
    """`llmopt finetune` with `argv` (default: the command line); returns the run's result."""
    return run_command("finetune", argv, "python -m jobs.finetune")


if __name__ == "__main__":
    main()
