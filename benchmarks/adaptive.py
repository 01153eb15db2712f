"""``python -m jobs.benchmark adaptive``: adaptive batching against fixed batch sizes at a TPOT SLO.

One replica of serve_apps.llm (``--preset``, default base-100m, fp32, continuous batching, ``--replica-
cpus``) is deployed afresh per case and driven on loopback by ``--concurrency`` closed-loop clients for
``--duration`` seconds (streamed /v1/completions, ``--tokens`` prompt and output tokens, greedy with
``ignore_eos``). The fixed cases (``--fixed``, default 8, 16 and 32) run first; unless ``--slo-ms`` is given
the time-per-output-token SLO is then set halfway between the p99 TPOT of the smallest and of the largest
fixed size, so the largest breaks it and the smallest meets it. The adaptive case starts at the largest size
with ``monitor.adaptive_batching`` on and that SLO; its replica's ``max_batch_size`` is read from
/api/v1/stats every second.

A request's TPOT is its time after the first token over its tokens after the first, as the client sees it.
Reported per case: output tokens/s, TPOT p50/p99 and TTFT p50/p99 over the whole run and over its second
half (for the adaptive case: after it settled), and per window of 5 s (tokens/s: those generated in the
window); for the adaptive case every change
(when, from, to, the TPOT it measured) and when the last one came. Writes adaptive.json and adaptive.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._load import APP_NAME, BASE, fmt_ms, pct, prompts_of_length, stream_completion, warm_up
from benchmarks.serve import _free_port, _start_ray

WINDOW_S = 5.0


def add_adaptive_parser(sub) -> None:
    """Register the `adaptive` subcommand on the benchmark's subparsers."""
    parser = sub.add_parser("adaptive", help="Adaptive batching against fixed batch sizes at a TPOT SLO.")
    parser.add_argument("--concurrency", type=int, default=32, help="Requests in flight.")
    parser.add_argument("--fixed", type=int, nargs="+", default=[8, 16, 32], help="Fixed batch sizes.")
    parser.add_argument("--slo-ms", type=float, default=None, help="TPOT SLO (default: from the fixed runs).")
    parser.add_argument(
        "--hysteresis",
        type=float,
        default=0.2,
        help="monitor.adaptive_batching.hysteresis: as wide as the TPOT's own drift (about +-10%% between "
        "5-s windows with one core per replica on a 2-core machine), else noise moves the size.",
    )
    parser.add_argument("--duration", type=float, default=90.0, help="Seconds of load per fixed case.")
    parser.add_argument(
        "--adaptive-duration", type=float, default=150.0, help="Seconds of load of the adaptive case."
    )
    parser.add_argument(
        "--preset", default=BASE, help="Model preset (base-100m: decoding, not HTTP, bounds the replica)."
    )
    parser.add_argument("--tokens", type=int, default=32, help="Prompt and output tokens.")
    parser.add_argument(
        "--replica-cpus", type=float, default=1.0, help="CPUs (= torch threads) of the replica."
    )
    parser.add_argument("--out", default="outputs/benchmark", help="Output directory.")


