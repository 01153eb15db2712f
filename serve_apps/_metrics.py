"""Serving metrics through ``ray.serve.metrics``: exported on each node's Prometheus endpoint (Ray prefixes
every name with ``ray_``) and shown in the Ray dashboard's metrics views. Serve's metric classes are
``ray.util.metrics``' with the ``deployment``, ``replica`` and ``application`` tags added, so a series says
which replica it is from (``llmopt monitor top`` shows them per replica).

The ingress records requests, errors by HTTP status, time to first token and time per output token; each
model replica records decode batch sizes, its queue, and its session KV cache (bytes, hits, misses,
evictions, hit rate). Metric objects are created per process (inside the replicas), never at import.
"""

from ray.serve.metrics import Counter, Gauge, Histogram

_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
_BATCH = [1, 2, 4, 8, 16, 32, 64, 128]


class IngressMetrics:
    """Request-level metrics of the HTTP ingress."""

    def __init__(self) -> None:
        self.requests = Counter(
            "llmopt_requests_total", "HTTP requests by route and status code.", tag_keys=("route", "code")
        )
        self.errors = Counter(
            "llmopt_errors_total",
            "HTTP error responses by route and status code.",
            tag_keys=("route", "code"),
        )
        self.ttft = Histogram(
            "llmopt_time_to_first_token_seconds",
            "Seconds from request arrival to its first generated token.",
            boundaries=_LATENCY_S,
            tag_keys=("route",),
        )
        self.tpot = Histogram(
            "llmopt_time_per_output_token_seconds",
            "Mean seconds per generated token after the first, per request.",
            boundaries=_LATENCY_S,
            tag_keys=("route",),
        )
        self.output_tokens = Counter("llmopt_output_tokens_total", "Generated tokens.", tag_keys=("route",))
        self.cache_lookups = Counter(
            "llmopt_response_cache_requests_total",
            "OpenAI requests by response-cache result: hit, miss, or bypass (not deterministic).",
            tag_keys=("result",),
        )

        self.route_requests = Counter(
            "llmopt_route_requests_total",
            "Requests to a split route by arm and outcome (ok, or error: a 5xx or a failed stream).",
            tag_keys=("route", "arm", "outcome"),
        )
        self.route_latency = Histogram(
            "llmopt_route_latency_seconds",
            "Whole request latency (to a stream's end) of a split route's answered requests, by arm.",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60],
            tag_keys=("route", "arm"),
        )
        self.route_score = Gauge(
            "llmopt_route_eval_exact_match",
            "Held-out greedy exact match of a split route's arm (routes with eval_samples).",
            tag_keys=("route", "arm"),
        )

    def route(self, route: str, arm: str, seconds: float, ok: bool) -> None:
        self.route_requests.inc(tags={"route": route, "arm": arm, "outcome": "ok" if ok else "error"})
        if ok:
            self.route_latency.observe(seconds, tags={"route": route, "arm": arm})

    def route_evaluation(self, route: str, arm: str, exact_match: float) -> None:
        self.route_score.set(exact_match, tags={"route": route, "arm": arm})

    def response_cache(self, result: str) -> None:
        self.cache_lookups.inc(tags={"result": result})

    def response(self, route: str, code: int) -> None:
        """Count one response (and one error when ``code >= 400``)."""
        tags = {"route": route, "code": str(code)}
        self.requests.inc(1, tags)
        if code >= 400:
            self.errors.inc(1, tags)

    def generation(self, route: str, ttft_s: float | None, total_s: float, tokens: int) -> None:
        """Record a finished generation's first-token latency, time per output token and token count."""
        tags = {"route": route}
        if ttft_s is not None:
            self.ttft.observe(ttft_s, tags)
            if tokens > 1:
                self.tpot.observe((total_s - ttft_s) / (tokens - 1), tags)
        if tokens:
            self.output_tokens.inc(tokens, tags)


class ReplicaMetrics:
    """Engine- and cache-level metrics of one model replica."""

    def __init__(self) -> None:
        self.batch_size = Histogram(
            "llmopt_batch_size", "Requests decoded together per engine step.", boundaries=_BATCH
        )
        self.queue_length = Gauge("llmopt_queue_length", "Requests waiting for a slot in the running batch.")
        self.running = Gauge("llmopt_running_requests", "Requests in the running batch.")
        self.kv_bytes = Gauge("llmopt_kv_cache_bytes", "Bytes held by session KV caches.")
        self.kv_entries = Gauge("llmopt_kv_cache_sessions", "Sessions with a cached KV prefix.")
        self.kv_hit_rate = Gauge("llmopt_kv_cache_hit_rate", "Session-cache hits over lookups.")
        self.kv_events = Counter(
            "llmopt_kv_cache_events_total", "Session-cache hits, misses and evictions.", tag_keys=("event",)
        )
        self.max_batch_size = Gauge(
            "llmopt_max_batch_size", "The replica's max_batch_size now (adaptive batching moves it)."
        )
        self.batch_size_changes = Counter(
            "llmopt_batch_size_changes_total",
            "Changes of max_batch_size by adaptive batching, by direction (up, down).",
            tag_keys=("direction",),
        )
        self._seen = {"hits": 0, "misses": 0, "evictions": 0, "expirations": 0}

    def step(self, batch_size: int, waiting: int, running: int, max_batch_size: int) -> None:
        """Record one engine step (gauges every step: Ray drops a gauge left unset for a few reports)."""
        if batch_size:
            self.batch_size.observe(batch_size)
        self.queue_length.set(waiting)
        self.running.set(running)
        self.max_batch_size.set(max_batch_size)

    def cache(self, stats: dict[str, float]) -> None:
        """Export a ``CacheStats.to_dict()`` snapshot (counters as deltas since the last export)."""
        self.kv_bytes.set(stats["bytes"])
        self.kv_entries.set(stats["entries"])
        self.kv_hit_rate.set(stats["hit_rate"])
        for event, seen in self._seen.items():
            delta = int(stats[event]) - seen
            if delta > 0:
                self.kv_events.inc(delta, {"event": event})
                self._seen[event] = int(stats[event])
