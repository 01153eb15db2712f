"""Cases of ``python -m jobs.benchmark serve`` and their measurement: plan, prompts, load, sessions.

A case is one deployment of serve_apps.llm (one replica, fp32 on CPU) with its own config overrides;
:func:`run_case` deploys it, warms it up, measures it and deletes it. Prompts have an exact token count (the
model's tokenizer, as the server tokenizes them). A load point sends a fixed list of streamed
``/v1/completions`` requests (greedy, ``ignore_eos``) with at most C in flight (a closed loop: asyncio +
httpx, one semaphore). The replica coalesces a stream's tokens (the first token alone and at once, then at
most one event per ``serving.stream_interval_s`` holding every token generated meanwhile), so an event may
carry several tokens: the time to first token is the first event with text, and the token count comes from
the usage event that ``stream_options.include_usage`` asks for, never from counting events.

Sessions use the seed API's resend protocol: turn 2 sends the whole conversation (history, turn 1's reply,
a follow-up) with the same ``X-Session-ID``, and the replica reuses the longest common prefix of its cached
tokens; ``X-Prompt-Tokens`` and ``X-Cached-Tokens`` say how much of the prompt came from the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx  # imported where used: a development dependency, not needed by `benchmark train`

TINY, BASE = "tiny-llama", "base-100m"
APP_NAME = "llm"
TIMEOUT_S, CONNECT_TIMEOUT_S = 900.0, 30.0


class BenchmarkRequestError(RuntimeError):
    """The server answered a request the benchmark depends on with an error."""


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Plan:
    """Sizes of one benchmark run (the full run, or the `--quick` smoke run)."""

    quick: bool
    prompt_tokens: int
    output_tokens: int
    tiny_concurrency: list[int]
    base_concurrency: list[int]
    session_history: int
    session_followup: int
    session_output: int
    session_repeats: int
    replica_cpus: float
    bandwidth_mb: int
    include_base: bool

    def requests(self, preset: str, concurrency: int) -> int:
        """Requests sent at one load point: enough for every slot to turn over at least once."""
        if self.quick:
            return max(2 * concurrency, 4)
        # At least 32 on the tiny preset: the concurrency-1 points are the batching figure's baseline, and
        # 16 requests (about 5 s) left it moving by a third between runs.
        return max(4 * concurrency, 32) if preset == TINY else max(concurrency, 4)


def make_plan(args: argparse.Namespace) -> Plan:
    """The full run from the command line's sizes, or the fixed `--quick` smoke run."""
    if args.quick:
        return Plan(
            quick=True, prompt_tokens=16, output_tokens=16, tiny_concurrency=[1, 4], base_concurrency=[],
            session_history=200, session_followup=16, session_output=4, session_repeats=2,
            replica_cpus=args.replica_cpus, bandwidth_mb=64, include_base=False,
        )  # fmt: skip
    # 11 measured sessions: single follow-up TTFTs range from 30 to 90 ms here (mostly the HTTP path), and
    # the p50 of 5 moved between 37 and 58 ms from run to run.
    return Plan(
        quick=False, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
        tiny_concurrency=[1, 8, 32], base_concurrency=[1, 8, 32],
        session_history=args.session_history, session_followup=16, session_output=8, session_repeats=11,
        replica_cpus=args.replica_cpus, bandwidth_mb=512, include_base=not args.no_base,
    )  # fmt: skip


