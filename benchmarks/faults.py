"""``python -m jobs.benchmark faults``: a model replica SIGKILLed under load, and the ingress under overload.

    python -m jobs.benchmark faults                                  # both scenarios (~3 min on 2 cores)
    python -m jobs.benchmark faults --scenario kill --duration 60    # the replica fault only
    python -m jobs.benchmark faults --scenario overload              # the burst only

``kill``: two ``LLMServer`` replicas (tiny preset, fp32 on CPU, ``--replica-cpus`` each) behind the ingress,
driven on loopback by ``--concurrency`` closed-loop clients for ``--duration`` seconds; at ``--kill-at`` of
the run one replica's process is SIGKILLed (the one caching most of the conversations; its pid from Serve's
controller, checked against the process table). The clients mix non-streamed and streamed
``/v1/completions`` (greedy, ``ignore_eos``) with ``--session-workers`` multi-turn conversations on the seed
API (``X-Session-ID``, the whole conversation re-sent each turn). The conversations pause between turns
around the kill (users reading a reply), so those whose cache died with the replica continue on another one
with a full prefill (``X-Cached-Tokens: 0``); the other clients are mid-request, many mid-stream. Every
request has a client timeout, so a hung connection is a counted failure, never a stall.

Counted per request: completed, or failed by status (an HTTP error status; ``200 (error event)`` for a
stream that reported an error in-band; ``200 (truncated)`` for a stream that ended without ``[DONE]``; ``no
response`` for a timeout or a dropped connection). A failure is *explicit* when it is a 503 with
``Retry-After``, a 5xx with an OpenAI-style ``{"error": {...}}`` body or an in-band error event (the seed
API's plain-text stream: its ``[llmopt error]`` line). After the load every completed greedy output is
checked against the same prompt sent again without a session (follow-ups included, whether their cache was
hit or lost). The replacement is timed from the kill to (a) Serve's controller no longer reporting the
killed replica RUNNING, (b) it reporting two RUNNING replicas again, one of them new, and (c) the first
``GET /api/v1/stats`` answered by the new replica's process (its ``replica`` field is the pid); both are
polled every ``MONITOR_INTERVAL_S`` from threads of their own (the stats client has a timeout too). The
longest stretch without a completed request after the kill is reported as well.

``overload``: one replica with ``serving.max_ongoing_requests=--max-ongoing`` and
``serving.max_queued_requests=--max-queued`` gets ``--burst-factor`` times the queue bound of concurrent
requests at once (streamed and not, ``ignore_eos``); counted by status, each 503 checked for ``Retry-After``
and its error body. When every burst response is back, one more request is sent: its status and latency are
the recovery figure (target: 200 within a second).

Acceptance (the run fails after writing its files otherwise): kill: failed requests at most 1% of those
sent, every failure explicit, every completed output correct, the replica replaced; overload: only 200 and
503 answers, every 503 with ``Retry-After``, at least one of each, and the post-burst request answered 200.
Writes faults.json and faults.png under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._load import TINY, prompts_of_length, warm_up
from benchmarks.serve import _free_port, _start_ray

KILL_APP, KILL_PREFIX = "llm-faults", "/faults"
OVERLOAD_APP, OVERLOAD_PREFIX = "llm-overload", "/overload"
SERVER_DEPLOYMENT = "LLMServer"
MONITOR_INTERVAL_S = 0.1
MAX_TURNS = 6  # turns per conversation before a session worker starts a new one
FAILURE_BUDGET = 0.01  # failed requests / requests sent, at most
RECOVERY_TARGET_S = 1.0  # overload: the first request after the burst answered within this
REPLACEMENT_DEADLINE_S = 180.0
REFERENCE_BATCH = 16
ERROR_MARK = "[llmopt error]"  # the seed API's plain-text streams end with this line on a failure


def add_faults_parser(sub) -> None:
    """Register the `faults` subcommand on the benchmark's subparsers."""
    parser = sub.add_parser("faults", help="A replica SIGKILLed under load; a burst past the queue bound.")
    parser.add_argument("--scenario", choices=("kill", "overload", "all"), default="all")
    parser.add_argument("--duration", type=float, default=60.0, help="Seconds of load in the kill scenario.")
    parser.add_argument(
        "--kill-at", type=float, default=0.5, help="When the replica is killed, as a fraction of --duration."
    )
    parser.add_argument("--concurrency", type=int, default=16, help="Clients (requests in flight).")
    parser.add_argument(
        "--session-workers", type=int, default=8, help="Of the clients, those holding multi-turn sessions."
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="Output tokens per request.")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="Tokens of a prompt or first turn.")
    parser.add_argument(
        "--replica-cpus", type=float, default=0.5, help="CPUs of each replica (two must fit beside the rest)."
    )
    parser.add_argument("--max-queued", type=int, default=8, help="overload: serving.max_queued_requests.")
    parser.add_argument("--max-ongoing", type=int, default=2, help="overload: serving.max_ongoing_requests.")
    parser.add_argument("--burst-factor", type=int, default=10, help="overload: burst = this x --max-queued.")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="Client timeout per request, s (a hung request fails)."
    )
    parser.add_argument("--out", default="outputs/benchmark", help="Output directory.")


