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
