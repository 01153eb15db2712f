"""``python -m jobs.benchmark churn``: session-cache churn, many distinct sessions through one replica.

    python -m jobs.benchmark churn                        # 10,000 sessions of 500 tokens, 16 MiB (~11 min)
    python -m jobs.benchmark churn --sessions 2000        # ~2-3 min
    python -m jobs.benchmark churn --malloc-trim-s 0      # without the replica's heap trims (the drift)

About 16 sessions/s on an otherwise idle 2-core machine (10,000 in ~10 minutes of load, plus ~1 minute of
start-up); when other jobs share the cores it fell to 7-9 sessions/s (~20-25 minutes).

One deployment of serve_apps.llm (tiny preset, fp32, continuous batching, one replica of ``--replica-cpus``)
with ``serving.kv_cache.budget_mb`` set and a TTL longer than the run (no expirations, so every entry that
leaves the cache is an eviction). ``--sessions`` distinct sessions each send one ``--history-tokens``
history and ask for ``--max-tokens`` greedy tokens, ``--concurrency`` at a time, alternating the seed API
(``POST /api/v1/model/generate`` with ``X-Session-ID``) and ``/v1/completions`` with ``session_id``, so the
run is dominated by prefills and session-cache insertions. A concurrent sampler reads ``/api/v1/stats``
every ``--sample-s`` seconds: the session cache's bytes, entries, hits, misses and evictions, the replica's
RSS, and malloc's heap bytes in use and free (a leak grows the first, retained free space the second).
Afterwards one session runs alone (it is then the most recently used entry) and is revisited (a hit), and
the ``--revisit`` oldest sessions, evicted long before, are revisited (misses, a full prefill): each revisit
must answer its session's first text.

Checks (any failure fails the run, files written first): no sample's cache bytes above the budget;
evictions > 0; at rest, misses = entries + evictions + expirations, and during the load their difference
(sessions looked up, not yet stored back) never above the concurrency (see :func:`_checked_out`); the
revisits' texts and cache hits as above; no failed request. Figures: peak cache bytes against the budget,
evictions against what sessions / budget predict, RSS at start, middle and end of the load with its slope
over each half, malloc's heap, sessions/s. Writes churn.json and churn.png (cache bytes with the budget
line; RSS and the heap in use; over time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._load import APP_NAME, CONNECT_TIMEOUT_S, TIMEOUT_S, TINY, prompts_of_length, warm_up

MIB = 2**20


def add_churn_parser(sub) -> None:
    """Register the `churn` subcommand on the benchmark's subparsers."""
    parser = sub.add_parser(
        "churn", help="Session-cache churn: distinct sessions under a byte budget, cache bytes and RSS."
    )
    parser.add_argument("--sessions", type=int, default=10_000, help="Distinct sessions.")
    parser.add_argument("--history-tokens", type=int, default=500, help="Tokens of each session's history.")
    parser.add_argument("--budget-mb", type=float, default=16.0, help="serving.kv_cache.budget_mb.")
    parser.add_argument("--max-tokens", type=int, default=2, help="Greedy tokens generated per session.")
    parser.add_argument("--concurrency", type=int, default=8, help="Sessions in flight.")
    parser.add_argument("--sample-s", type=float, default=1.0, help="Seconds between /api/v1/stats samples.")
    parser.add_argument(
        "--revisit", type=int, default=4, help="Oldest (evicted) sessions revisited at the end."
    )
    parser.add_argument(
        "--replica-cpus", type=float, default=1.0, help="CPUs (= torch threads) of the replica."
    )
    parser.add_argument(
        "--malloc-trim-s",
        type=float,
        default=None,
        help="LLMOPT_MALLOC_TRIM_S for the replica (0: no heap trims, the drift's baseline); only on a local "
        "cluster this job starts, whose processes inherit its environment.",
    )
    parser.add_argument("--out", default="outputs/benchmark", help="Output directory.")


# ------------------------------------------------------------------------------------------------- load


