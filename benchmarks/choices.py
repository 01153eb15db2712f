"""``python -m jobs.benchmark choices``: serving throughput with OpenAI's ``n`` (several choices per request).

One deployment of serve_apps.llm (tiny preset, fp32, continuous batching, batch up to 32, one replica of
``--replica-cpus``), driven on loopback at one concurrency with ``n=1`` and with ``n=4`` requests in
alternation (``--rounds`` times each, so the machine's drift hits both alike). Streamed /v1/completions,
greedy with ``ignore_eos`` (tokens counted from the usage event, all choices together). Prints a table and
writes choices.json and choices.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks._load import APP_NAME, TINY, load_point, prompts_of_length, summarize, warm_up
from benchmarks.serve import _free_port, _start_ray


def add_choices_parser(sub) -> None:
    """Register the `choices` subcommand on the benchmark's subparsers."""
    parser = sub.add_parser("choices", help="Serving tokens/s with n=1 against n=4 choices per request.")
    parser.add_argument("--concurrency", type=int, default=32, help="Requests in flight.")
    parser.add_argument("--n", type=int, default=4, help="Choices per request of the second case.")
    parser.add_argument("--rounds", type=int, default=2, help="Alternations of the two cases.")
    parser.add_argument("--requests", type=int, default=96, help="Requests per load point.")
    parser.add_argument("--tokens", type=int, default=64, help="Prompt and output tokens.")
    parser.add_argument(
        "--replica-cpus", type=float, default=1.0, help="CPUs (= torch threads) of the replica."
    )
    parser.add_argument("--out", default="outputs/benchmark", help="Output directory.")


def run_choices(args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve
    from rich.console import Console

    from llmopt.models import build_preset, load_tokenizer
    from serve_apps.llm import app

    console = Console()
    build_preset(TINY)
    tokenizer = load_tokenizer(TINY)
    overrides = [
        f"model.name_or_path={TINY}",
        f"model.max_seq_len={max(256, 2 * args.tokens + 8)}",
        "serving.precision=fp32",
        "serving.batching.mode=continuous",
        "serving.batching.max_batch_size=32",
        "serving.max_ongoing_requests=64",
        "serving.max_queued_requests=-1",
        f"serving.max_n={max(args.n, 1)}",
        f"resources.cpus_per_worker={args.replica_cpus}",
    ]
    started = _start_ray()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    points: list[dict[str, Any]] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(app({"overrides": overrides}), name=APP_NAME, route_prefix="/")
            warm_up(url, prompts_of_length(tokenizer, args.tokens, 1, salt=99)[0], args.tokens)
            for round_ in range(args.rounds):
                for n in (1, args.n):
                    prompts = prompts_of_length(tokenizer, args.tokens, args.requests, salt=round_)
                    records, wall = asyncio.run(
                        load_point(
                            url, prompts, args.tokens, args.concurrency, extra={"n": n} if n != 1 else None
                        )
                    )
                    point = {
                        "round": round_,
                        "n": n,
                        "concurrency": args.concurrency,
                        **summarize(records, wall),
                    }
                    points.append(point)
                    console.print(
                        f"round {round_}, n={n}: {point['output_tokens_per_s']:.0f} output tokens/s, "
                        f"{point['requests_per_s']:.2f} requests/s, "
                        f"TTFT p50 {1000 * (point['ttft_p50_s'] or 0):.0f} ms"
                        + (
                            f", [red]{point['errors']} errors: {point['first_error']}[/]"
                            if point["errors"]
                            else ""
                        ),
                        highlight=False,
                    )
        finally:
            serve.shutdown()
    finally:
        if started:
            import ray

            ray.shutdown()
    summary = {
        str(n): statistics.fmean(p["output_tokens_per_s"] for p in points if p["n"] == n) for n in (1, args.n)
    }
    report = {
        "benchmark": "choices",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_at_end": os.getloadavg()[0]},
        "settings": vars(args) | {"overrides": overrides},
        "points": points,
        "output_tokens_per_s_mean": summary,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "choices.json").write_text(json.dumps(report, indent=2))
    _plot(points, args, out / "choices.png")
    console.print(
        f"mean output tokens/s at concurrency {args.concurrency}: n=1 {summary['1']:.0f}, "
        f"n={args.n} {summary[str(args.n)]:.0f}; wrote {out / 'choices.json'} and {out / 'choices.png'}",
        highlight=False,
    )
    if any(p["errors"] for p in points):
        raise SystemExit("some requests failed; see choices.json")
    return report


def _plot(points: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for n in (1, args.n):
        rounds = [p for p in points if p["n"] == n]
        ax.plot(
            [p["round"] for p in rounds], [p["output_tokens_per_s"] for p in rounds], "o-", label=f"n={n}"
        )
    ax.set_xticks(range(args.rounds))
    ax.set_xlabel("round (the two cases alternate)")
    ax.set_ylabel("output tokens/s (all choices)")
    ax.set_title(f"tiny-llama, concurrency {args.concurrency}, {args.tokens}+{args.tokens} tokens")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