# ------------------------------------------------------------------------------------------------ runner


def run_faults(args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console

    from llmopt.models import build_preset, load_tokenizer

    console = Console()
    build_preset(TINY)
    tokenizer = load_tokenizer(TINY)
    report: dict[str, Any] = {
        "benchmark": "faults",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count()},
        "settings": vars(args),
    }
    started = _start_ray()
    try:
        base, started_serve = _start_serve()
        try:
            if args.scenario in ("kill", "all"):
                report["kill"] = _run_kill(args, base + KILL_PREFIX, tokenizer, console)
            if args.scenario in ("overload", "all"):
                report["overload"] = _run_overload(args, base + OVERLOAD_PREFIX, tokenizer, console)
        finally:
            from ray import serve

            if started_serve:
                serve.shutdown()
    finally:
        if started:
            import ray

            ray.shutdown()
    report["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    report["problems"] = problems = _problems(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps(report, indent=2))
    _plot(report, out / "faults.png")
    _print_table(report, console)
    console.print(f"wrote {out / 'faults.json'} and {out / 'faults.png'}", highlight=False)
    if problems:
        raise SystemExit("faults benchmark failed its acceptance:\n- " + "\n- ".join(problems))
    return report


def _start_serve() -> tuple[str, bool]:
    """Start Serve on a free loopback port, or use the running instance; (base URL, started here)."""
    from ray import serve

    if serve.status().proxies:  # a test session's (or a cluster's) Serve: its proxy's port
        from ray.serve.context import _get_global_client

        return f"http://127.0.0.1:{_get_global_client().http_config.port}", False
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}", True


def _deploy(name: str, prefix: str, overrides: list[str]) -> None:
    from ray import serve

    from serve_apps.llm import app

    serve.run(app({"overrides": overrides}), name=name, route_prefix=prefix)


def _common_overrides(args: argparse.Namespace, max_seq_len: int) -> list[str]:
    return [
        f"model.name_or_path={TINY}",
        f"model.max_seq_len={max_seq_len}",
        "serving.precision=fp32",
        "serving.batching.mode=continuous",
        f"resources.cpus_per_worker={args.replica_cpus}",
    ]


# ------------------------------------------------------------------------------------------ the replicas


def replica_states(app_name: str) -> dict[str, dict[str, Any]]:
    """The app's ``LLMServer`` replicas as Serve's controller knows them: id -> state, pid, actor name.

    From the controller of this Ray cluster, so a pid named here is never another cluster's process.
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**_get_global_client().get_serve_details())
    app_details = details.applications.get(app_name)
    if app_details is None or SERVER_DEPLOYMENT not in app_details.deployments:
        return {}
    return {
        r.replica_id: {"state": getattr(r.state, "value", str(r.state)), "pid": r.pid, "actor": r.actor_name}
        for r in app_details.deployments[SERVER_DEPLOYMENT].replicas
    }


def running_replicas(app_name: str) -> dict[str, int]:
    """The app's RUNNING ``LLMServer`` replicas: replica id -> pid."""
    return {rid: r["pid"] for rid, r in replica_states(app_name).items() if r["state"] == "RUNNING"}


def sessions_held(actor_name: str, session_ids: set[str]) -> set[str] | None:
    """Which of ``session_ids`` have a KV cache on this replica, read from the replica actor's ``LLMServer``
    (Serve internals, so None when that fails): the kill takes the replica holding most live conversations,
    since Serve places sessions in bursts (a replica with fewer multiplexed ids gets every new one until its
    count is reported), and a replica chosen blindly often holds none of them."""
    import ray

    def held(actor, ids):
        server = actor._replica_impl._user_callable_wrapper.user_callable
        return {sid for _, sid in list(server.sessions._entries)} & ids

    try:
        actor = ray.get_actor(actor_name, namespace="serve")
        return ray.get(actor.__ray_call__.remote(held, session_ids), timeout=30)
    except Exception:  # another Ray version's internals: the caller picks a replica without knowing
        return None


def sigkill(pid: int) -> None:
    """SIGKILL a replica's process, after checking that the pid is a Serve replica (pids get reused)."""
    import psutil

    cmdline = " ".join(psutil.Process(pid).cmdline())
    if "ServeReplica" not in cmdline:
        raise RuntimeError(f"pid {pid} is not a Serve replica ({cmdline[:120]!r}); not killing it")
    os.kill(pid, signal.SIGKILL)