@dataclass
class ChurnResult:
    """What :func:`drive_churn` measured; ``samples`` are ``/api/v1/stats`` readings over time."""

    sessions: list[dict[str, Any]] = field(default_factory=list)  # first turns, in completion order
    samples: list[dict[str, Any]] = field(default_factory=list)
    revisits: list[dict[str, Any]] = field(default_factory=list)
    load_s: float = 0.0
    start: dict[str, Any] = field(default_factory=dict)  # stats before the load
    end: dict[str, Any] = field(default_factory=dict)  # stats at rest, after the revisits
    errors: list[str] = field(default_factory=list)


def churn_overrides(budget_mb: float, history_tokens: int, max_tokens: int, replica_cpus: float) -> list[str]:
    """The deployment's config overrides: tiny preset, fp32, continuous batching, the cache budget."""
    return [
        f"model.name_or_path={TINY}",
        f"model.max_seq_len={max(256, history_tokens + max_tokens + 64)}",
        "serving.precision=fp32",
        "serving.batching.mode=continuous",
        "serving.batching.max_batch_size=16",
        "serving.max_ongoing_requests=64",
        "serving.max_queued_requests=-1",
        f"serving.kv_cache.budget_mb={budget_mb}",
        # Longer than any run: an entry leaves the cache only by eviction, which the checks count.
        "serving.kv_cache.ttl_s=86400",
        f"resources.cpus_per_worker={replica_cpus}",
    ]


def histories(tokenizer, history_tokens: int, pool: int = 64) -> tuple[list[str], int]:
    """Texts from which :func:`history` builds each session's distinct history, and the tag's token room.

    A pool of corpus slices (exact token counts take up to 12 encodes each, too slow for 10,000 sessions),
    each session's history being a numbered tag and one slice: about ``history_tokens`` tokens in all.
    """
    from llmopt.data import encode_prompt

    tag = len(encode_prompt(history("", 99_999), tokenizer)) - 1  # BOS counted by the slice
    texts = prompts_of_length(tokenizer, max(8, history_tokens - tag), pool, salt=3)
    # Tokens merge across the tag's edge: correct the slices' length once by the mean miss.
    probe = [len(encode_prompt(history(t, 5_000 + i), tokenizer)) for i, t in enumerate(texts[:8])]
    tag += round(sum(probe) / len(probe)) - history_tokens
    return prompts_of_length(tokenizer, max(8, history_tokens - tag), pool, salt=3), tag


def history(text: str, index: int) -> str:
    """Session ``index``'s history: a numbered tag, then ``text``."""
    return f"Session {index}. {text}"


