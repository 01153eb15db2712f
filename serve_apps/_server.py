"""The model deployment: one continuous-batching engine per replica, fed through ``@serve.batch``.

Concurrently arriving requests are grouped by ``@serve.batch`` and handed to the engine together (so they
prefill together); one engine thread steps the engine back to back and hands every step's outputs to the
event loop, which routes each to its request's queue, so a request that finishes returns at once and a
request arriving mid-decode joins the running batch at the next step (iteration-level batching).
``serving.batching.mode`` selects ``continuous`` (that), ``static`` (a batch runs to completion before the
next is admitted) or ``none`` (one request at a time).

Sessions: a request with a session looks up its owner's cached KV prefix in this replica's
:class:`SessionCacheManager` and stores the grown cache back when it finishes. The ingress routes a session
to the same replica through Serve's multiplexed model id; a miss (another replica, eviction, expiry) falls
back to a full prefill with the same output.

Memory: a session cache under churn frees a KV entry (about 2 MiB at 500 tokens on the tiny preset) per
eviction while prefills of other sizes allocate. glibc's malloc serves both from its heap arenas (it raises
its mmap threshold after the first large free) and keeps the freed space resident, so the replica's RSS
rises by a few hundred MiB before it levels off while the bytes in use stay flat (no leak);
:class:`HeapTrimmer` hands that space back (``LLMOPT_MALLOC_TRIM_S``: the fewest seconds between two trims,
default 2; 0 turns trimming off).
"""

import asyncio
import contextlib
import ctypes
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Mapping
from queue import Empty, SimpleQueue
from typing import Any

import torch
from pydantic import ValidationError
from ray import serve

from llmopt.config import BatchingConfig, RunConfig
from llmopt.monitor import BatchSizeController
from llmopt.serve import (
    GenerationEngine,
    GenerationRequest,
    SessionCacheManager,
    TokenChunk,
    VllmEngine,
    copy_cache,
    expand_choices,
    merge_chunks,
    resolve_engine,
    stream_interval,
    vllm_setup_problems,
)
from serve_apps._metrics import ReplicaMetrics

logger = logging.getLogger("ray.serve")


class _Stream(asyncio.Queue):
    """One request's outputs (all its choices'), with `ended` set when its last output or an error is queued.

    A stream waiting out its interval wakes on `ended`, so a finished request's last chunk goes out at once:
    with 32 streams each waited up to 0.16 s (`stream_interval`) after its request had finished, which kept
    the client's next request, and the batch slot it would fill, waiting as long.
    """

    def __init__(self, choices: list[GenerationRequest]) -> None:
        super().__init__()
        self.ended = asyncio.Event()
        self.index = {choice.request_id: i for i, choice in enumerate(choices)}
        self.live = set(self.index)  # choices not finished yet


def _by_choice(items: list) -> list[tuple[str, list]]:
    """Outputs grouped by request id (choice), in order of first appearance."""
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(item.request_id, []).append(item)
    return list(groups.items())


async def _sleep_unless(event: asyncio.Event, delay_s: float) -> None:
    """Sleep `delay_s` seconds, or until `event` is set if that comes first."""
    if delay_s <= 0 or event.is_set():
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), delay_s)


USER_CONFIG_KEYS = ("max_batch_size", "batch_wait_timeout_s")


