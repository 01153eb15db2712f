"""Which device a Ray worker or Serve replica computes on, and what its memory figures are.

Ray gives an actor GPUs by id (`ray.get_gpu_ids()`) and, unless told otherwise, narrows
`CUDA_VISIBLE_DEVICES` to them, so torch numbers the first assigned GPU `cuda:0`. Ray Train's
`ray.train.torch.get_device()` does this mapping inside a training worker; Serve replicas and plain
tasks have no train context, so they use `assigned_device` here.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "DeviceError",
    "assigned_device",
    "bf16_supported",
    "describe_device",
    "local_device",
    "memory_stats",
    "ray_assigned_device",
]


class DeviceError(RuntimeError):
    """The process was given a device it cannot use (the message names the fix)."""


def assigned_device(
    gpu_ids: Sequence[int | str],
    accelerator: str = "auto",
    cuda_available: bool | None = None,
    visible_devices: str | None = None,
) -> torch.device:
    """The torch device of a process that Ray gave `gpu_ids`.

    Args:
        gpu_ids: What `ray.get_gpu_ids()` returned (empty: no GPU).
        accelerator: `resources.accelerator` (`cpu` forces the CPU even with GPUs assigned).
        cuda_available: Whether torch sees CUDA (default: ask torch).
        visible_devices: `CUDA_VISIBLE_DEVICES` (default: the environment's; None when unset).

    Returns:
        `cuda:<index>` for the first assigned GPU, numbered as torch sees it, else `cpu`.

    Raises:
        DeviceError: GPUs were assigned (or `accelerator='gpu'` asked for one) but this torch has no CUDA,
            or `accelerator='gpu'` and Ray assigned no GPU.
    """
    if accelerator == "cpu":
        return torch.device("cpu")
    if not gpu_ids:
        if accelerator == "gpu":
            raise DeviceError(
                "resources.accelerator='gpu' but Ray assigned this process no GPU; set "
                "resources.gpus_per_worker to 1 or more (or accelerator=auto to run on CPU)"
            )
        return torch.device("cpu")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise DeviceError(
            f"Ray assigned GPU {list(gpu_ids)} but this torch ({torch.__version__}) cannot use CUDA; install "
            "a CUDA build of torch on the GPU nodes, or set resources.gpus_per_worker=0"
        )
    if visible_devices is None:
        visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = str(gpu_ids[0])
    if visible_devices is not None:
        visible = [v.strip() for v in visible_devices.split(",") if v.strip()]
        index = visible.index(first) if first in visible else 0
    else:  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: torch sees every GPU under its own id
        index = int(first) if first.isdigit() else 0
    return torch.device("cuda", index)


def ray_assigned_device(accelerator: str = "auto") -> torch.device:
    """`assigned_device` for the current Ray actor or task."""
    import ray

    return assigned_device(ray.get_gpu_ids(), accelerator)


def local_device(accelerator: str, gpus: float) -> torch.device:
    """The device of a computation in this process (no Ray): the current GPU when the config asks for GPUs.

    Raises:
        DeviceError: GPUs asked for and this torch sees none.
    """
    if accelerator == "cpu" or not gpus:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"resources.gpus_per_worker={gpus:g} but this process sees no CUDA GPU; set "
            "resources.gpus_per_worker=0, or run where a GPU and a CUDA build of torch are"
        )
    return torch.device("cuda", torch.cuda.current_device())


def bf16_supported(device: torch.device | str) -> bool:
    """Whether `device` has native bf16 matrix units (Ampere and later GPUs; CPUs are measured, not told)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def describe_device(device: torch.device | str) -> str:
    """`cpu`, or `cuda:0 (NVIDIA H200)`: what run summaries and `/api/v1/stats` show."""
    device = torch.device(device)
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


def memory_stats(device: torch.device | str) -> dict[str, Any]:
    """Memory figures of this process on `device`: the CUDA allocator's on a GPU, the process's RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {
            "device": str(device),
            "name": torch.cuda.get_device_name(device),
            "allocated_bytes": int(torch.cuda.memory_allocated(device)),
            "reserved_bytes": int(torch.cuda.memory_reserved(device)),
            "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
            "free_bytes": int(free),
            "total_bytes": int(total),
        }
    import psutil

    rss = int(psutil.Process().memory_info().rss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    # The kernel updates ru_maxrss lazily: the RSS read now can be a few pages above it.
    return {"device": "cpu", "rss_bytes": rss, "peak_rss_bytes": max(rss, peak)}
