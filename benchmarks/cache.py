"""``python -m jobs.benchmark cache``: latency of a response-cache hit against a miss.

One deployment of serve_apps.llm (tiny preset by default, fp32, `serving.response_cache.enabled=true`) per
store: the in-process LRU, then Redis when `redis-server` is on PATH (started here on a free loopback port
without persistence, stopped after) or `--redis-url` names one. Each of `--requests` different greedy
prompts (64 tokens, 64 output tokens, `ignore_eos`) is sent twice, one request at a time: the first is a
miss (generated, then stored), the second a hit. Whole and streamed answers are measured apart. Reports
latency p50/p95/p99 per store, kind and result; prints a table and writes cache.json and cache.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks._load import APP_NAME, TINY, prompts_of_length, warm_up
from benchmarks.serve import _free_port, _start_ray


def add_cache_parser(sub) -> None:
    """Register the `cache` subcommand on the benchmark's subparsers."""
    parser = sub.add_parser("cache", help="Response-cache hit against miss latency (memory and Redis).")
    parser.add_argument("--model", default=TINY, help="Preset or model directory.")
    parser.add_argument("--requests", type=int, default=40, help="Different prompts, each sent twice.")
    parser.add_argument("--tokens", type=int, default=64, help="Prompt and output tokens.")
    parser.add_argument("--redis-url", default=None, help="A running Redis (default: start redis-server).")
    parser.add_argument("--out", default="outputs/benchmark", help="Output directory.")


@contextlib.contextmanager
def _redis(url: str | None, tmp: Path):
    """A Redis URL: the given one, or a redis-server started here (None when there is none)."""
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = _free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _new(prompts: list[str], seen: set[str]) -> list[str]:
    """`prompts` without repeats and without those in `seen` (the corpus slices can coincide)."""
    out: list[str] = []
    for prompt in prompts:
        if prompt not in seen and prompt not in out:
            out.append(prompt)
    return out


def _timed(url: str, body: dict[str, Any]) -> tuple[float, str]:
    import httpx

    start = time.perf_counter()
    if not body.get("stream"):
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        response.raise_for_status()
        return time.perf_counter() - start, response.headers.get("x-cache", "")
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for _ in response.iter_bytes():
            pass
        return time.perf_counter() - start, response.headers.get("x-cache", "")


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p95_ms": 1000 * pick(0.95),
        "p99_ms": 1000 * pick(0.99),
    }


def run_cache(args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve
    from rich.console import Console
    from rich.table import Table

    from llmopt.models import build_preset, load_tokenizer
    from serve_apps.llm import app

    console = Console()
    build_preset(args.model) if args.model == TINY else None
    tokenizer = load_tokenizer(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = [
        f"model.name_or_path={args.model}",
        f"model.max_seq_len={max(256, 2 * args.tokens + 8)}",
        "serving.precision=fp32",
        "serving.response_cache.enabled=true",
        "resources.cpus_per_worker=1",
    ]
    started = _start_ray()
    rows: list[dict[str, Any]] = []
    try:
        with _redis(args.redis_url, out) as redis_url:
            stores = [("memory", [])] + (
                [("redis", [f"serving.response_cache.redis_url={redis_url}"])] if redis_url else []
            )
            for store, extra in stores:
                port = _free_port()
                url = f"http://127.0.0.1:{port}"
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                try:
                    serve.run(app({"overrides": [*base, *extra]}), name=APP_NAME, route_prefix="/")
                    warm = prompts_of_length(tokenizer, args.tokens, 1, salt=77)[0]
                    warm_up(url, warm, args.tokens)
                    seen = {warm}  # a prompt asked before is a hit: each measured prompt must be new
                    for stream in (False, True):
                        prompts = _new(
                            prompts_of_length(tokenizer, args.tokens, 3 * args.requests, salt=3 + stream),
                            seen,
                        )
                        prompts = prompts[: args.requests]
                        seen.update(prompts)
                        times: dict[str, list[float]] = {"miss": [], "hit": []}
                        for prompt in prompts:
                            body = {"prompt": prompt, "max_tokens": args.tokens, "temperature": 0,
                                    "ignore_eos": True, "stream": stream}  # fmt: skip
                            for expected in ("miss", "hit"):
                                seconds, result = _timed(url, body)
                                if result != expected:
                                    raise SystemExit(
                                        f"{store}: expected a {expected}, the server said {result!r}"
                                    )
                                times[expected].append(seconds)
                        for result, values in times.items():
                            rows.append(
                                {"store": store, "kind": "stream" if stream else "whole", "result": result,
                                 "requests": len(values), **_percentiles(values)}
                            )  # fmt: skip
                finally:
                    serve.shutdown()
    finally:
        if started:
            import ray

            ray.shutdown()
    report = {
        "benchmark": "cache",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count()},
        "settings": {**vars(args), "overrides": base},
        "rows": rows,
    }
    (out / "cache.json").write_text(json.dumps(report, indent=2))
    table = Table(
        title=f"response cache: {args.requests} prompts x 2, {args.tokens} output tokens, one at a time"
    )
    for column in ("store", "answer", "result", "p50 ms", "p95 ms", "p99 ms"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["store"],
            r["kind"],
            r["result"],
            f"{r['p50_ms']:.1f}",
            f"{r['p95_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
        )
    console.print(table)
    _plot(rows, out / "cache.png")
    console.print(f"wrote {out / 'cache.json'} and {out / 'cache.png'}")
    return report


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['store']}\n{r['kind']}\n{r['result']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    ax.bar(
        labels,
        [r["p50_ms"] for r in rows],
        color=["#C44E52" if r["result"] == "miss" else "#55A868" for r in rows],
    )
    upper = [r["p99_ms"] - r["p50_ms"] for r in rows]
    ax.errorbar(
        labels,
        [r["p50_ms"] for r in rows],
        yerr=[[0] * len(rows), upper],
        fmt="none",
        color="black",
        capsize=4,
    )
    ax.set_yscale("log")
    ax.set_ylabel("latency ms (bar p50, whisker p99), log scale")
    ax.set_title("response cache: hit against miss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
