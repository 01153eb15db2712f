"""Training metrics: peak memory, MoE expert load, and a sink that keeps the history on the driver.

Ray Train keeps the metrics of checkpointed reports only; the sink actor, pinned to the driver's
node, receives every step's record from rank 0, writes `metrics.jsonl` into the run directory and
answers the driver's progress display.
"""

from __future__ import annotations

import json
import logging
import resource
import threading
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Peak memory of this process: CUDA max allocated on a GPU, else the process's peak RSS."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    import psutil

    return psutil.Process().memory_info().rss


def current_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Memory in use now, measured as `peak_memory_bytes` measures it: CUDA allocated on a GPU, else RSS."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return current_rss_bytes()


def expert_token_counts(router_logits, top_k: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Tokens routed to each expert, summed over layers (padding excluded).

    Args:
        router_logits: Per-layer tensors of shape (tokens, num_experts), as MoE models return them.
        top_k: Experts per token.
        attention_mask: (batch, seq) mask whose flattened order matches the router's token order.

    Returns:
        A float tensor of shape (num_experts,) with routed-token counts.
    """
    keep = attention_mask.reshape(-1).bool() if attention_mask is not None else None
    counts = None
    for logits in router_logits:
        if logits is None:
            continue
        logits = logits.detach().float()
        if keep is not None and logits.shape[0] == keep.shape[0]:
            logits = logits[keep]
        chosen = logits.topk(top_k, dim=-1).indices.reshape(-1)
        layer = torch.bincount(chosen, minlength=logits.shape[-1]).float()
        counts = layer if counts is None else counts + layer
    return counts if counts is not None else torch.zeros(0)


def expert_load_metrics(counts: torch.Tensor) -> dict[str, float]:
    """Per-expert share of routed tokens and the imbalance (max share / mean share; 1.0 is even)."""
    total = float(counts.sum())
    if total == 0:
        return {}
    shares = counts / total
    metrics = {f"expert_load/{i}": float(s) for i, s in enumerate(shares)}
    metrics["expert_imbalance"] = float(shares.max() / shares.mean())
    return metrics


REFRESH_S = 5.0  # how often the sink sets its gauges again between records

# Gauges the sink exports (Ray's metrics endpoint adds `ray_`): name -> description. Tagged with `run`.
TRAIN_GAUGES = {
    "llmopt_train_step": "Optimizer step of the run's latest record.",
    "llmopt_train_loss": "Training loss of the latest record (mean over the steps since the one before).",
    "llmopt_train_tokens_per_second": "Training tokens per second over the steps since the record before.",
    "llmopt_train_peak_memory_bytes": "Largest worker peak memory since the last checkpointing decision "
    "(the process's peak where the record has no window).",
    "llmopt_train_memory_ceiling_bytes": "monitor.memory_ceiling x a worker's memory budget, in bytes.",
    "llmopt_train_last_step_timestamp_seconds": "Unix time the sink received the run's latest step record.",
    "llmopt_train_restarts": "Worker-group restarts the sink has seen (steps going back, or a new resume "
    "point).",
    "llmopt_train_finished": "1 once the run's final record arrived, else 0.",
}


class MetricsSink:
    """Ray actor (created with `ray.remote`) that stores every record, writes metrics.jsonl and exports the
    latest figures as Prometheus gauges (`TRAIN_GAUGES`, through `ray.util.metrics`, tagged with `run`).

    The actor outlives worker-group restarts, so it sees them: a step record whose `step` is not above the
    previous one's, or whose `resumed_from_step` differs from it, comes from a restarted group. Exporting
    is best effort: whatever `ray.util.metrics` does, every record still reaches metrics.jsonl.

    Args:
        path: The run's metrics.jsonl.
        run: The `run` tag of the gauges; the run directory's name (the path's parent) by default.
    """

    def __init__(self, path: str, run: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run = run or self.path.parent.name
        self.records: list[dict[str, Any]] = []
        self.restarts = 0
        # Gauge name -> the value last exported (or that would have been, were ray.util.metrics unusable).
        self.exported: dict[str, float] = {}
        self._gauges: dict[str, Any] | None = None  # created on the first record, in the actor's process
        self._last_step: int | None = None
        self._last_resumed: int | None = None
        self._stop = threading.Event()

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        try:
            self._export(record, time.time())
        except Exception:  # never let metrics export cost a record
            logger.warning("exporting training metrics failed", exc_info=True)

    def latest(self) -> dict[str, Any] | None:
        return self.records[-1] if self.records else None

    def history(self) -> list[dict[str, Any]]:
        return list(self.records)

    def _restarted(self, record: dict[str, Any]) -> bool:
        """Whether `record` is the first from a restarted worker group (and remember its step)."""
        step, resumed = record.get("step"), record.get("resumed_from_step")
        if not isinstance(step, (int, float)):
            return False
        restarted = False
        if self._last_step is not None:
            # The final record repeats a step that was logged without a report: only going back counts there.
            went_back = step < self._last_step if record.get("final") else step <= self._last_step
            moved = resumed is not None and self._last_resumed is not None and resumed != self._last_resumed
            restarted = went_back or moved
        self._last_step = int(step)
        if resumed is not None:
            self._last_resumed = resumed
        return restarted

    def _export(self, record: dict[str, Any], now: float) -> None:
        if self._restarted(record):
            self.restarts += 1
        values: dict[str, Any] = {
            "llmopt_train_step": record.get("step"),
            "llmopt_train_loss": record.get("loss"),
            "llmopt_train_tokens_per_second": record.get("tokens_per_s"),
            "llmopt_train_peak_memory_bytes": record.get(
                "window_peak_memory_bytes", record.get("peak_memory_bytes")
            ),
            "llmopt_train_memory_ceiling_bytes": record.get("memory_ceiling_bytes"),
            "llmopt_train_last_step_timestamp_seconds": now if "step" in record else None,
            "llmopt_train_restarts": self.restarts,
            "llmopt_train_finished": 1.0 if record.get("final") else 0.0,
        }
        gauges = self._ensure_gauges()
        tags = {"run": self.run}
        for name, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # what the record does not carry keeps its last value
            self.exported[name] = float(value)
            gauge = gauges.get(name)
            if gauge is not None:
                try:
                    gauge.set(float(value), tags)
                except Exception:
                    logger.warning("setting %s failed; no more training gauges", name, exc_info=True)
                    self._gauges = {}
                    gauges = self._gauges

    def _ensure_gauges(self) -> dict[str, Any]:
        """The gauges, created on first use: never at import, and in the process that sets them."""
        if self._gauges is None:
            try:
                from ray.util.metrics import Gauge

                self._gauges = {
                    name: Gauge(name, description, tag_keys=("run",))
                    for name, description in TRAIN_GAUGES.items()
                }
            except Exception:  # no Ray, or a Ray whose metrics cannot be used here: metrics.jsonl only
                logger.warning("training metrics are not exported to Prometheus", exc_info=True)
                self._gauges = {}
            if self._gauges:
                threading.Thread(target=self._refresh, name="llmopt-train-gauges", daemon=True).start()
        return self._gauges

    def _refresh(self) -> None:
        """Set every gauge again every few seconds: Ray drops a gauge left unset for a few metric reports,
        and a run between two logged steps (or a stalled one, which the stall alert is for) sets none."""
        while not self._stop.wait(REFRESH_S):
            gauges, tags = self._gauges or {}, {"run": self.run}
            for name, value in list(self.exported.items()):
                gauge = gauges.get(name)
                if gauge is not None:
                    try:
                        gauge.set(value, tags)
                    except Exception:
                        return


def reset_peak_memory(device: torch.device | str = "cpu", trim: bool = False) -> bool:
    """Start a new peak for `peak_memory_since_reset`: CUDA's peak statistics, or the process's VmHWM.

    `ru_maxrss` never falls, so a peak read from it cannot show that later steps need less memory. Linux
    resets the resident high-water mark (VmHWM, which ru_maxrss reads too) when "5" is written to
    /proc/self/clear_refs. `trim` first returns the heap's free pages to the kernel (glibc `malloc_trim`):
    otherwise freed activations stay resident in the allocator and the next peak starts at the old one.
    Trimming costs page faults when the memory is used again, so callers ask for it under pressure only.

    Returns:
        False where the CPU peak cannot be reset (not Linux, or a read-only /proc): the peak since the
        "reset" is then the lifetime peak.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    if trim:
        import contextlib
        import ctypes

        with contextlib.suppress(OSError, AttributeError):  # AttributeError: a libc without malloc_trim
            ctypes.CDLL(None).malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def peak_memory_since_reset(device: torch.device | str = "cpu") -> int:
    """Peak memory since `reset_peak_memory`: CUDA max allocated, else VmHWM (ru_maxrss without /proc)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return peak_memory_bytes(device)


class PeakMemoryWindow:
    """Peak memory since the last `restart` (a window), and over the process's life.

    Resetting the peak is what lets a window show that later steps need less; it also lowers what
    `peak_memory_bytes` reads (CUDA max allocated, ru_maxrss), so the lifetime peak is kept here by folding
    every window in. `exclude` leaves a stretch (an evaluation) out of the window, not out of the lifetime.

    Args:
        device: The worker's device.
        pressure_bytes: A reset after a peak above this trims the heap first (see `reset_peak_memory`).
    """

    def __init__(self, device: torch.device | str = "cpu", pressure_bytes: int | None = None):
        self.device = torch.device(device)
        self.pressure_bytes = pressure_bytes
        self.lifetime = peak_memory_bytes(self.device)
        self.window = 0
        self.resettable = self._reset(self.lifetime)

    def _reset(self, peak: int) -> bool:
        trim = self.pressure_bytes is not None and peak > self.pressure_bytes
        return reset_peak_memory(self.device, trim=trim)

    def _read(self) -> int:
        now = peak_memory_since_reset(self.device)
        self.lifetime = max(self.lifetime, now)
        return now

    def measure(self) -> int:
        """The window's peak so far (and the lifetime peak brought up to date)."""
        self.window = max(self.window, self._read())
        return self.window

    def exclude(self) -> None:
        """Keep what ran since the last `measure` out of the window."""
        self._reset(self._read())

    def restart(self) -> None:
        """Begin a new window."""
        peak = max(self.window, self._read())
        self.window = 0
        self._reset(peak)