async def timed_load(url: str, prompts: list[str], tokens: int, concurrency: int, seconds: float):
    """``concurrency`` clients, each sending its next request as soon as the last one ended, until
    ``seconds`` passed. Records carry ``start_s`` and ``end_s`` (since the load began)."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    records: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30), limits=limits) as client:
        start = time.perf_counter()

        async def client_loop(k: int) -> None:
            i = k
            while time.perf_counter() - start < seconds:
                body = {
                    "prompt": prompts[i % len(prompts)],
                    "max_tokens": tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                sent = time.perf_counter() - start
                try:
                    record = await stream_completion(client, url, body)
                except httpx.HTTPError as exc:
                    record = {"error": f"{type(exc).__name__}: {exc}"}
                records.append({**record, "start_s": sent, "end_s": time.perf_counter() - start})
                i += concurrency

        await asyncio.gather(*(client_loop(k) for k in range(concurrency)))
        return records, time.perf_counter() - start


def _tpot(record: dict[str, Any]) -> float | None:
    tokens = record.get("completion_tokens") or 0
    if "error" in record or tokens < 2 or record.get("ttft_s") is None:
        return None
    return (record["latency_s"] - record["ttft_s"]) / (tokens - 1)


def summarize_span(records: list[dict[str, Any]], begin_s: float, end_s: float) -> dict[str, Any]:
    """Tokens/s and TPOT/TTFT percentiles of the requests that ended within ``[begin_s, end_s)``."""
    span = [r for r in records if begin_s <= r["end_s"] < end_s and "error" not in r]
    tpot = [t for t in map(_tpot, span) if t is not None]
    ttft = [r["ttft_s"] for r in span if r.get("ttft_s") is not None]
    seconds = max(end_s - begin_s, 1e-9)
    return {
        "begin_s": begin_s,
        "end_s": end_s,
        "requests": len(span),
        "output_tokens_per_s": sum(r["completion_tokens"] for r in span) / seconds,
        "tpot_p50_s": pct(tpot, 50),
        "tpot_p99_s": pct(tpot, 99),
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
    }


def _tokens_within(record: dict[str, Any], begin_s: float, end_s: float) -> float:
    """A request's output tokens generated within ``[begin_s, end_s)``, its tokens spread evenly between its
    first token and its end (counting each request at its end makes closed-loop waves look like spikes)."""
    if "error" in record or record.get("ttft_s") is None:
        return 0.0
    first, last = record["start_s"] + record["ttft_s"], record["end_s"]
    if last <= first:
        return float(record["completion_tokens"]) if begin_s <= last < end_s else 0.0
    overlap = max(0.0, min(last, end_s) - max(first, begin_s))
    return record["completion_tokens"] * overlap / (last - first)


def windows(records: list[dict[str, Any]], wall_s: float) -> list[dict[str, Any]]:
    """Per window of ``WINDOW_S``: TPOT/TTFT of the requests that ended in it, tokens/s generated in it."""
    count = max(1, int(wall_s // WINDOW_S))
    out = []
    for i in range(count):
        begin, end = i * WINDOW_S, (i + 1) * WINDOW_S
        window = summarize_span(records, begin, end)
        window["output_tokens_per_s"] = sum(_tokens_within(r, begin, end) for r in records) / WINDOW_S
        out.append(window)
    return out


class StatsPoller:
    """Reads the replica's max_batch_size from /api/v1/stats every second on a thread of its own."""

    def __init__(self, url: str) -> None:
        self.url, self.samples, self._stop = url, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, origin: float) -> None:
        self.origin = origin
        self._thread.start()

    def _run(self) -> None:
        import httpx

        while not self._stop.wait(1.0):
            try:
                stats = httpx.get(f"{self.url}/api/v1/stats", timeout=10).json()
            except (httpx.HTTPError, ValueError):
                continue
            self.samples.append(
                {
                    "t_s": time.perf_counter() - self.origin,
                    "max_batch_size": stats["engine"]["max_batch_size"],
                }
            )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def run_case(url: str, overrides: list[str], label: str, args, prompts, tokenizer, seconds: float, console):
    """Deploy one case, load it for ``seconds``, delete it; its records, wall time and (adaptive) stats."""
    import httpx
    from ray import serve

    from serve_apps.llm import app

    serve.run(app({"overrides": overrides}), name=APP_NAME, route_prefix="/")
    try:
        warm_up(url, prompts_of_length(tokenizer, args.tokens, 1, salt=99)[0], args.tokens)
        poller = StatsPoller(url)
        unix_origin, origin = time.time(), time.perf_counter()
        poller.start(origin)
        records, wall = asyncio.run(timed_load(url, prompts, args.tokens, args.concurrency, seconds))
        poller.stop()
        stats = httpx.get(f"{url}/api/v1/stats", timeout=30).json()
    finally:
        serve.delete(APP_NAME)
    case = {
        "label": label,
        "overrides": overrides,
        "wall_s": wall,
        "errors": sum("error" in r for r in records),
        "first_error": next((r["error"] for r in records if "error" in r), None),
        "all": summarize_span(records, 0.0, wall),
        "second_half": summarize_span(records, wall / 2, wall),
        "windows": windows(records, wall),
        "max_batch_size_over_time": poller.samples,
        "records": records,
    }
    adaptive = stats.get("adaptive_batching")
    if adaptive:
        changes = [{**c, "t_s": c["at"] - unix_origin} for c in adaptive["changes"]]
        case["changes"] = changes
        case["settled_at_s"] = max((c["t_s"] for c in changes), default=0.0)
        case["settled_batch_size"] = adaptive["max_batch_size"]
        # After the last change: what the size it settled on gives (the whole rest of the run).
        case["settled"] = summarize_span(records, case["settled_at_s"], wall)
    headline = case.get("settled") or case["second_half"]
    console.print(
        f"{label}: {headline['output_tokens_per_s']:.0f} output tokens/s, TPOT p99 "
        f"{fmt_ms(headline['tpot_p99_s'])}, TTFT p99 {fmt_ms(headline['ttft_p99_s'])}"
        + (f", settled on {case['settled_batch_size']} at {case['settled_at_s']:.0f} s" if adaptive else "")
        + (f", [red]{case['errors']} errors: {case['first_error']}[/]" if case["errors"] else ""),
        highlight=False,
    )
    return case


