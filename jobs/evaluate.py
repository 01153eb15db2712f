"""Evaluate a run config's model on its held-out split, as a Ray task sized from the config (`llmopt eval
--ray`).

Run it on the embedded local cluster, or submit it to a running one:

    python -m jobs.evaluate --config jobs/configs/tiny-llama-reverse.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.evaluate --config jobs/configs/tiny-llama-reverse.yaml

CPU smoke run (a few seconds): python -m jobs.evaluate data.max_eval_samples=20

Prints exact match and response loss, and writes them as JSON (default outputs/eval/<name>.json).
"""

from __future__ import annotations

from typing import Any

from jobs._args import run_command


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`llmopt eval --ray` with `argv` (default: the command line); returns the figures."""
    return run_command("eval", argv, "python -m jobs.evaluate", "--ray")


if __name__ == "__main__":
    main()