async def _turn(client, url: str, index: int, sid: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One whole (not streamed) greedy turn of a session: even indexes through the seed API with
    ``X-Session-ID``, odd ones through ``/v1/completions`` with ``session_id``."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    if index % 2 == 0:
        r = await client.post(
            f"{url}/api/v1/model/generate", json={**body, "stream": False}, headers={"X-Session-ID": sid}
        )
    else:
        r = await client.post(f"{url}/v1/completions", json={**body, "session_id": sid})
    latency = time.perf_counter() - start
    if r.status_code != 200:
        return {"index": index, "error": f"HTTP {r.status_code}: {r.text[:300]}"}
    data = r.json()
    if index % 2 == 0:
        text, usage = data["text"], data["usage"]
        cached = usage["cached_tokens"]
    else:
        text, usage = data["choices"][0]["text"], data["usage"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
    return {
        "index": index,
        "api": "seed" if index % 2 == 0 else "openai",
        "text": text,
        "prompt_tokens": usage["prompt_tokens"],
        "cached_tokens": cached,
        "latency_s": latency,
    }


def _sample(stats: dict[str, Any], t: float, done: int) -> dict[str, Any]:
    cache, heap = stats.get("kv_cache") or {}, stats.get("heap") or {}
    return {
        "t_s": t,
        "sessions_done": done,
        "rss_bytes": stats["memory"].get("rss_bytes"),
        **{k: cache.get(k) for k in ("bytes", "entries", "hits", "misses", "evictions", "expirations")},
        # malloc's bytes in use (a leak grows them) and free but kept (retention grows them), and its trims.
        "heap_in_use_bytes": heap.get("in_use_bytes"),
        "heap_free_bytes": heap.get("free_bytes"),
        "malloc_trims": heap.get("trims"),
    }


async def drive_churn(
    url: str,
    texts: list[str],
    sessions: int,
    max_tokens: int,
    concurrency: int,
    sample_s: float = 1.0,
    revisit: int = 4,
    log=None,
) -> ChurnResult:
    """Run ``sessions`` distinct sessions against ``url`` while sampling ``/api/v1/stats``, then the
    revisits (see the module docstring).

    Args:
        url: The app's base URL.
        texts: The pool :func:`histories` returned; session i's history is ``history(texts[i % n], i)``.
        sessions: Distinct sessions to run.
        max_tokens: Greedy tokens per turn.
        concurrency: Sessions in flight.
        sample_s: Seconds between stats samples.
        revisit: How many of the oldest sessions to revisit at the end.
        log: Optional ``log(str)`` for progress lines.
    """
    import httpx

    run = uuid.uuid4().hex[:8]  # fresh ids per run: a cluster reused by another run has its own sessions
    sid = [f"churn-{run}-{i}" for i in range(sessions + 1)]
    prompt = [history(texts[i % len(texts)], i) for i in range(sessions + 1)]
    result = ChurnResult()
    timeout = httpx.Timeout(TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with (
        httpx.AsyncClient(timeout=timeout, limits=limits) as client,
        httpx.AsyncClient(timeout=timeout) as sampler_client,  # its own pool: never queued behind the load
    ):

        async def stats() -> dict[str, Any]:
            r = await sampler_client.get(f"{url}/api/v1/stats")
            r.raise_for_status()
            return r.json()

        result.start = await stats()
        t0 = time.perf_counter()
        done = asyncio.Event()

        async def sampler() -> None:
            next_log = t0 + 30
            while not done.is_set():
                try:
                    reading = await stats()
                except httpx.HTTPError as exc:
                    result.errors.append(f"stats: {type(exc).__name__}: {exc}")
                else:
                    now = time.perf_counter()
                    result.samples.append(_sample(reading, now - t0, len(result.sessions)))
                    if log and now >= next_log:
                        s = result.samples[-1]
                        log(
                            f"{now - t0:4.0f} s: {s['sessions_done']:,} sessions, cache "
                            f"{s['bytes'] / MIB:.1f} MiB, {s['evictions']:,} evictions, "
                            f"RSS {s['rss_bytes'] / MIB:.0f} MiB"
                        )
                        next_log = now + 30
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), sample_s)

        sampling = asyncio.create_task(sampler())
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(sessions):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                try:
                    record = await _turn(client, url, i, sid[i], prompt[i], max_tokens)
                except httpx.HTTPError as exc:
                    record = {"index": i, "error": f"{type(exc).__name__}: {exc}"}
                if "error" in record:
                    result.errors.append(f"session {i}: {record['error']}")
                else:
                    result.sessions.append(record)

        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            result.load_s = time.perf_counter() - t0
            done.set()
            await sampling
        # At rest: one more session alone (the most recently used entry), revisited at once (a hit), then
        # the oldest sessions, evicted long before (misses, a full prefill).
        tail = sessions
        last = await _turn(client, url, tail, sid[tail], prompt[tail], max_tokens)
        again = [(tail, last, await _turn(client, url, tail, sid[tail], prompt[tail], max_tokens))]
        first = {r["index"]: r for r in result.sessions}
        for i in sorted(first)[:revisit]:
            again.append((i, first[i], await _turn(client, url, i, sid[i], prompt[i], max_tokens)))
        for i, before, after in again:
            if "error" in before or "error" in after:
                result.errors.append(f"revisit of session {i}: {before.get('error') or after.get('error')}")
                continue
            result.revisits.append(
                {
                    "index": i,
                    "expect": "hit" if i == tail else "miss",
                    "first_text": before["text"],
                    "text": after["text"],
                    "prompt_tokens": after["prompt_tokens"],
                    "cached_tokens": after["cached_tokens"],
                }
            )
        result.end = await stats()
        result.samples.append(_sample(result.end, time.perf_counter() - t0, len(result.sessions)))
    return result


# -------------------------------------------------------------------------------------------- figures


def _slope_mib_per_min(samples: list[dict[str, Any]]) -> float | None:
    """Least-squares slope of RSS over time, MiB per minute (None with fewer than 3 samples)."""
    points = [(s["t_s"], s["rss_bytes"]) for s in samples if s.get("rss_bytes") is not None]
    if len(points) < 3:
        return None
    import numpy as np

    t, rss = np.array(points, dtype=float).T
    return float(np.polyfit(t, rss, 1)[0]) * 60 / MIB


def figures(result: ChurnResult, budget_bytes: int) -> dict[str, Any]:
    """Cache bytes against the budget, evictions against the prediction, RSS start/middle/end and slopes,
    sessions/s."""
    load = [s for s in result.samples if s["t_s"] <= result.load_s]
    end = result.end["kv_cache"]
    entry_bytes = [s["bytes"] / s["entries"] for s in result.samples if s["entries"]]
    per_entry = max(entry_bytes) if entry_bytes else None
    capacity = int(budget_bytes // per_entry) if per_entry else None
    sessions = len(result.sessions) + 1  # the tail session too
    rss = [s["rss_bytes"] for s in load if s.get("rss_bytes") is not None]
    middle = min(load, key=lambda s: abs(s["t_s"] - result.load_s / 2)) if load else None
    halves = (
        [s for s in load if s["t_s"] <= result.load_s / 2],
        [s for s in load if s["t_s"] > result.load_s / 2],
    )
    return {
        "sessions": sessions,
        "budget_bytes": budget_bytes,
        "peak_cache_bytes": max((s["bytes"] for s in result.samples), default=0),
        "peak_cache_fraction_of_budget": max((s["bytes"] for s in result.samples), default=0) / budget_bytes,
        "samples": len(result.samples),
        "samples_over_budget": sum(s["bytes"] > budget_bytes for s in result.samples),
        "entry_bytes": per_entry,
        "entries_that_fit": capacity,
        "entries_at_end": end["entries"],
        "evictions": end["evictions"],
        "expirations": end["expirations"],
        # Distinct sessions, each stored once, with at most `capacity` left: the rest were evicted (the
        # revisits of evicted sessions store them again and evict as many).
        "evictions_predicted": (sessions + result_misses_on_revisit(result) - capacity) if capacity else None,
        "hits": end["hits"],
        "misses": end["misses"],
        "misses_minus_removals": _checked_out(end),
        "checked_out_max_during_load": max((_checked_out(s) for s in load), default=0),
        "load_s": result.load_s,
        "sessions_per_s": len(result.sessions) / result.load_s if result.load_s else 0.0,
        "prompt_tokens_mean": (
            sum(r["prompt_tokens"] for r in result.sessions) / len(result.sessions) if result.sessions else 0
        ),
        "replica": result.start.get("replica"),
        "rss_start_bytes": result.start["memory"].get("rss_bytes"),
        "rss_middle_bytes": middle["rss_bytes"] if middle else None,
        "rss_end_bytes": rss[-1] if rss else None,
        "rss_peak_bytes": max(rss, default=None),
        "rss_slope_first_half_mib_per_min": _slope_mib_per_min(halves[0]),
        "rss_slope_second_half_mib_per_min": _slope_mib_per_min(halves[1]),
        "heap_in_use_start_bytes": _heap(result.start, "in_use_bytes"),
        "heap_in_use_end_bytes": _heap(result.end, "in_use_bytes"),
        "heap_free_start_bytes": _heap(result.start, "free_bytes"),
        "heap_free_end_bytes": _heap(result.end, "free_bytes"),
        "malloc_trims": _heap(result.end, "trims"),
        "malloc_trim_seconds": _heap(result.end, "trim_seconds"),
        "malloc_trim_interval_s": _heap(result.end, "interval_s"),
        "errors": len(result.errors),
    }


def _heap(stats: dict[str, Any], key: str) -> Any:
    return (stats.get("heap") or {}).get(key)


def _checked_out(stats: dict[str, Any]) -> int:
    """Sessions looked up and not yet stored back (0 at rest).

    Every request looks its session up once (a hit checks the entry out, a miss finds none) and stores it
    back once (an insertion, or an eviction when it alone exceeds the budget); each eviction or expiration
    removes one entry. So stores - hits = entries + evictions + expirations, and lookups - stores =
    misses - (entries + evictions + expirations) is the number of lookups whose store is still to come.
    """
    return stats["misses"] - stats["entries"] - stats["evictions"] - stats["expirations"]


def result_misses_on_revisit(result: ChurnResult) -> int:
    return sum(r["expect"] == "miss" for r in result.revisits)


def failures(result: ChurnResult, figs: dict[str, Any], concurrency: int) -> list[str]:
    """Every check of the module docstring that failed, in words."""
    failed = [f"{len(result.errors)} failed requests, the first: {result.errors[0]}"] if result.errors else []
    if figs["samples_over_budget"]:
        failed.append(
            f"{figs['samples_over_budget']} samples held more cache bytes than the budget "
            f"(peak {figs['peak_cache_bytes']:,} > {figs['budget_bytes']:,})"
        )
    if not figs["evictions"] > 0:
        failed.append("no evictions were counted")
    if figs["misses_minus_removals"] != 0:
        failed.append(
            f"at rest, misses ({figs['misses']:,}) != entries + evictions + expirations "
            f"({figs['entries_at_end'] + figs['evictions'] + figs['expirations']:,})"
        )
    if not 0 <= figs["checked_out_max_during_load"] <= concurrency:
        failed.append(
            f"a sample had {figs['checked_out_max_during_load']} sessions checked out (misses - entries - "
            f"evictions - expirations), more than the {concurrency} in flight"
        )
    for r in result.revisits:
        if r["text"] != r["first_text"]:
            failed.append(f"revisit of session {r['index']} answered {r['text']!r}, not {r['first_text']!r}")
        hit = r["cached_tokens"] > 0
        if hit != (r["expect"] == "hit"):
            failed.append(
                f"revisit of session {r['index']} reused {r['cached_tokens']} cached tokens; expected a "
                f"{r['expect']}"
            )
    return failed


# ---------------------------------------------------------------------------------------------- the job


def run_churn(args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve
    from rich.console import Console
    from rich.table import Table

    from benchmarks.serve import _free_port, _start_ray
    from llmopt.models import build_preset, load_tokenizer
    from serve_apps.llm import app

    console = Console()
    log = lambda line: console.print(line, highlight=False)  # noqa: E731
    build_preset(TINY)
    tokenizer = load_tokenizer(TINY)
    texts, _ = histories(tokenizer, args.history_tokens)
    overrides = churn_overrides(args.budget_mb, args.history_tokens, args.max_tokens, args.replica_cpus)
    budget = int(args.budget_mb * MIB)
    if args.malloc_trim_s is not None:
        os.environ["LLMOPT_MALLOC_TRIM_S"] = str(args.malloc_trim_s)  # inherited by a local cluster's workers
    started = _start_ray()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(app({"overrides": overrides}), name=APP_NAME, route_prefix="/")
            warm_up(url, texts[0], args.max_tokens)
            log(
                f"churn: {args.sessions:,} sessions of ~{args.history_tokens} tokens, budget "
                f"{args.budget_mb:g} MiB, concurrency {args.concurrency}"
            )
            result = asyncio.run(
                drive_churn(
                    url, texts, args.sessions, args.max_tokens, args.concurrency, args.sample_s,
                    args.revisit, log,
                )
            )  # fmt: skip
        finally:
            serve.shutdown()
    finally:
        if started:
            import ray

            ray.shutdown()
    figs = figures(result, budget)
    failed = failures(result, figs, args.concurrency)
    report = {
        "benchmark": "churn",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_at_end": os.getloadavg()[0]},
        "settings": vars(args) | {"overrides": overrides},
        "figures": figs,
        "failures": failed,
        "revisits": result.revisits,
        "samples": result.samples,
        "stats_start": result.start,
        "stats_end": result.end,
        "errors": result.errors[:20],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "churn.json").write_text(json.dumps(report, indent=2))
    _plot(result, figs, args, out / "churn.png")
    console.print(_table(figs, Table))
    console.print(f"wrote {out / 'churn.json'} and {out / 'churn.png'}", highlight=False)
    if failed:
        for line in failed:
            console.print(f"[red]FAIL[/] {line}", highlight=False)
        raise SystemExit("session-cache churn checks failed; see churn.json")
    return report


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v / MIB:,.2f} MiB"


def _table(f: dict[str, Any], Table):
    table = Table(title="session-cache churn (one replica, tiny preset, fp32)")
    table.add_column("figure")
    table.add_column("measured", justify="right")
    slope = lambda v: "-" if v is None else f"{v:+.2f} MiB/min"  # noqa: E731
    rows = [
        ("sessions (distinct)", f"{f['sessions']:,}, ~{f['prompt_tokens_mean']:.0f} prompt tokens each"),
        ("peak cache bytes / budget", f"{_mib(f['peak_cache_bytes'])} / {_mib(f['budget_bytes'])}"),
        ("samples over budget", f"{f['samples_over_budget']} of {f['samples']}"),
        ("bytes per entry, entries that fit", f"{_mib(f['entry_bytes'])}, {f['entries_that_fit']}"),
        ("evictions (predicted)", f"{f['evictions']:,} ({f['evictions_predicted']})"),
        (
            "looked up, not stored: end / peak",
            f"{f['misses_minus_removals']} / {f['checked_out_max_during_load']}",
        ),
        (
            "replica RSS start / middle / end",
            f"{_mib(f['rss_start_bytes'])} / {_mib(f['rss_middle_bytes'])} / {_mib(f['rss_end_bytes'])}",
        ),
        (
            "RSS slope, first / second half",
            f"{slope(f['rss_slope_first_half_mib_per_min'])} / "
            f"{slope(f['rss_slope_second_half_mib_per_min'])}",
        ),
        (
            "malloc heap in use, start / end",
            f"{_mib(f['heap_in_use_start_bytes'])} / {_mib(f['heap_in_use_end_bytes'])}",
        ),
        (
            "malloc heap free, start / end",
            f"{_mib(f['heap_free_start_bytes'])} / {_mib(f['heap_free_end_bytes'])}",
        ),
        ("malloc trims (interval)", f"{f['malloc_trims']} ({f['malloc_trim_interval_s']} s)"),
        ("load duration, sessions/s", f"{f['load_s']:.0f} s, {f['sessions_per_s']:.1f}"),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def _plot(result: ChurnResult, figs: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result.samples
    t = [s["t_s"] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(t, [s["bytes"] / MIB for s in samples], lw=1, label="session cache bytes")
    top.axhline(figs["budget_bytes"] / MIB, color="red", ls="--", lw=1, label="budget")
    top.set_ylabel("MiB")
    top.set_ylim(0, figs["budget_bytes"] / MIB * 1.25)
    top.legend(loc="lower right")
    top.set_title(
        f"{figs['sessions']:,} sessions of ~{figs['prompt_tokens_mean']:.0f} tokens, "
        f"{figs['evictions']:,} evictions, {figs['sessions_per_s']:.1f} sessions/s"
    )
    rss = [(s["t_s"], s["rss_bytes"] / MIB) for s in samples if s.get("rss_bytes") is not None]
    bottom.plot([p[0] for p in rss], [p[1] for p in rss], lw=1, color="tab:green", label="replica RSS")
    heap = [(s["t_s"], s["heap_in_use_bytes"] / MIB) for s in samples if s.get("heap_in_use_bytes")]
    if heap:
        bottom.plot(
            [p[0] for p in heap], [p[1] for p in heap], lw=1, color="tab:purple", label="malloc heap in use"
        )
    bottom.set_ylim(0, 1.3 * max((p[1] for p in rss), default=1))
    bottom.axvline(result.load_s, color="grey", ls=":", lw=1, label="load ends")
    bottom.set_ylabel("MiB")
    bottom.set_title("replica memory (a leak would raise the heap in use)", fontsize=10)
    bottom.set_xlabel("seconds since the load started")
    bottom.legend(loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