def batch_settings(user_config: Any, batching: BatchingConfig) -> tuple[int, float]:
    """The batch size and wait a replica's ``user_config`` asks for, checked by the run config's own rules.

    A key left out or ``null`` keeps the run config's value (for the wait: the batching mode's default).

    Args:
        user_config: ``LLMServer``'s ``user_config`` as Serve passes it (from a Serve config or a RayService).
        batching: The replica's run config ``serving.batching``.

    Returns:
        ``(max_batch_size, batch_wait_timeout_s)``.

    Raises:
        ValueError: Naming the deployment, the offending keys and values, and what is accepted.
    """
    accepted = (
        "accepted: max_batch_size (an integer) and batch_wait_timeout_s (seconds, or null for the batching "
        "mode's default), within the bounds of serving.batching"
    )
    if not isinstance(user_config, Mapping):
        raise ValueError(
            f"LLMServer user_config must be a mapping, got {type(user_config).__name__} {user_config!r}; "
            f"{accepted}"
        )
    unknown = sorted(set(user_config) - set(USER_CONFIG_KEYS), key=str)
    if unknown:
        raise ValueError(f"LLMServer user_config has unknown keys {unknown}; {accepted}")
    given = {key: value for key, value in user_config.items() if value is not None}
    # pydantic's lax mode takes true for 1: a boolean batch size is a mistake, not a size.
    problems = [f"{key}={value!r}: not a number" for key, value in given.items() if isinstance(value, bool)]
    if not problems:
        try:
            checked = BatchingConfig.model_validate({**batching.model_dump(), **given})
        except ValidationError as exc:
            problems = [
                f"{'.'.join(map(str, error['loc']))}={error.get('input')!r}: {error['msg']}"
                for error in exc.errors()
            ]
    if problems:
        raise ValueError(
            f"LLMServer user_config {dict(user_config)} is invalid: {'; '.join(problems)}; {accepted}"
        )
    return checked.max_batch_size, checked.wait_timeout_s


class _Mallinfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33 and later): every arena's figures, in bytes."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost",
        )
    ]  # fmt: skip


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc with ``malloc_trim`` (None elsewhere: macOS, musl)."""
    try:
        libc = ctypes.CDLL(None)  # the symbols this process already loaded: the C library's among them
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim"):
        return None
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.argtypes, libc.mallinfo2.restype = [], _Mallinfo2
    return libc


class HeapTrimmer:
    """Returns the free space of glibc's heap arenas to the OS while the session cache evicts.

    Measured with ``python -m jobs.benchmark churn`` (10,000 sessions of 500 tokens through a 16 MiB budget,
    2 cores): without trims, malloc's bytes in use went from 200 to 221 MiB while the free space it kept
    grew from 16 to 287 MiB, and the replica's RSS from 557 MiB to a plateau of ~850 MiB (reached after
    ~3,500 sessions); with a trim at most every 2 s (292 trims) the RSS stayed at 650-800 MiB (719 MiB at
    the end). A trim took 11 ms on average, 28 ms at most. A fixed mmap threshold (each large tensor its own
    mapping) also held the RSS down but cost 29% of the sessions/s in page faults. The trim runs on a thread
    of its own (ctypes drops the GIL; glibc locks one arena at a time), only after the cache evicted or
    expired entries since the last one, so an idle or cache-friendly replica never trims.

    Args:
        interval_s: The fewest seconds between two trims; 0 turns trimming off.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._libc = _glibc()
        self._last = 0.0
        self._removed = 0
        self._running = False
        self.trims = 0
        self.trim_s = 0.0

    def after_store(self, removed: int) -> None:
        """Start a trim if one is due and entries left the cache (``removed``: evictions + expirations)."""
        now = time.monotonic()
        if (
            self._libc is None
            or self.interval_s <= 0
            or self._running
            or removed == self._removed
            or now - self._last < self.interval_s
        ):
            return
        self._removed, self._last, self._running = removed, now, True
        threading.Thread(target=self._trim, name="llmopt-malloc-trim", daemon=True).start()

    def _trim(self) -> None:
        start = time.perf_counter()
        try:
            self._libc.malloc_trim(0)
        finally:
            self.trim_s += time.perf_counter() - start
            self.trims += 1
            self._running = False

    def stats(self) -> dict[str, Any] | None:
        """Heap bytes in use and free over every arena, and the trims so far; None off glibc.

        A leak grows ``in_use_bytes``; retained or fragmented free space grows ``free_bytes`` (which counts
        free chunks whether or not a trim has handed their pages back, so the RSS is the resident figure).
        """
        if self._libc is None:
            return None
        out: dict[str, Any] = {
            "trims": self.trims,
            "trim_seconds": self.trim_s,
            "interval_s": self.interval_s,
        }
        if hasattr(self._libc, "mallinfo2"):
            info = self._libc.mallinfo2()
            out |= {
                "in_use_bytes": info.uordblks + info.hblkhd,  # arena chunks in use + mmapped chunks
                "free_bytes": info.fordblks,
                "arena_bytes": info.arena,
            }
        return out


