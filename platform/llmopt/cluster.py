"""Connecting to Ray: the embedded in-process cluster by default, an existing one when asked."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["init_ray"]


def init_ray(address: str | None = None, **kwargs: Any):
    """Start or join a Ray cluster and return Ray's context.

    Inside `ray job submit` (RAY_ADDRESS set) or with `address`, the existing cluster is joined;
    otherwise a local cluster is started in-process, the embedded default. A driver that already
    called `ray.init` keeps its cluster.

    Args:
        address: `auto`, `ray://...` or `host:port`; None to use RAY_ADDRESS or start a local cluster.
        **kwargs: Passed to `ray.init` (e.g. `num_cpus`, `include_dashboard`).
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs.setdefault("log_to_driver", True)
    kwargs.setdefault("configure_logging", True)
    return ray.init(address=address, **kwargs)
