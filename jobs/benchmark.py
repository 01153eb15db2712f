"""Benchmarks, run as jobs: each prints a table and writes JSON plus a PNG chart.

    python -m jobs.benchmark train                       # ~10 min on 2 CPU cores
    python -m jobs.benchmark train --quick               # smoke run: two cases, a few steps
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.benchmark train

    python -m jobs.benchmark serve                       # ~7 min on 2 CPU cores (+ base-100m build once)
    python -m jobs.benchmark serve --no-base             # tiny preset only
    python -m jobs.benchmark serve --quick               # smoke run: tiny preset, c=1 and 4 (~1-2 min)
    python -m jobs.benchmark adaptive                    # adaptive vs fixed batch sizes, TPOT SLO (~8 min)
    python -m jobs.benchmark choices                     # n=1 against n=4 at concurrency 32 (~3 min)
    python -m jobs.benchmark churn                       # 10,000 sessions through a 16 MiB cache (~11 min)
    python -m jobs.benchmark faults                      # a replica SIGKILLed under load; a burst (~3 min)
    python -m jobs.benchmark stops                       # every way of stopping each command (~10 min)
    python -m jobs.benchmark compare                     # llmopt (native, engine=vllm) beside vllm serve
    python -m jobs.benchmark peft                        # every peft method, same token budget (~10 min)
    python -m jobs.benchmark cache                       # response-cache hit against miss latency (~3 min)
    python -m jobs.benchmark compress                    # original, int8, nf4, pruned (+recovery), merged
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.benchmark serve

`train` measures, in one run on the tiny dense preset: full fine-tune vs LoRA vs QLoRA, gradient
checkpointing off / uniform / memory budget at a 2,000-token sequence, ZeRO 0/1/2/3 on two workers,
one vs two workers, and a plain single-process torch loop on the same model and data as the reference.
Every Ray case is a real `llmopt.train.finetune` run (fresh worker processes, so peak memory is the
case's own); the reference runs in a fresh single-use Ray task. Throughput counts every token and
second after the first optimizer step, reports included.

`serve` (code in benchmarks/serve.py: figures, report, plot; benchmarks/_load.py: cases, prompts, load
generator, sessions; benchmarks/_precision.py: bandwidth and precision) deploys serve_apps.llm afresh per
case (one replica, fp32 on CPU, `--replica-cpus` CPUs and torch threads, default 1: the other core runs the
HTTP proxy and the load generator) and drives it on loopback with a closed-loop load generator: streamed
/v1/completions with 64-token prompts and 64 output tokens (`ignore_eos`; tokens counted from the stream's
usage event), concurrency 1, 8 and 32. Cases: batching off / static / continuous and continuous with the KV
cache off on tiny-llama; batching off and continuous on base-100m. Reported per point: requests/s, output
tokens/s, time to first token and latency p50/p99, per-request decode tokens/s. It also measures memory
bandwidth with the replica's thread count (the batch-1 decode ceiling: weight bytes read per token against
it), the time to first token of a follow-up turn after a 2,000-token history on the seed API (`X-Session-ID`,
the whole conversation re-sent) with session reuse on and off, and the serving precisions (fp32 / int8 /
bf16: engine decode tokens/s at batch 1 and 8, held-out loss), then prints its three headline figures with
pass/fail; continuous batching is compared with batching off at concurrency 1 (the target) and at
concurrency 32. Writes serve.json and serve.png; any failed case or request fails the run (files written
first).

`adaptive`, `choices`, `churn`, `faults`, `stops`, `compare`, `peft`, `cache` and `compress` are described in
their modules under benchmarks/.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.adaptive import add_adaptive_parser, run_adaptive
from benchmarks.cache import add_cache_parser, run_cache
from benchmarks.choices import add_choices_parser, run_choices
from benchmarks.churn import add_churn_parser, run_churn
from benchmarks.compare import add_compare_parser, run_compare
from benchmarks.compress import add_compress_parser, run_compress
from benchmarks.faults import add_faults_parser, run_faults
from benchmarks.peft import add_peft_parser, run_peft
from benchmarks.serve import add_serve_parser, run_serve
from benchmarks.stops import add_stops_parser, run_stops
from benchmarks.train import run_train


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="llmopt benchmarks (JSON + PNG).")
    sub = parser.add_subparsers(dest="benchmark", required=True)
    train = sub.add_parser("train", help="Fine-tuning strategies, checkpointing, ZeRO, workers, plain torch.")
    train.add_argument("--steps", type=int, default=10, help="Optimizer steps per case.")
    train.add_argument(
        "--long-seq", type=int, default=2000, help="Sequence length of the checkpointing cases."
    )
    train.add_argument("--out", default="outputs/benchmark", help="Output directory.")
    train.add_argument("--quick", action="store_true", help="Only LoRA and its plain-torch reference.")
    add_serve_parser(sub)
    add_adaptive_parser(sub)
    add_choices_parser(sub)
    add_churn_parser(sub)
    add_faults_parser(sub)
    add_stops_parser(sub)
    add_compare_parser(sub)
    add_peft_parser(sub)
    add_cache_parser(sub)
    add_compress_parser(sub)
    args = parser.parse_args(argv)
    runs = {
        "serve": run_serve,
        "adaptive": run_adaptive,
        "choices": run_choices,
        "churn": run_churn,
        "train": run_train,
        "faults": run_faults,
        "stops": run_stops,
        "compare": run_compare,
        "peft": run_peft,
        "cache": run_cache,
        "compress": run_compress,
    }
    return runs[args.benchmark](args)


if __name__ == "__main__":
    main()