def make_cases(plan: Plan) -> list[dict[str, Any]]:
    """One entry per deployment: kind, group, label, preset, overrides, load points (concurrencies)."""
    common = [
        f"model.max_seq_len={max(256, plan.prompt_tokens + plan.output_tokens + 8)}",
        "serving.precision=fp32",
        "serving.batching.max_batch_size=32",
        "serving.max_ongoing_requests=64",
        "serving.max_queued_requests=-1",
        f"resources.cpus_per_worker={plan.replica_cpus}",
    ]
    none, static, cont = (f"serving.batching.mode={m}" for m in ("none", "static", "continuous"))
    tiny_c = plan.tiny_concurrency
    if plan.quick:
        load = [("batching", "none", TINY, [none], [1]), ("batching", "continuous", TINY, [cont], tiny_c)]
    else:
        load = [
            ("batching", "none", TINY, [none], tiny_c),
            ("batching", "static", TINY, [static], [c for c in tiny_c if c > 1]),
            ("batching", "continuous", TINY, [cont], tiny_c),
            ("kv_cache", "continuous, KV cache off", TINY, [cont, "serving.kv_cache.enabled=false"],
             [c for c in tiny_c if c <= 8]),
        ]  # fmt: skip
    if plan.include_base:
        load += [
            ("base-100m", "none", BASE, [none], [1]),
            ("base-100m", "continuous", BASE, [cont], plan.base_concurrency),
        ]
    cases = [
        {"kind": "load", "group": g, "label": label, "preset": preset, "overrides": o, "concurrency": c}
        for g, label, preset, o, c in load
    ]
    # The batch-1 point of the bandwidth figure gets the memory bandwidth measured right before and after it.
    ceiling_group = "base-100m" if plan.include_base else "batching"
    for case in cases:
        if case["group"] == ceiling_group and case["label"] == "continuous" and 1 in case["concurrency"]:
            case["bandwidth_at"] = 1
    session_len = plan.session_history + plan.session_output + plan.session_followup + plan.session_output
    for reuse in (True, False):
        reuse_on = f"serving.kv_cache.session_reuse={str(reuse).lower()}"
        overrides = [cont, reuse_on, f"model.max_seq_len={session_len + 64}"]
        label = "session reuse" if reuse else "recompute"
        cases.append({"kind": "session", "group": "session", "label": label, "preset": TINY,
                      "overrides": overrides, "concurrency": [1]})  # fmt: skip
    for case in cases:
        case["overrides"] = [f"model.name_or_path={case['preset']}", *common, *case["overrides"]]
    return cases


# ---------------------------------------------------------------------------------------------- prompts