class _Monitor:
    """Two threads sampling every ``MONITOR_INTERVAL_S``: Serve's replica states (``states``: seconds since
    ``t0`` and replica id -> state) and which replica process answers ``GET /api/v1/stats`` (``stats``:
    seconds and the pid, None when the request failed). Separate threads, so that a slow controller does not
    delay the stats samples."""

    def __init__(self, url: str, app_name: str, t0: float, timeout_s: float) -> None:
        self.url, self.app_name, self.t0, self.timeout_s = url, app_name, t0, timeout_s
        self.states: list[dict[str, Any]] = []
        self.stats: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._poll_states, name="faults-states", daemon=True),
            threading.Thread(target=self._poll_stats, name="faults-stats", daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=self.timeout_s + 5)

    def _poll_states(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic() - self.t0
            try:
                states = {rid: r["state"] for rid, r in replica_states(self.app_name).items()}
                self.states.append({"t": t, "replicas": states})
            except Exception as exc:  # the controller did not answer: a gap in the samples
                self.states.append({"t": t, "error": repr(exc)})
            self.stop.wait(MONITOR_INTERVAL_S)

    def _poll_stats(self) -> None:
        import httpx

        with httpx.Client(timeout=self.timeout_s) as client:
            while not self.stop.is_set():
                t = time.monotonic() - self.t0
                try:
                    r = client.get(f"{self.url}/api/v1/stats")
                    pid = int(r.json()["replica"]) if r.status_code == 200 else None
                    self.stats.append({"t": t, "pid": pid, "status": r.status_code})
                except Exception as exc:  # no answer (counted as such)
                    self.stats.append({"t": t, "pid": None, "error": repr(exc)})
                self.stop.wait(MONITOR_INTERVAL_S)


class _Pause:
    """Session clients pause between turns around the kill, as users reading a reply do, so that every live
    conversation is between turns when its replica dies: the next turn of each one that was on the killed
    replica finds no cache (a full prefill elsewhere). The kill waits until all are paused (or a timeout)."""

    def __init__(self, workers: int) -> None:
        self.workers, self.paused, self.requested = workers, 0, False
        self.all_paused, self.resume = asyncio.Event(), asyncio.Event()
        self.live: dict[int, str] = {}  # worker -> its conversation's session id

    async def point(self) -> None:
        """Where a session client may pause: before each turn."""
        if not self.requested or self.resume.is_set():
            return
        self.paused += 1
        if self.paused >= self.workers:
            self.all_paused.set()
        await self.resume.wait()


# ---------------------------------------------------------------------------------------------- requests


def _outcome_of_error(status: int, headers, text: str) -> dict[str, Any]:
    """A non-200 answer: explicit when a 503 carries Retry-After or a 5xx an OpenAI-style error body."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    has_body = isinstance(body, dict) and isinstance(body.get("error"), dict)
    retry_after = headers.get("retry-after")
    explicit = (status == 503 and retry_after is not None) or (status >= 500 and has_body)
    return {
        "status": status,
        "outcome": "http_error",
        "explicit": explicit,
        "retry_after": retry_after,
        "error_code": body["error"].get("code") if has_body else None,
        "detail": text[:300],
    }


def _greedy_body(prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    """A request body both APIs take: greedy, exactly ``max_tokens`` tokens, so outputs can be compared."""
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


async def _completion(client, url: str, prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    """One greedy ``/v1/completions`` request, whole or streamed; the stream must end with ``[DONE]``."""
    body = _greedy_body(prompt, max_tokens, stream)
    record: dict[str, Any] = {"api": "openai", "prompt": prompt}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            return record | _outcome_of_error(response.status_code, response.headers, text)
        record["status"] = 200
        if not stream:
            record["text"] = json.loads(await response.aread())["choices"][0]["text"]
            return record | {"outcome": "ok"}
        parts, done, error = [], False, None
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if isinstance(event.get("error"), dict):
                error = event["error"]
            elif event.get("choices"):
                parts.append(event["choices"][0].get("text") or "")
    if error is not None:  # reported in-band (headers were out): explicit, with [DONE] after it or not
        return record | {
            "outcome": "stream_error",
            "explicit": done,
            "error_code": error.get("code"),
            "detail": error.get("message", "")[:300],
        }
    if not done:
        return record | {"outcome": "truncated", "explicit": False, "detail": "no [DONE] and no error event"}
    return record | {"outcome": "ok", "text": "".join(parts)}


async def _seed_generate(
    client, url: str, prompt: str, max_tokens: int, stream: bool, session_id: str | None
) -> dict[str, Any]:
    """One greedy seed-API request (chunked text or JSON), in a session when ``session_id`` is given."""
    body = _greedy_body(prompt, max_tokens, stream)
    headers = {"X-Session-ID": session_id} if session_id else {}
    record: dict[str, Any] = {"api": "seed", "prompt": prompt}
    async with client.stream("POST", f"{url}/api/v1/model/generate", json=body, headers=headers) as response:
        raw = (await response.aread()).decode(errors="replace")
        if response.status_code != 200:
            return record | _outcome_of_error(response.status_code, response.headers, raw)
        record["status"] = 200
        record["cached_tokens"] = int(response.headers.get("x-cached-tokens", -1))
    text = json.loads(raw)["text"] if not stream else raw
    if stream and ERROR_MARK in text:
        detail = text[text.index(ERROR_MARK) :].strip()
        return record | {"outcome": "stream_error", "explicit": True, "detail": detail[:300]}
    return record | {"outcome": "ok", "text": text}


async def _timed(call, t0: float, **fields) -> dict[str, Any]:
    """Run one request coroutine; timeouts and dropped connections become records too."""
    import httpx

    start = time.monotonic()
    try:
        record = await call
    except httpx.TimeoutException as exc:
        record = {"outcome": "timeout", "explicit": False, "detail": f"{type(exc).__name__}: {exc}"}
    except httpx.HTTPError as exc:
        record = {"outcome": "transport", "explicit": False, "detail": f"{type(exc).__name__}: {exc}"}
    return {**fields, **record, "start": start - t0, "end": time.monotonic() - t0}


def _client(concurrency: int, timeout_s: float):
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)), limits=limits)


# -------------------------------------------------------------------------------------- kill scenario


def _run_kill(args: argparse.Namespace, url: str, tokenizer, console) -> dict[str, Any]:
    from ray import serve

    followup_tokens = max(4, args.prompt_tokens // 2)
    max_seq_len = args.prompt_tokens + MAX_TURNS * (args.max_tokens + followup_tokens + 8) + 64
    overrides = [
        *_common_overrides(args, max_seq_len),
        "serving.autoscaling.min_replicas=2",
        "serving.autoscaling.max_replicas=2",
        f"serving.batching.max_batch_size={args.concurrency}",
        f"serving.max_ongoing_requests={2 * args.concurrency}",
    ]
    pools = {
        "prompts": prompts_of_length(tokenizer, args.prompt_tokens, 24, salt=1),
        "histories": prompts_of_length(tokenizer, args.prompt_tokens, 12, salt=2),
        "followups": prompts_of_length(tokenizer, followup_tokens, 12, salt=3),
    }
    console.print(f"[bold]kill[/]: deploying two replicas at {url}", highlight=False)
    t_deploy = time.monotonic()
    _deploy(KILL_APP, KILL_PREFIX, overrides)
    monitor = None
    try:
        warm_up(url, pools["prompts"][0], args.max_tokens)
        before = running_replicas(KILL_APP)
        if len(before) != 2:
            raise RuntimeError(f"expected two running LLMServer replicas, found {before}")
        deploy_s = time.monotonic() - t_deploy
        t0 = time.monotonic()
        monitor = _Monitor(url, KILL_APP, t0, timeout_s=min(10.0, args.timeout))
        monitor.start()
        actors = {rid: r["actor"] for rid, r in replica_states(KILL_APP).items() if rid in before}
        killed: dict[str, Any] = {}
        records = asyncio.run(_kill_load(url, args, pools, t0, (before, actors, killed), console))
        console.print(
            f"  load done: {len(records)} requests in {time.monotonic() - t0:.1f} s", highlight=False
        )
        replacement = _wait_for_replacement(monitor, before, killed)
        monitor.join()
        references = asyncio.run(_references(url, records, args))
        after = running_replicas(KILL_APP)
    finally:
        if monitor is not None:
            monitor.join()
        serve.delete(KILL_APP)
    summary = _kill_summary(records, references, killed, replacement)
    summary.update(
        deploy_s=deploy_s,
        replicas_before=before,
        replicas_after=after,
        monitor_interval_s=MONITOR_INTERVAL_S,
        monitor={"states": monitor.states, "stats": monitor.stats},
    )
    return summary


async def _kill_load(
    url: str,
    args: argparse.Namespace,
    pools: dict[str, list[str]],
    t0: float,
    replicas: tuple[dict[str, int], dict[str, str], dict[str, Any]],
    console,
) -> list[dict[str, Any]]:
    """``--concurrency`` closed-loop clients until ``--duration``, and the kill at ``--kill-at``.

    Session clients hold conversations of up to ``MAX_TURNS`` turns (a failed turn is sent again, after its
    Retry-After) and pause around the kill (:class:`_Pause`); the others alternate whole and streamed
    requests, so some are mid-stream when the replica dies. ``replicas``: the replicas' pids and actor names
    by replica id, and the dict the kill is recorded in (replica, pid, time, conversations on it).
    """
    before, actors, killed = replicas
    records: list[dict[str, Any]] = []
    deadline = t0 + args.duration
    session_workers = min(args.session_workers, args.concurrency)
    pause = _Pause(session_workers)

    async def killer() -> None:
        await asyncio.sleep(args.duration * args.kill_at)
        pause.requested = True
        if session_workers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pause.all_paused.wait(), args.timeout)
        live = set(pause.live.values())
        held = {rid: await asyncio.to_thread(sessions_held, actors[rid], live) for rid in sorted(before)}
        victim = max(sorted(before), key=lambda rid: len(held[rid] or ()))
        sigkill(before[victim])
        killed.update(replica=victim, pid=before[victim], t=time.monotonic() - t0)
        killed["sessions_paused"] = pause.paused
        killed["sessions_on_victim"] = None if held[victim] is None else len(held[victim])
        pause.resume.set()
        console.print(
            f"  t={killed['t']:.1f} s: SIGKILL pid {killed['pid']} (replica {victim}), {pause.paused} "
            f"conversations between turns, {killed['sessions_on_victim']} of them cached there",
            highlight=False,
        )

    async with _client(args.concurrency, args.timeout) as client:

        async def completions(w: int) -> None:
            k = 0
            while time.monotonic() < deadline:
                prompt = pools["prompts"][(w * 7 + k) % len(pools["prompts"])]
                stream = (w + k) % 2 == 1
                call = _completion(client, url, prompt, args.max_tokens, stream)
                records.append(await _timed(call, t0, kind="stream" if stream else "complete", worker=w))
                k += 1

        async def sessions(w: int) -> None:
            conversation, turn, n = None, 0, 0
            while time.monotonic() < deadline:
                # Conversations of 4 to MAX_TURNS turns: the clients' new sessions do not all start at once.
                if conversation is None or turn >= MAX_TURNS - w % 3:
                    conversation, turn, n = pools["histories"][(w + n) % len(pools["histories"])], 0, n + 1
                    session_id = pause.live[w] = f"faults-{w}-{n}"
                await pause.point()
                stream = turn % 2 == 1  # first turns whole, follow-ups alternately streamed
                call = _seed_generate(client, url, conversation, args.max_tokens, stream, session_id)
                record = await _timed(call, t0, kind="session", worker=w, session=session_id, turn=turn)
                records.append(record)
                if record["outcome"] != "ok":  # as a client would: the same turn again, after Retry-After
                    await asyncio.sleep(min(float(record.get("retry_after") or 0.5), 2.0))
                    continue
                followup = pools["followups"][(w * 5 + n + turn) % len(pools["followups"])]
                conversation = conversation + record["text"] + followup
                turn += 1

        workers = [sessions(w) for w in range(session_workers)]
        workers += [completions(w) for w in range(session_workers, args.concurrency)]
        kill_task = asyncio.create_task(killer())
        await asyncio.gather(*workers)
        await kill_task
    return sorted(records, key=lambda r: r["start"])


def _wait_for_replacement(
    monitor: _Monitor, before: dict[str, int], killed: dict[str, Any]
) -> dict[str, Any]:
    """Wait (while the monitor samples) until the new replica is RUNNING and has answered a stats request."""
    deadline = time.monotonic() + REPLACEMENT_DEADLINE_S
    while time.monotonic() < deadline:
        found = _replacement_times(monitor, before, killed)
        if found["running_s"] is not None and found["serving_s"] is not None:
            return found
        time.sleep(0.5)
    return _replacement_times(monitor, before, killed)


def _replacement_times(monitor: _Monitor, before: dict[str, int], killed: dict[str, Any]) -> dict[str, Any]:
    """Seconds from the kill until (a) Serve no longer reports the killed replica RUNNING (``detected_s``),
    (b) it reports two RUNNING replicas, one of them new (``running_s``), and (c) a stats request is answered
    by a process that was not a replica before the kill (``serving_s``)."""
    t_kill = killed["t"]
    detected = running = serving = None
    for s in list(monitor.states):
        if s["t"] < t_kill or "replicas" not in s:
            continue
        states = s["replicas"]
        if detected is None and states.get(killed["replica"]) != "RUNNING":
            detected = s["t"] - t_kill
        fresh = [rid for rid, state in states.items() if rid not in before and state == "RUNNING"]
        if running is None and fresh and sum(state == "RUNNING" for state in states.values()) == 2:
            running = s["t"] - t_kill
    for s in list(monitor.stats):
        if s["t"] >= t_kill and s["pid"] is not None and s["pid"] not in before.values():
            serving = s["t"] - t_kill
            break
    return {"detected_s": detected, "running_s": running, "serving_s": serving}


async def _references(url: str, records: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, str]:
    """The greedy output of every distinct prompt completed under load, sent again without a session (prompt
    -> text): follow-ups' references are their whole conversations recomputed. Through the seed API's
    batch-generate, ``REFERENCE_BATCH`` prompts a request (both APIs tokenize a prompt the same way)."""
    wanted = sorted({r["prompt"] for r in records if r["outcome"] == "ok"})
    semaphore = asyncio.Semaphore(4)
    out: dict[str, str] = {}
    async with _client(4, args.timeout) as client:

        async def batch(prompts: list[str]) -> None:
            body = {"prompts": prompts, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
            async with semaphore:
                r = await client.post(f"{url}/api/v1/model/batch-generate", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"reference request failed: HTTP {r.status_code}: {r.text[:300]}")
            out.update(zip(prompts, (x["text"] for x in r.json()["results"]), strict=True))

        chunks = [wanted[i : i + REFERENCE_BATCH] for i in range(0, len(wanted), REFERENCE_BATCH)]
        await asyncio.gather(*(batch(chunk) for chunk in chunks))
    return out


def _failure_key(record: dict[str, Any]) -> str:
    return {
        "http_error": str(record.get("status")),
        "stream_error": "200 (error event in the stream)",
        "truncated": "200 (truncated stream)",
        "timeout": "no response (client timeout)",
        "transport": "no response (connection error)",
    }[record["outcome"]]


def _kill_summary(records, references, killed, replacement) -> dict[str, Any]:
    t_kill = killed["t"]
    ok = [r for r in records if r["outcome"] == "ok"]
    failed = [r for r in records if r["outcome"] != "ok"]
    for r in ok:
        r["correct"] = references.get(r["prompt"]) == r["text"]
    wrong = [r for r in ok if not r["correct"]]
    followups = [r for r in records if r["kind"] == "session" and r["turn"] > 0]
    ok_followups = [r for r in followups if r["outcome"] == "ok"]
    # A follow-up whose cache was lost (its replica died, or it landed on the other one) prefills in full.
    misses_after = [r for r in ok_followups if r["cached_tokens"] == 0 and r["start"] >= t_kill]
    misses_before = [r for r in ok_followups if r["cached_tokens"] == 0 and r["start"] < t_kill]
    ends = sorted(r["end"] for r in ok)
    around = [b - a for a, b in itertools.pairwise(ends) if b >= t_kill]
    wall = max((r["end"] for r in records), default=0.0)
    per_second = collections.Counter(int(r["end"]) for r in ok)
    failed_per_second = collections.Counter(int(r["end"]) for r in failed)
    seconds = range(int(wall) + 1)
    return {
        "wall_s": wall,
        "kill_s": t_kill,
        "killed": killed,
        "sent": len(records),
        "completed": len(ok),
        "failed": len(failed),
        "failed_fraction": len(failed) / len(records) if records else 0.0,
        "failed_by_status": dict(collections.Counter(_failure_key(r) for r in failed)),
        "failed_not_explicit": sum(not r.get("explicit") for r in failed),
        "failures_first_s_after_kill": min((r["end"] - t_kill for r in failed), default=None),
        "failures_last_s_after_kill": max((r["end"] - t_kill for r in failed), default=None),
        "by_kind": {
            kind: {
                "sent": sum(r["kind"] == kind for r in records),
                "completed": sum(r["kind"] == kind for r in ok),
            }
            for kind in ("complete", "stream", "session")
        },
        "wrong_outputs": len(wrong),
        "followups": {
            "sent": len(followups),
            "completed": len(ok_followups),
            "cache_hits": sum(r["cached_tokens"] > 0 for r in ok_followups),
            "full_prefill_before_kill": len(misses_before),
            "full_prefill_after_kill": len(misses_after),
            "full_prefill_after_kill_correct": sum(r["correct"] for r in misses_after),
        },
        "replacement_detected_s": replacement["detected_s"],
        "replacement_running_s": replacement["running_s"],
        "replacement_serving_s": replacement["serving_s"],
        "longest_completion_gap_after_kill_s": max(around, default=None),
        "completed_per_second": [per_second.get(s, 0) for s in seconds],
        "failed_per_second": [failed_per_second.get(s, 0) for s in seconds],
        "failures": [
            {k: r.get(k) for k in ("kind", "turn", "start", "end", "status", "outcome", "explicit", "detail")}
            for r in failed
        ],
        "wrong": [
            {k: r.get(k) for k in ("kind", "turn", "prompt", "text", "cached_tokens")} for r in wrong[:5]
        ],
    }


# ---------------------------------------------------------------------------------- overload scenario


def _run_overload(args: argparse.Namespace, url: str, tokenizer, console) -> dict[str, Any]:
    from ray import serve

    burst = args.burst_factor * args.max_queued
    overrides = [
        *_common_overrides(args, 256),
        f"serving.batching.max_batch_size={args.max_ongoing}",
        f"serving.max_ongoing_requests={args.max_ongoing}",
        f"serving.max_queued_requests={args.max_queued}",
    ]
    prompts = prompts_of_length(tokenizer, args.prompt_tokens, burst + 1, salt=4)
    console.print(
        f"[bold]overload[/]: one replica, max_ongoing {args.max_ongoing}, max_queued {args.max_queued}; "
        f"burst of {burst}",
        highlight=False,
    )
    _deploy(OVERLOAD_APP, OVERLOAD_PREFIX, overrides)
    try:
        warm_up(url, prompts[0], args.max_tokens)
        burst_records, after = asyncio.run(_burst(url, prompts, burst, args))
    finally:
        serve.delete(OVERLOAD_APP)
    statuses = collections.Counter(str(r.get("status", r["outcome"])) for r in burst_records)
    rejected = [r for r in burst_records if r.get("status") == 503]
    other_5xx = [r for r in burst_records if (r.get("status") or 0) >= 500 and r.get("status") != 503]
    return {
        "burst": burst,
        "max_queued_requests": args.max_queued,
        "max_ongoing_requests": args.max_ongoing,
        "burst_wall_s": max(r["end"] for r in burst_records),
        "status_histogram": dict(sorted(statuses.items())),
        "rejected_with_retry_after": sum(r.get("retry_after") is not None for r in rejected),
        "rejected_error_codes": dict(collections.Counter(r.get("error_code") for r in rejected)),
        "other_5xx": len(other_5xx),
        "no_response": sum(r["outcome"] in ("timeout", "transport") for r in burst_records),
        "streams_not_ended": sum(r["outcome"] in ("truncated", "stream_error") for r in burst_records),
        "post_burst": after,
        "post_burst_within_target": after["status"] == 200 and after["latency_s"] <= RECOVERY_TARGET_S,
        "recovery_target_s": RECOVERY_TARGET_S,
        "records": [
            {k: r.get(k) for k in ("kind", "start", "end", "status", "outcome", "retry_after", "error_code")}
            for r in burst_records
        ],
    }


async def _burst(url: str, prompts: list[str], burst: int, args: argparse.Namespace):
    """Send ``burst`` requests at once (every other one streamed); when all are back, one more, timed."""
    async with _client(burst, args.timeout) as client:
        t0 = time.monotonic()
        calls = []
        for i in range(burst):
            stream = i % 2 == 1
            call = _completion(client, url, prompts[i + 1], args.max_tokens, stream)
            calls.append(_timed(call, t0, kind="stream" if stream else "complete"))
        records = await asyncio.gather(*calls)
        start = time.monotonic()
        after = await _timed(_completion(client, url, prompts[0], args.max_tokens, False), t0, kind="after")
        latency = time.monotonic() - start
    return list(records), {"status": after.get("status"), "outcome": after["outcome"], "latency_s": latency}


# ---------------------------------------------------------------------------------- checks and output


def _problems(report: dict[str, Any]) -> list[str]:
    """Every way the run missed its acceptance."""
    problems = []
    kill = report.get("kill")
    if kill:
        if kill["failed"] > FAILURE_BUDGET * kill["sent"]:
            problems.append(
                f"kill: {kill['failed']} of {kill['sent']} requests failed (budget {FAILURE_BUDGET:.0%}): "
                f"{kill['failed_by_status']}"
            )
        if kill["failed_not_explicit"]:
            problems.append(f"kill: {kill['failed_not_explicit']} failures were not explicit HTTP errors")
        if kill["wrong_outputs"]:
            problems.append(f"kill: {kill['wrong_outputs']} completed outputs differ from a fresh request's")
        if kill["replacement_running_s"] is None or kill["replacement_serving_s"] is None:
            problems.append("kill: the killed replica was not replaced (or never served) in time")
    over = report.get("overload")
    if over:
        codes = set(over["status_histogram"])
        if not codes <= {"200", "503"}:
            problems.append(f"overload: answers other than 200 and 503: {over['status_histogram']}")
        if "503" not in codes or "200" not in codes:
            problems.append(f"overload: the burst needs both 200s and 503s: {over['status_histogram']}")
        if over["rejected_with_retry_after"] != over["status_histogram"].get("503", 0):
            problems.append("overload: a 503 came without Retry-After")
        if over["streams_not_ended"]:
            problems.append(f"overload: {over['streams_not_ended']} streams failed or were cut")
        if over["post_burst"]["status"] != 200:
            problems.append(f"overload: the first request after the burst got {over['post_burst']}")
    return problems


def _print_table(report: dict[str, Any], console) -> None:
    from rich.table import Table

    table = Table(title="faults")
    table.add_column("figure")
    table.add_column("measured", justify="right")
    kill = report.get("kill")
    if kill:
        fu = kill["followups"]
        rows = [
            ("kill: requests sent / completed / failed",
             f"{kill['sent']} / {kill['completed']} / {kill['failed']}"),
            ("kill: failed share (budget 1%)", f"{kill['failed_fraction']:.2%}"),
            ("kill: failed by status", json.dumps(kill["failed_by_status"])),
            ("kill: failures not explicit / wrong outputs",
             f"{kill['failed_not_explicit']} / {kill['wrong_outputs']}"),
            ("kill: conversations between turns at the kill / cached on the killed replica",
             f"{kill['killed']['sessions_paused']} / {kill['killed']['sessions_on_victim']}"),
            ("kill: follow-ups sent / cache hits / full prefill after the kill (correct)",
             f"{fu['sent']} / {fu['cache_hits']} / {fu['full_prefill_after_kill']} "
             f"({fu['full_prefill_after_kill_correct']})"),
            ("kill: until Serve saw the replica gone", _fmt_s(kill["replacement_detected_s"])),
            ("kill: until two RUNNING replicas (one new)", _fmt_s(kill["replacement_running_s"])),
            ("kill: until the new replica served a request", _fmt_s(kill["replacement_serving_s"])),
            ("kill: longest gap between completions after the kill",
             _fmt_s(kill["longest_completion_gap_after_kill_s"])),
        ]  # fmt: skip
        for row in rows:
            table.add_row(*row)
    over = report.get("overload")
    if over:
        after = over["post_burst"]
        table.add_row(f"overload: burst of {over['burst']}, statuses", json.dumps(over["status_histogram"]))
        table.add_row("overload: 503s with Retry-After", str(over["rejected_with_retry_after"]))
        table.add_row(
            "overload: first request after the burst",
            f"{after['status']} in {1000 * after['latency_s']:.0f} ms",
        )
    console.print(table)
    for problem in report["problems"]:
        console.print(f"[red]{problem}[/]", highlight=False)


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    kill = report.get("kill")
    if kill:
        seconds = range(len(kill["completed_per_second"]))
        ax.bar(seconds, kill["completed_per_second"], width=0.9, color="tab:blue", label="completed")
        ax.bar(seconds, kill["failed_per_second"], width=0.9, bottom=kill["completed_per_second"],
               color="tab:red", label="failed")  # fmt: skip
        ax.axvline(kill["kill_s"], color="black", ls="--", label="SIGKILL of one replica")
        marks = [
            ("replacement_detected_s", "tab:gray", "-.", "Serve sees it gone"),
            ("replacement_serving_s", "tab:green", ":", "new replica serves"),
        ]
        for key, color, style, label in marks:
            if kill[key] is not None:
                ax.axvline(
                    kill["kill_s"] + kill[key], color=color, ls=style, label=f"{label} (+{kill[key]:.1f} s)"
                )
        per_second = zip(kill["completed_per_second"], kill["failed_per_second"], strict=True)
        top = max([c + f for c, f in per_second] + [1])
        ax.set_ylim(0, 1.45 * top)  # room for the legend above the bars
        ax.set_xlabel("seconds since the load started")
        ax.set_ylabel("requests finished per second")
        ax.set_title(
            f"replica killed under load: {kill['completed']} of {kill['sent']} completed, "
            f"{kill['failed']} failed"
        )
        ax.legend(fontsize=8, loc="upper center", ncol=3)
    else:
        ax.text(0.5, 0.5, "kill scenario not run", ha="center", transform=ax.transAxes)
    over = report.get("overload")
    if over:
        hist = over["status_histogram"]
        colors = ["tab:green" if k == "200" else "tab:orange" if k == "503" else "tab:red" for k in hist]
        bars = bx.bar(list(hist), list(hist.values()), color=colors)
        bx.bar_label(bars)
        after = over["post_burst"]
        bx.set_title(
            f"burst of {over['burst']} (max_queued {over['max_queued_requests']}): statuses\n"
            f"next request: {after['status']} in {1000 * after['latency_s']:.0f} ms"
        )
        bx.set_xlabel("HTTP status")
        bx.set_ylabel("requests")
    else:
        bx.text(0.5, 0.5, "overload scenario not run", ha="center", transform=bx.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
