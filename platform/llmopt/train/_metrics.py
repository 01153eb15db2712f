"""Training metrics: peak memory, MoE expert load, and a sink that keeps the history on the driver.

Ray Train keeps the metrics of checkpointed reports only; the sink actor, pinned to the driver's
node, receives every step's record from rank 0, writes `metrics.jsonl` into the run directory and
answers the driver's progress display.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch


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


class MetricsSink:
    """Ray actor (created with `ray.remote`) that stores every record and writes metrics.jsonl."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def latest(self) -> dict[str, Any] | None:
        return self.records[-1] if self.records else None

    def history(self) -> list[dict[str, Any]]:
        return list(self.records)


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