class StepClock:
    """Where the engine thread's time inside steps goes: on a CPU, waiting for one, or asleep.

    Linux's per-thread scheduler counters (``/proc/thread-self/schedstat``: time on a CPU and time runnable
    but waiting in a run queue) read around each step; what is left of the step's wall time the thread was
    blocked (the GIL, a lock). On a 2-core machine running the load generator, Serve's proxy and the ingress
    beside the replica, the tiny preset's steps at 32 streams were ~53% on a CPU, ~39% waiting for one and
    ~8% asleep: the engine was starved of CPU, not of work. Elsewhere (no such file) only the wall time is
    kept.
    """

    PATH = "/proc/thread-self/schedstat"

    def __init__(self) -> None:
        self.steps_s = 0.0
        self.on_cpu_s = 0.0
        self.waiting_s = 0.0
        self.available = os.path.exists(self.PATH)

    def read(self) -> tuple[int, int] | None:
        """This thread's (ns on a CPU, ns runnable in a run queue); None without the kernel's counters."""
        if not self.available:
            return None
        try:
            with open(self.PATH) as counters:
                on_cpu, waiting, _ = counters.read().split()
            return int(on_cpu), int(waiting)
        except (OSError, ValueError):
            self.available = False
            return None

    def add(self, step_s: float, before: tuple[int, int] | None) -> None:
        """Count one step of ``step_s`` seconds that started at the counters ``before`` (this thread's)."""
        self.steps_s += step_s
        after = self.read() if before is not None else None
        if after is not None:
            self.on_cpu_s += (after[0] - before[0]) / 1e9
            self.waiting_s += (after[1] - before[1]) / 1e9

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps_s": round(self.steps_s, 3)}
        if self.available:
            blocked = max(0.0, self.steps_s - self.on_cpu_s - self.waiting_s)
            out |= {
                "on_cpu_s": round(self.on_cpu_s, 3),
                "waiting_for_cpu_s": round(self.waiting_s, 3),
                "blocked_s": round(blocked, 3),
            }
        return out


