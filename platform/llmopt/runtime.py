"""How many threads a worker or replica computes with: one per CPU of its Ray share.

Torch-free until `set_torch_threads` runs, so the cost model can predict the thread count a trial will use.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["available_cpus", "set_torch_threads", "threads_for_cpus"]


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (a container's or
    a Kubernetes pod's limit), at least one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:  # "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def threads_for_cpus(cpus: float) -> int:
    """Threads for a worker or replica of `cpus` CPUs: one per CPU, rounded to whole CPUs, at least one (a
    replica of 1.9 CPUs next to a 0.1-CPU ingress on a 2-core machine gets 2, a fraction of a CPU 1)."""
    return max(1, round(cpus))


def set_torch_threads(cpus: float) -> int:
    """Use `threads_for_cpus(cpus)` torch threads: one per CPU of this process's share, rounded.

    Oversubscribing cores with several processes is far slower than one thread each (a decode step
    ran ~10x faster with 1 thread per 0.5-CPU replica than with 2 on a 2-core machine).

    Returns:
        The thread count set.
    """
    import torch

    threads = threads_for_cpus(cpus)
    torch.set_num_threads(threads)
    return threads