def _source_ids(tokenizer) -> list[int]:
    from llmopt.data import BUILTIN_DIR

    ids = tokenizer.encode((BUILTIN_DIR / "corpus.txt").read_text(), add_special_tokens=False)
    return ids * (1 + 6000 // max(1, len(ids)))


def prompts_of_length(tokenizer, n_tokens: int, count: int, salt: int = 0) -> list[str]:
    """``count`` different texts that ``encode_prompt`` turns into exactly ``n_tokens`` tokens (BOS included).

    Slices of the built-in corpus at different offsets; decode/encode round trips can merge tokens at the
    edges, so each slice's length is corrected until it tokenizes to the target (the closest is kept
    otherwise).
    """
    from llmopt.data import encode_prompt

    ids = _source_ids(tokenizer)
    out = []
    for i in range(count):
        start = (37 * (i + salt * count)) % max(1, len(ids) - n_tokens - 64)
        take, best = n_tokens - 1, None
        for _ in range(12):
            text = tokenizer.decode(ids[start : start + max(1, take)], skip_special_tokens=True)
            got = len(encode_prompt(text, tokenizer))
            if best is None or abs(got - n_tokens) < abs(best[1] - n_tokens):
                best = (text, got)
            if got == n_tokens:
                break
            take += n_tokens - got
        out.append(best[0])
    return out


# ----------------------------------------------------------------------------------------- load generator


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile of ``values``, or None when there are none."""
    if not values:
        return None
    import numpy as np

    return float(np.percentile(values, q))


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed ``/v1/completions`` request: TTFT, latency, completion tokens (from usage), events.

    Returns ``{"error": ...}`` instead when the server answers an error status, reports an error in the
    stream or sends no usage event.
    """
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, first_event, events, usage = None, None, 0, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            return {"error": f"HTTP {response.status_code}: {text[:300]}", "status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                return {"error": f"in-stream error: {event['error']}"}
            if event.get("usage"):
                usage = event["usage"]
            if event.get("choices"):
                events += 1
                now = time.perf_counter() - start
                first_event = now if first_event is None else first_event
                if ttft is None and event["choices"][0].get("text"):
                    ttft = now
    latency = time.perf_counter() - start
    if usage is None:
        return {"error": "the stream ended without a usage event (stream_options.include_usage)"}
    return {
        # The first visible text; a completion that decodes to no text at all (a random model may emit only
        # special tokens or partial characters) counts its first token event instead.
        "ttft_s": ttft if ttft is not None else first_event,
        "latency_s": latency,
        "completion_tokens": usage["completion_tokens"],
        "events": events,
    }


async def load_point(
    url: str, prompts: list[str], max_tokens: int, concurrency: int, extra: dict[str, Any] | None = None
) -> tuple[list[dict[str, Any]], float]:
    """Send every prompt (greedy, ``ignore_eos``, plus ``extra`` body fields) with at most ``concurrency``
    in flight.

    Returns:
        One record per request (see :func:`stream_completion`, plus ``start_s``: when it was sent, in seconds
        since the point began) and the wall time of the whole point.
    """
    import httpx

    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def one(prompt: str) -> dict[str, Any]:
            body = {
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                **(extra or {}),
            }
            async with semaphore:
                # When the request leaves (its slot free), since the point began: places it on a timeline.
                sent = time.perf_counter() - start
                try:
                    record = await stream_completion(client, url, body)
                except httpx.HTTPError as exc:
                    record = {"error": f"{type(exc).__name__}: {exc}"}
                return {**record, "start_s": sent}

        start = time.perf_counter()
        records = await asyncio.gather(*(one(p) for p in prompts))
        return list(records), time.perf_counter() - start


def summarize(records: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Requests/s, output tokens/s, TTFT and latency p50/p99, per-request decode tokens/s of one point.

    A request's decode rate is its tokens after the first over its time after the first token.
    """
    ok = [r for r in records if "error" not in r and r.get("ttft_s") is not None]
    ttft = [r["ttft_s"] for r in ok]
    latency = [r["latency_s"] for r in ok]
    tokens = [r["completion_tokens"] for r in ok]
    decode = [
        (r["completion_tokens"] - 1) / (r["latency_s"] - r["ttft_s"])
        for r in ok
        if r["completion_tokens"] > 1 and r["latency_s"] > r["ttft_s"]
    ]
    errors = [r.get("error", "no token text in the stream") for r in records if r not in ok]
    return {
        "requests": len(records),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if ok else 0.0,
        "output_tokens_per_s": sum(tokens) / wall_s if ok else 0.0,
        "completion_tokens_mean": statistics.fmean(tokens) if tokens else 0.0,
        "stream_events_mean": statistics.fmean(r["events"] for r in ok) if ok else 0.0,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "latency_p50_s": pct(latency, 50),
        "latency_p99_s": pct(latency, 99),
        "decode_tokens_per_s_p50": pct(decode, 50),
        "decode_tokens_per_s_mean": statistics.fmean(decode) if decode else None,
    }


TIMELINE_WINDOWS_S = (2.0, 5.0, 10.0, 20.0, 30.0, 60.0)


def timeline_window_s(wall_s: float, most: int = 30) -> float:
    """The window for a point's timeline: the shortest of 2, 5, 10, 20, 30 or 60 s giving at most ``most``
    windows, so that a minutes-long point still has several requests per window."""
    return next((w for w in TIMELINE_WINDOWS_S if wall_s / w <= most), TIMELINE_WINDOWS_S[-1])


def timeline(records: list[dict[str, Any]], wall_s: float, window_s: float | None = None) -> dict[str, Any]:
    """TTFT, latency and output tokens/s of one load point in consecutive windows of ``window_s`` seconds.

    A point's p50 and p99 hide how they came about: a queue that builds up, a replica that stalls for a
    few seconds, a slow start. Each figure is counted when it is observed, as a Prometheus histogram would
    count it: a TTFT in the window of the request's first token, a latency in the window where the request
    ended. Output tokens are spread over each request's stream: the first at its first token, the others
    evenly until its end (the client sees only those two instants). Failed requests are counted at the time
    they were sent.

    Args:
        records: :func:`load_point`'s records (``start_s``, ``ttft_s``, ``latency_s``, ``completion_tokens``,
            or ``error``).
        wall_s: The point's wall time; the last window ends there (and may be shorter than the others).
        window_s: Window length; :func:`timeline_window_s` of ``wall_s`` when None.

    Returns:
        ``window_s`` and ``windows``: per window its ``start_s`` and ``end_s`` (since the point began),
        ``first_tokens`` and ``completed`` (sample counts), ``errors``, ``ttft_p50_s``, ``ttft_p99_s``,
        ``latency_p50_s``, ``latency_p99_s`` (None without samples) and ``output_tokens_per_s``.
    """
    window_s = window_s or timeline_window_s(wall_s)
    count = max(1, math.ceil(wall_s / window_s - 1e-9))
    edges = [(i * window_s, min((i + 1) * window_s, wall_s) if i == count - 1 else (i + 1) * window_s)
             for i in range(count)]  # fmt: skip

    def index(t: float) -> int:
        return min(count - 1, max(0, int(t // window_s)))

    ttft: list[list[float]] = [[] for _ in edges]
    latency: list[list[float]] = [[] for _ in edges]
    tokens, errors = [0.0] * count, [0] * count
    for r in records:
        if "start_s" not in r:
            continue
        if "error" in r or r.get("ttft_s") is None:
            errors[index(r["start_s"])] += 1
            continue
        first, end = r["start_s"] + r["ttft_s"], r["start_s"] + r["latency_s"]
        ttft[index(first)].append(r["ttft_s"])
        latency[index(end)].append(r["latency_s"])
        n = r.get("completion_tokens") or 0
        if n >= 1:
            tokens[index(first)] += 1
        rest = n - 1
        if rest > 0 and end <= first:
            tokens[index(end)] += rest
        elif rest > 0:
            for i, (lo, hi) in enumerate(edges):
                overlap = min(hi if i < count - 1 else math.inf, end) - max(lo if i else -math.inf, first)
                if overlap > 0:
                    tokens[i] += rest * overlap / (end - first)
    windows = []
    for i, (lo, hi) in enumerate(edges):
        windows.append(
            {
                "start_s": lo,
                "end_s": hi,
                "first_tokens": len(ttft[i]),
                "completed": len(latency[i]),
                "errors": errors[i],
                "ttft_p50_s": pct(ttft[i], 50),
                "ttft_p99_s": pct(ttft[i], 99),
                "latency_p50_s": pct(latency[i], 50),
                "latency_p99_s": pct(latency[i], 99),
                "output_tokens_per_s": tokens[i] / (hi - lo) if hi > lo else 0.0,
            }
        )
    return {"window_s": window_s, "windows": windows}


# ------------------------------------------------------------------------------------- server helpers


def warm_up(url: str, prompt: str, max_tokens: int, repeats: int = 3) -> None:
    """Send unmeasured requests once the route answers (the first decode steps pay lazy initialisation).

    Raises:
        BenchmarkRequestError: The route still fails after 60 s.
    """
    import httpx

    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    deadline = time.monotonic() + 60
    while True:  # the proxy may learn the new routes a moment after serve.run returns
        try:
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        except httpx.HTTPError as exc:
            r, detail = None, f"{type(exc).__name__}: {exc}"
        if r is not None and r.status_code == 200:
            break
        if r is not None:
            detail = f"HTTP {r.status_code}: {r.text[:300]}"
        if time.monotonic() > deadline:
            raise BenchmarkRequestError(f"warm-up request to {url}/v1/completions failed: {detail}")
        time.sleep(1.0)
    for _ in range(repeats - 1):
        httpx.post(f"{url}/v1/completions", json=body, timeout=300).raise_for_status()


def server_stats(url: str) -> dict[str, Any]:
    """``GET /api/v1/stats``: the replica's engine settings and cumulative batch and cache counters."""
    import httpx

    r = httpx.get(f"{url}/api/v1/stats", timeout=30)
    r.raise_for_status()
    return r.json()


def batch_mean(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """Mean rows per engine step between two :func:`server_stats` snapshots (None if no step ran)."""
    b, a = before["batch_size"], after["batch_size"]
    if a["steps"] <= b["steps"]:
        return None
    return (a["mean"] * a["steps"] - b["mean"] * b["steps"]) / (a["steps"] - b["steps"])


# --------------------------------------------------------------------------------------------- sessions


async def seed_generate(
    client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, session_id: str, stream: bool
) -> dict[str, Any]:
    """One seed-API request in a session; streamed, TTFT is the first non-empty body chunk.

    Returns:
        ``ttft_s`` (the latency when not streamed), ``latency_s``, ``prompt_tokens``, ``cached_tokens``
        and, when not streamed, the reply's ``text``.

    Raises:
        BenchmarkRequestError: The server answered an error status.
    """
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "ignore_eos": True,
    }
    start, ttft, chunks = time.perf_counter(), None, []
    headers = {"X-Session-ID": session_id}
    async with client.stream("POST", f"{url}/api/v1/model/generate", json=body, headers=headers) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise BenchmarkRequestError(
                f"POST {url}/api/v1/model/generate answered HTTP {response.status_code}: {text[:300]}"
            )
        async for chunk in response.aiter_bytes():
            if chunk and ttft is None:
                ttft = time.perf_counter() - start
            chunks.append(chunk)
        latency = time.perf_counter() - start
        record: dict[str, Any] = {
            "ttft_s": ttft if stream else latency,
            "latency_s": latency,
            "prompt_tokens": int(response.headers["X-Prompt-Tokens"]),
            "cached_tokens": int(response.headers["X-Cached-Tokens"]),
        }
    if not stream:
        record["text"] = json.loads(b"".join(chunks))["text"]
    return record


async def session_turns(
    url: str, histories: list[str], followups: list[str], max_tokens: int
) -> list[dict[str, Any]]:
    """Two turns per session: the history (whole), then history + reply + follow-up (streamed).

    The first session is a warm-up of the seed route (``warmup: True``), not to be counted.
    """
    import httpx

    turns = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(TIMEOUT_S, connect=CONNECT_TIMEOUT_S)) as client:
        for i, (history, followup) in enumerate(zip(histories, followups, strict=True)):
            sid = f"bench-{uuid.uuid4().hex[:12]}"
            first = await seed_generate(client, url, history, max_tokens, sid, stream=False)
            prompt = history + first["text"] + followup
            second = await seed_generate(client, url, prompt, max_tokens, sid, stream=True)
            turns.append({"warmup": i == 0, "turn1": first, "turn2": second})
    return turns


def summarize_sessions(turns: list[dict[str, Any]]) -> dict[str, Any]:
    """Follow-up TTFT p50 (and every value), latencies, and turn 2's prompt and cached token counts."""
    measured = [t for t in turns if not t["warmup"]]
    turn2 = [t["turn2"] for t in measured]
    ttft = [t["ttft_s"] for t in turn2 if t["ttft_s"] is not None]
    return {
        "sessions": len(measured),
        "turn2_ttft_p50_s": pct(ttft, 50),
        "turn2_ttft_all_s": ttft,
        "turn2_latency_p50_s": pct([t["latency_s"] for t in turn2], 50),
        "turn1_latency_p50_s": pct([t["turn1"]["latency_s"] for t in measured], 50),
        "turn2_cached_tokens": min(t["cached_tokens"] for t in turn2) if turn2 else None,
        "turn2_prompt_tokens": max(t["prompt_tokens"] for t in turn2) if turn2 else None,
    }


# ------------------------------------------------------------------------------------------ deployments


def _measure_sessions(result: dict[str, Any], plan: Plan, url: str, tokenizer) -> None:
    n = plan.session_repeats + 1  # the first session warms the seed route up, unmeasured
    histories = prompts_of_length(tokenizer, plan.session_history, n)
    followups = prompts_of_length(tokenizer, plan.session_followup, n, salt=7)
    load_before = os.getloadavg()[0]
    turns = asyncio.run(session_turns(url, histories, followups, plan.session_output))
    result["session"] = {**summarize_sessions(turns), "loadavg_1m": [load_before, os.getloadavg()[0]]}
    result["turns"] = turns


def run_case(
    case: dict[str, Any], plan: Plan, url: str, tokenizer, log, bandwidth_probe=None
) -> dict[str, Any]:
    """Deploy one configuration, measure its load points (or its sessions), delete it.

    ``bandwidth_probe()`` (a bandwidth measurement) runs right before and after the point at concurrency
    ``case["bandwidth_at"]``: this shared machine's speed drifts by up to a third over minutes, so the
    decode-vs-ceiling figure compares measurements taken together.
    """
    from ray import serve

    from serve_apps.llm import app

    result: dict[str, Any] = {**case, "points": []}
    t0 = time.perf_counter()
    try:
        serve.run(app({"overrides": case["overrides"]}), name=APP_NAME, route_prefix="/")
        result["deploy_s"] = time.perf_counter() - t0
        warm_up(url, prompts_of_length(tokenizer, plan.prompt_tokens, 1, salt=99)[0], plan.output_tokens)
        if case["kind"] == "session":
            _measure_sessions(result, plan, url, tokenizer)
            return result
        for i, concurrency in enumerate(case["concurrency"]):
            prompts = prompts_of_length(
                tokenizer, plan.prompt_tokens, plan.requests(case["preset"], concurrency), i
            )
            probe = bandwidth_probe if bandwidth_probe and case.get("bandwidth_at") == concurrency else None
            adjacent = [probe()] if probe else []
            before, load_before = server_stats(url), os.getloadavg()[0]
            records, wall = asyncio.run(load_point(url, prompts, plan.output_tokens, concurrency))
            point = {"concurrency": concurrency, **summarize(records, wall)}
            point["timeline"] = timeline(records, wall)
            if probe:
                point["bandwidth_adjacent"] = [*adjacent, probe()]
            point["server_stats"] = after = server_stats(url)
            point["batch_size_mean"] = batch_mean(before, after)
            # Other processes on the machine skew every figure: the 1-minute load, before and after.
            point["loadavg_1m"] = [load_before, os.getloadavg()[0]]
            result["points"].append(point)
            log(
                f"  c={concurrency}: {point['requests_per_s']:.2f} req/s, "
                f"{point['output_tokens_per_s']:.0f} tok/s, TTFT p50 {fmt_ms(point['ttft_p50_s'])}, "
                f"latency p50 {fmt_s(point['latency_p50_s'])}, "
                f"{point['stream_events_mean']:.1f} stream events/request"
                + (f", [red]{point['errors']} errors: {point['first_error']}[/]" if point["errors"] else "")
            )
        return result
    finally:
        serve.delete(APP_NAME)


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.0f} ms"


def fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"
