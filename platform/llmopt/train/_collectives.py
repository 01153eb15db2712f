"""The one way the worker loop sums figures over its ranks.

nccl (the GPU backend) accepts only tensors on the rank's GPU and refuses CPU tensors ("No backend type
associated with device type cpu"); gloo takes CPU tensors. Every collective the loop runs (losses, token
counts, evaluation sums, expert loads, throughput) goes through here with the engine's device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def all_reduce_values(values: Sequence[float], device: torch.device | str) -> list[float]:
    """Sum `values` element-wise over every rank of the default process group (as-is without one).

    Args:
        values: This rank's figures.
        device: Where the collective's tensor lives: the engine's device (a GPU under nccl, CPU under gloo).

    Returns:
        The sums, as Python floats, on every rank.
    """
    values = [float(v) for v in values]
    if not values or not dist.is_available() or not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