def run_adaptive(args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve
    from rich.console import Console

    from llmopt.models import build_preset, load_tokenizer

    console = Console()
    build_preset(args.preset)
    tokenizer = load_tokenizer(args.preset)
    upper = max(args.fixed)
    common = [
        f"model.name_or_path={args.preset}",
        f"model.max_seq_len={max(256, 2 * args.tokens + 8)}",
        "serving.precision=fp32",
        "serving.batching.mode=continuous",
        f"serving.max_ongoing_requests={2 * args.concurrency}",
        "serving.max_queued_requests=-1",
        f"resources.cpus_per_worker={args.replica_cpus}",
    ]
    prompts = prompts_of_length(tokenizer, args.tokens, 4 * args.concurrency, salt=7)
    started = _start_ray()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cases: list[dict[str, Any]] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            for size in sorted(args.fixed):
                overrides = [*common, f"serving.batching.max_batch_size={size}"]
                cases.append(
                    run_case(
                        url, overrides, f"fixed {size}", args, prompts, tokenizer, args.duration, console
                    )
                )
            fixed = {int(c["label"].split()[1]): c for c in cases}
            if args.slo_ms is not None:
                slo_s = args.slo_ms / 1e3
            else:  # halfway between the smallest size's p99 TPOT and the largest's
                slo_s = (
                    fixed[min(fixed)]["second_half"]["tpot_p99_s"] + fixed[upper]["second_half"]["tpot_p99_s"]
                ) / 2
            console.print(f"TPOT SLO: {1e3 * slo_s:.1f} ms at p99", highlight=False)
            overrides = [
                *common,
                f"serving.batching.max_batch_size={upper}",
                f"monitor.tpot_slo_s={slo_s}",
                "monitor.slo_percentile=0.99",
                "monitor.adaptive_batching.enabled=true",
                f"monitor.adaptive_batching.hysteresis={args.hysteresis}",
            ]
            cases.append(
                run_case(
                    url, overrides, "adaptive", args, prompts, tokenizer, args.adaptive_duration, console
                )
            )
        finally:
            serve.shutdown()
    finally:
        if started:
            import ray

            ray.shutdown()
    adaptive = cases[-1]
    meeting = [
        c
        for c in cases[:-1]
        if c["second_half"]["tpot_p99_s"] is not None and c["second_half"]["tpot_p99_s"] <= slo_s
    ]
    best_fixed = max(meeting, key=lambda c: c["second_half"]["output_tokens_per_s"], default=None)
    settled = adaptive["settled"]
    report = {
        "benchmark": "adaptive",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_at_end": os.getloadavg()[0]},
        "settings": vars(args),
        "tpot_slo_s": slo_s,
        "cases": cases,
        "summary": {
            "settled_batch_size": adaptive["settled_batch_size"],
            "settled_at_s": adaptive["settled_at_s"],
            "changes": len(adaptive["changes"]),
            "settled_tokens_per_s": settled["output_tokens_per_s"],
            "settled_tpot_p99_s": settled["tpot_p99_s"],
            "meets_slo": settled["tpot_p99_s"] is not None and settled["tpot_p99_s"] <= slo_s,
            "best_fixed_meeting_slo": best_fixed["label"] if best_fixed else None,
            "best_fixed_tokens_per_s": best_fixed["second_half"]["output_tokens_per_s"]
            if best_fixed
            else None,
            "fixed_breaking_slo": [c["label"] for c in cases[:-1] if c not in meeting],
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adaptive.json").write_text(json.dumps(report, indent=2))
    plot_adaptive(report, out / "adaptive.png")
    s = report["summary"]
    console.print(
        f"adaptive settled on {s['settled_batch_size']} after {s['settled_at_s']:.0f} s "
        f"({s['changes']} changes): "
        f"{s['settled_tokens_per_s']:.0f} tokens/s at TPOT p99 {fmt_ms(s['settled_tpot_p99_s'])} "
        f"(SLO {fmt_ms(slo_s)}, {'met' if s['meets_slo'] else 'MISSED'}); best fixed size meeting it: "
        f"{s['best_fixed_meeting_slo']} at "
        + (f"{s['best_fixed_tokens_per_s']:.0f} tokens/s" if best_fixed else "-")
        + f"; over it: {', '.join(s['fixed_breaking_slo']) or 'none'}. Wrote {out / 'adaptive.json'} and "
        f"{out / 'adaptive.png'}",
        highlight=False,
    )
    if any(c["errors"] for c in cases):
        raise SystemExit("some requests failed; see adaptive.json")
    return report


def plot_adaptive(report: dict[str, Any], path: Path) -> None:
    """Batch size, p99 TPOT against the SLO, and output tokens/s over time, per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (size_ax, tpot_ax, rate_ax) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for case in report["cases"]:
        style = {"linewidth": 2.2, "color": "black"} if case["label"] == "adaptive" else {"alpha": 0.8}
        mids = [(w["begin_s"] + w["end_s"]) / 2 for w in case["windows"]]
        samples = case["max_batch_size_over_time"]
        size_ax.step(
            [p["t_s"] for p in samples], [p["max_batch_size"] for p in samples], where="post",
            label=case["label"], **style,
        )  # fmt: skip
        tpot_ax.plot(mids, [1e3 * (w["tpot_p99_s"] or float("nan")) for w in case["windows"]], "o-", **style)
        rate_ax.plot(mids, [w["output_tokens_per_s"] for w in case["windows"]], "o-", **style)
    tpot_ax.axhline(1e3 * report["tpot_slo_s"], color="red", linestyle="--", label="SLO")
    size_ax.set_ylabel("max_batch_size")
    size_ax.legend(loc="upper right", fontsize=8)
    tpot_ax.set_ylabel(f"TPOT p99 per {WINDOW_S:g} s (ms)")
    tpot_ax.legend(loc="upper right", fontsize=8)
    rate_ax.set_ylabel("output tokens/s")
    rate_ax.set_xlabel("seconds since the load began")
    rate_ax.set_ylim(bottom=0)
    settings = report["settings"]
    fig.suptitle(
        f"{settings['preset']}, concurrency {settings['concurrency']}, "
        f"{settings['tokens']}+{settings['tokens']} tokens, "
        f"TPOT SLO {1e3 * report['tpot_slo_s']:.0f} ms at p99"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