@serve.deployment
class LLMServer:
    """One model replica: weights, optional LoRA adapters, the engine and the session KV caches.

    Args:
        config: A :class:`RunConfig` as ``model_dump(mode="json")`` (plain data crosses to the actor).
    """

    def __init__(self, config: dict[str, Any]):
        from llmopt.devices import ray_assigned_device
        from llmopt.models import load_tokenizer
        from llmopt.runtime import available_cpus, set_torch_threads
        from llmopt.serve import load_adapters, load_serving_model, load_virtual_prefixes

        self.config = RunConfig.model_validate(config)
        # Threads from this replica's CPU share: 1 thread per 0.5-1 CPU ran ~10x faster than oversubscribing.
        self.decode_threads = set_torch_threads(self.config.resources.cpus_per_worker)
        self.prefill_threads = self.config.serving.prefill_thread_count(self.decode_threads, available_cpus())
        # The GPU Ray assigned this replica (from resources.gpus_per_worker), else the CPU.
        self.device = ray_assigned_device(self.config.resources.accelerator)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # bitsandbytes and the CUDA generators use the current device
        choice = self.config.serving.engine
        blockers = vllm_setup_problems(self.config) if choice == "auto" else None
        self.engine_name, why = resolve_engine(choice, self.device, blockers=blockers)
        logger.info("llmopt replica engine: %s (%s)", self.engine_name, why)
        self.replica_id = f"{os.getpid()}"
        self.metrics = ReplicaMetrics()
        self.vllm: VllmEngine | None = None
        if self.engine_name == "vllm":
            # vLLM batches, caches and schedules by itself: none of the native engine's parts below exist.
            self._prefix = [0, 0]  # prompt tokens looked up in vLLM's prefix cache, and found there
            self.vllm = VllmEngine(self.config, self.device, on_step=self._vllm_step)
            self.max_batch_size = self.vllm.arguments["max_num_seqs"]
            return
        self.tokenizer = load_tokenizer(self.config.model)
        model = load_serving_model(self.config, self.device)
        adapters = self.config.serving.adapters
        # Prompt and prefix tuning adapters become KV prefixes of the plain base model, computed once.
        self.prefixes = load_virtual_prefixes(model, adapters, self.device) if adapters else {}
        if adapters:
            model = load_adapters(model, adapters, self.device)
        self.model = model
        kv = self.config.serving.kv_cache
        self.sessions = (
            SessionCacheManager(int(kv.budget_mb * 2**20), kv.ttl_s)
            if kv.enabled and kv.session_reuse
            else None
        )
        self.heap = HeapTrimmer(float(os.environ.get("LLMOPT_MALLOC_TRIM_S", "2")))
        self._queues: dict[str, _Stream] = {}
        # The engine is not thread-safe: only the engine thread touches it (requests and cancellations
        # reach it through this inbox, between steps). It steps back to back while there is work: stepping
        # from the event loop (asyncio.to_thread per step) waited for the loop between steps, which at 32
        # streams left the replica's CPU a quarter idle.
        self._inbox: SimpleQueue = SimpleQueue()
        self._engine_thread: threading.Thread | None = None
        self._steps = 0
        self._rows = 0
        self._max_rows = 0
        self.clock = StepClock()
        batching = self.config.serving.batching
        self._set_batching(batching.max_batch_size, batching.wait_timeout_s)
        self.controller = self._controller(batching.max_batch_size)
        self._timing: dict[str, list[float]] = {}  # request id -> [first token at, tokens] (adaptive)
        self._new_engine()

    def _controller(self, configured: int) -> BatchSizeController | None:
        """The adaptive batching controller when ``monitor.adaptive_batching`` is on (never for mode none)."""
        adaptive, monitor = self.config.monitor.adaptive_batching, self.config.monitor
        if not adaptive.enabled or self.config.serving.batching.mode == "none":
            return None
        upper = adaptive.max_batch_size or configured
        controller = BatchSizeController(
            adaptive, monitor.tpot_slo_s, monitor.slo_percentile, size=upper, upper=upper
        )
        self._set_batching(controller.size, self.batch_wait_timeout_s)
        logger.info(
            "adaptive batching on: max_batch_size within [%d, %d] for a p%g TPOT of %.1f ms",
            controller.lower,
            controller.upper,
            100 * monitor.slo_percentile,
            1e3 * monitor.tpot_slo_s,
        )
        return controller

    def _new_engine(self) -> None:
        """A fresh engine at the current batch settings (at start, and after a step failed)."""
        batching = self.config.serving.batching
        self.engine = GenerationEngine(
            self.model,
            self.tokenizer,
            max_batch_size=self.max_batch_size,
            continuous=batching.mode == "continuous",
            use_cache=self.config.serving.kv_cache.enabled,
            max_prefill_tokens=batching.max_prefill_tokens,
            prefill_threads=self.prefill_threads if self.device.type == "cpu" else None,
        )

    def _set_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """Apply batch settings to ``@serve.batch`` and the engine (``mode=none`` keeps a batch of 1)."""
        self.max_batch_size = 1 if self.config.serving.batching.mode == "none" else max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        if hasattr(self, "engine"):
            self.engine.max_batch_size = self.max_batch_size  # the engine reads it when it admits
        self._admit.set_max_batch_size(self.max_batch_size)
        self._admit.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.metrics.max_batch_size.set(self.max_batch_size)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``user_config`` {max_batch_size, batch_wait_timeout_s} without restarting the replica.

        Raises:
            ValueError: For a user_config that is not a mapping, has unknown keys or holds a value outside
                the run config's rules (Serve then keeps the previous config, or fails the deployment).
        """
        size, wait = batch_settings(user_config, self.config.serving.batching)
        if self.vllm is not None:
            if size != self.max_batch_size:
                logger.warning(
                    "LLMServer user_config max_batch_size=%d not applied: vLLM's max_num_seqs (%d) is fixed "
                    "when its engine starts; redeploy with serving.batching.max_batch_size=%d",
                    size,
                    self.max_batch_size,
                    size,
                )
            return
        self._set_batching(size, wait)
        if self.controller is not None:  # the operator's size is the new start and upper bound
            self.controller.reset(size, upper=size)

    @serve.multiplexed(max_num_models_per_replica=256)
    async def _route(self, model_id: str) -> str:
        # Multiplexed ids are routing keys ("adapter" or "adapter|session-digest"): Serve prefers the replica
        # that already served an id. Adapters are all loaded at start (mixed-adapter batches need them in one
        # PeftModel, and a bad path should fail the deployment, not a request), so nothing loads here.
        return model_id

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _admit(self, requests: list[GenerationRequest]) -> list[_Stream]:
        """Queue a batch of concurrently arriving requests (each expanded into its choices) for the engine;
        one output queue per request."""
        queues, choices = [], []
        for request in requests:
            expanded = expand_choices(request)
            queue = _Stream(expanded)
            for choice in expanded:
                self._queues[choice.request_id] = queue
            queues.append(queue)
            choices += expanded
        self._inbox.put(("add", choices))
        if self._engine_thread is None or not self._engine_thread.is_alive():
            loop = asyncio.get_running_loop()
            self._engine_thread = threading.Thread(
                target=self._engine_loop, args=(loop,), name="llmopt-engine", daemon=True
            )
            self._engine_thread.start()
        return queues

    def _engine_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The engine thread: apply queued requests and cancellations, step, hand the outputs to the loop."""
        while True:
            try:
                commands = [] if self.engine.has_work() else [self._inbox.get()]
                while True:
                    try:
                        commands.append(self._inbox.get_nowait())
                    except Empty:
                        break
                for kind, value in commands:
                    if kind == "cancel":
                        self.engine.cancel(value)
                        continue
                    for request in value:
                        try:
                            self.engine.add(request)
                        except ValueError as exc:
                            loop.call_soon_threadsafe(self._fail, request.request_id, exc)
                if not self.engine.has_work():
                    continue
                try:
                    counters, started = self.clock.read(), time.perf_counter()
                    outputs = self.engine.step()
                    step_s = time.perf_counter() - started
                    self.clock.add(step_s, counters)
                except Exception as exc:  # a broken step fails the live requests, never the replica
                    logger.exception("llmopt engine step failed; its requests fail, the replica goes on")
                    self._new_engine()
                    loop.call_soon_threadsafe(self._fail_all, exc)
                    continue
                counts = (self.engine.num_waiting, self.engine.num_running)
                loop.call_soon_threadsafe(self._deliver, outputs, *counts, step_s)
            except Exception:  # never let the thread die with requests waiting on it
                logger.exception("llmopt engine thread: unexpected error")
                time.sleep(0.1)

    def _deliver(self, outputs: list, waiting: int, running: int, step_s: float) -> None:
        """On the event loop: record a step (``step_s`` seconds long) and route each output to its request's
        queue."""
        self._steps += 1
        self._rows += len(outputs)
        self._max_rows = max(self._max_rows, len(outputs))
        self.metrics.step(len(outputs), waiting, running, self.max_batch_size)
        if self.controller is not None:
            self._adapt(outputs, waiting, running, step_s)
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
                if out.finished:
                    queue.live.discard(out.request_id)
                    if not queue.live:
                        queue.ended.set()
            elif not out.finished:  # its caller left between the step and now
                self._inbox.put(("cancel", out.request_id))
            if out.finished:
                self._queues.pop(out.request_id, None)

    def _adapt(self, outputs: list, waiting: int, running: int, step_s: float) -> None:
        """Feed the controller the step and each finished request's TPOT; apply the batch size it decides
        on."""
        controller, now = self.controller, time.monotonic()
        controller.saw_step(waiting, running, step_s, rows=sum(out.token_id is not None for out in outputs))
        for out in outputs:
            timing = self._timing.get(out.request_id)
            if timing is None and out.token_id is not None:
                timing = self._timing[out.request_id] = [now, 0]
            if timing is not None and out.token_id is not None:
                timing[1] += 1
            if out.finished:
                self._timing.pop(out.request_id, None)
                if timing is not None and timing[1] > 1:
                    controller.observe((now - timing[0]) / (timing[1] - 1), timing[0])
        change = controller.decide()
        if change is not None:
            self._set_batching(change.new, self.batch_wait_timeout_s)
            self.metrics.batch_size_changes.inc(1, {"direction": change.direction})
            logger.info(change.message(f"p{100 * controller.quantile:g}"))

    def _fail_all(self, exc: BaseException) -> None:
        """Fail every live request (a request still in the inbox runs, but its outputs are dropped)."""
        for request_id in list(self._queues):
            self._fail(request_id, exc)

    def _fail(self, request_id: str, exc: BaseException) -> None:
        self._timing.pop(request_id, None)
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(exc)
            queue.ended.set()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Generate one request; yields a chunk of new tokens at a time, the last one ``finished``.

        Args:
            request: Built and validated by the ingress (prompt ids, sampling, adapter, session).
        """
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self._route(model_id)
        if self.vllm is not None:
            async for chunk in self._generate_vllm(request):
                yield chunk
            return
        virtual = self._virtual_prefix(request)
        session = request.session
        if session is not None and self.sessions is not None:
            entry = self.sessions.lookup(session.owner, session.id, request.prompt_ids)
            request.prefix_cache = entry.cache if entry is not None else None
            request.keep_cache = True
        if virtual is not None and request.prefix_cache is None:
            request.prefix_cache = copy_cache(virtual)
        queue = await self._admit(request)
        serving = self.config.serving
        finished, first, last_sent = False, True, 0.0
        try:
            while not finished:
                items = [await queue.get()]
                # Coalesce: one message per interval instead of one per token (each streamed message costs a
                # Ray object transfer in this replica, the ingress and the proxy); with many streams the
                # interval grows so that the replica sends at most serving.stream_events_per_s in all.
                interval = stream_interval(
                    serving.stream_interval_s, serving.stream_events_per_s, len(self._queues)
                )
                if not first and interval and not queue.ended.is_set():
                    await _sleep_unless(queue.ended, last_sent + interval - time.monotonic())
                while not queue.empty():
                    items.append(queue.get_nowait())
                failure = next((item for item in items if isinstance(item, BaseException)), None)
                if failure is not None:  # the engine refused or lost it: an error chunk, no traceback
                    finished = True
                    error = f"{type(failure).__name__}: {failure}"
                    yield TokenChunk([], "", True, "error", 0, error=error)
                    return
                finished = not queue.live
                chunks = [self._chunk(queue.index[rid], group, request) for rid, group in _by_choice(items)]
                for item in items:
                    if item.cache is not None and session is not None and self.sessions is not None:
                        self.sessions.store(session.owner, session.id, item.cache_token_ids, item.cache)
                        cache = self.sessions.stats()
                        self.metrics.cache(cache.to_dict())
                        self.heap.after_store(cache.evictions + cache.expirations)
                # Until some text went out, flush at once: a first token that decodes to nothing visible (a
                # partial character) must not delay the first text by a whole interval.
                first, last_sent = first and not any(c.text for c in chunks), time.monotonic()
                for chunk in chunks:
                    yield chunk
        finally:
            if not finished:  # the caller went away (or failed): free its batch slots at the next step
                for request_id in queue.live:
                    self._queues.pop(request_id, None)
                    self._timing.pop(request_id, None)
                    self._inbox.put(("cancel", request_id))

    def _virtual_prefix(self, request: GenerationRequest):
        """For a prompt or prefix tuning adapter: its KV prefix, with the request turned into a base-model
        request whose prompt starts with one placeholder per virtual token (so that positions, batch
        padding and session matching count them like tokens). None for other requests."""
        prefix = self.prefixes.get(request.adapter) if request.adapter else None
        if prefix is None:
            return None
        n = prefix.get_seq_length()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        request.prompt_ids = [pad] * n + list(request.prompt_ids)
        request.virtual_tokens = n
        request.adapter = None  # the base model computes every real token
        return prefix

    async def _generate_vllm(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """`generate` on vLLM's engine: its records coalesced per stream interval, as the native path does.

        A task reads vLLM's stream into a queue while the previous chunk is on its way; a failure becomes an
        error record (the ingress answers it as the native engine's), and leaving early cancels the task,
        which aborts the request in vLLM.
        """
        serving, vllm = self.config.serving, self.vllm
        pacing = (serving.stream_interval_s, serving.stream_events_per_s)
        queue: asyncio.Queue = asyncio.Queue()
        ended = asyncio.Event()

        async def pump() -> None:
            try:
                async for chunk in vllm.generate(request):
                    queue.put_nowait(chunk)
            except Exception as exc:  # a refused or failed request fails alone; the replica goes on
                logger.warning("vLLM request %s failed: %s: %s", request.request_id, type(exc).__name__, exc)
                queue.put_nowait(exc)
            finally:
                queue.put_nowait(None)
                ended.set()

        task = asyncio.create_task(pump())
        first, last_sent = True, 0.0
        try:
            while True:
                items = [await queue.get()]
                interval = stream_interval(*pacing, vllm.running)
                if not first and interval and not ended.is_set():
                    await _sleep_unless(ended, last_sent + interval - time.monotonic())
                while not queue.empty():
                    items.append(queue.get_nowait())
                failure = next((item for item in items if isinstance(item, BaseException)), None)
                if failure is not None:
                    yield TokenChunk([], "", True, "error", 0, error=f"{type(failure).__name__}: {failure}")
                    return
                chunks = merge_chunks([item for item in items if item is not None])
                first, last_sent = first and not any(c.text for c in chunks), time.monotonic()
                for chunk in chunks:
                    yield chunk
                if items[-1] is None:
                    return
        finally:
            task.cancel()

    def _vllm_step(self, figures: dict[str, float]) -> None:
        """One vLLM engine step into llmopt's replica metrics, so that dashboards and alerts read the same
        series on both engines: rows per step, queue, KV bytes in use and the prefix-cache hit rate (over
        prompt tokens, vLLM's measure; the native engine's is over session lookups)."""
        running = int(figures["running"])
        self.metrics.step(running, int(figures["waiting"]), running, self.max_batch_size)
        self._prefix[0] += int(figures["prefix_queries"])
        self._prefix[1] += int(figures["prefix_hits"])
        if self._prefix[0]:
            self.metrics.kv_hit_rate.set(self._prefix[1] / self._prefix[0])
        total = self.vllm.kv_cache_bytes if self.vllm is not None else None
        if total:
            self.metrics.kv_bytes.set(figures["kv_usage"] * total)

    async def check_health(self) -> None:
        """Serve's periodic health check: a replica whose vLLM engine core died is replaced."""
        if self.vllm is not None:
            await self.vllm.check_health()

    @staticmethod
    def _chunk(index: int, items: list, request: GenerationRequest) -> TokenChunk:
        """One choice's outputs since its previous chunk, as one record."""
        last = items[-1]
        produced = [item for item in items if item.token_id is not None]
        logprobs = None
        if request.params.logprobs is not None:
            logprobs = [(item.logprob, item.top_logprobs or []) for item in produced]
        prompt_logprobs = next(
            (item.prompt_logprobs for item in items if item.prompt_logprobs is not None), None
        )
        if prompt_logprobs is not None and request.virtual_tokens:  # the caller's tokens only
            prompt_logprobs = [None, *prompt_logprobs[request.virtual_tokens + 1 :]]
        return TokenChunk(
            token_ids=[item.token_id for item in produced],
            text="".join(item.text for item in items),
            finished=last.finished,
            finish_reason=last.finish_reason,
            cached_tokens=last.cached_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            error=last.error,
            index=index,
        )

    async def stats(self) -> dict[str, Any]:
        """This replica's engine settings, batch sizes so far and session-cache counters."""
        from llmopt.devices import describe_device, memory_stats

        if self.vllm is not None:
            return {
                "replica": self.replica_id,
                "device": describe_device(self.device),
                "memory": memory_stats(self.device),
                "engine": {"name": "vllm", "max_batch_size": self.max_batch_size, **self.vllm.stats()},
            }
        batching = self.config.serving.batching
        cache = self.sessions.stats().to_dict() if self.sessions is not None else None
        return {
            "replica": self.replica_id,
            "device": describe_device(self.device),
            "memory": memory_stats(self.device),
            "engine": {
                "name": "native",
                "mode": batching.mode,
                "max_batch_size": self.max_batch_size,
                "batch_wait_timeout_s": self.batch_wait_timeout_s,
                "kv_cache": self.config.serving.kv_cache.enabled,
                "running": self.engine.num_running,
                "waiting": self.engine.num_waiting,
                "decode_kernel": getattr(self.model, "decode_kernel", "torch"),
                "decode_path": self.engine.decode_path,
                "threads": {
                    "decode": self.decode_threads,
                    "prefill": self.engine.prefill_threads or self.decode_threads,
                },
            },
            "batch_size": {
                "steps": self._steps,
                "mean": self._rows / self._steps if self._steps else 0.0,
                "max": self._max_rows,
            },
            "engine_thread": self.clock.stats(),
            "kv_cache": cache,
            "adaptive_batching": self.controller.state() if self.controller is not None else None,
            "heap": self.heap.stats(),
        }
