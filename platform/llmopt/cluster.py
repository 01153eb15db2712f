"""Connecting to Ray: the embedded in-process cluster by default, an existing one when asked."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["HAPROXY_PORT_ENV", "SERVE_THROUGHPUT_ENV", "init_ray", "use_serve_throughput_mode"]

# Ray Serve's high-throughput mode (Ray 2.55 and later; older releases ignore the variables): HAProxy (C)
# takes the Python HTTP proxy's place and forwards to the ingress replicas, which listen themselves ("direct
# ingress"); deployments call each other over gRPC, and user code runs on the replica's own event loop.
SERVE_THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
# HAProxy's stats and Prometheus listeners, which Ray binds on every interface at fixed ports by default.
HAPROXY_PORT_ENV = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}


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


def use_serve_throughput_mode(joined: bool = False) -> dict[str, int]:
    """Turn Serve's high-throughput mode on for a local cluster this process starts next.

    Serve's processes read the settings when they start, and a local cluster's processes inherit this
    process's environment, so this must run before `ray.init` (and before `ray.serve` is imported, for
    the driver's own reading of them). A cluster that is joined keeps the mode it was started with: set
    `SERVE_THROUGHPUT_ENV` in its environment (`ray start`, the KubeRay container's `env`).

    Args:
        joined: Whether this process joins a running cluster instead (then nothing is set).

    Returns:
        HAProxy's extra ports (stats, metrics) by variable name, from the environment or Ray's defaults.

    Raises:
        ValueError: ``joined``; the message names the variables to set on that cluster.
    """
    if joined:
        settings = " ".join(f"{k}={v}" for k, v in SERVE_THROUGHPUT_ENV.items())
        raise ValueError(
            "--throughput-optimized applies to a local cluster this process starts; start the cluster it "
            f"joins with {settings} in its environment instead"
        )
    for name, value in SERVE_THROUGHPUT_ENV.items():
        os.environ.setdefault(name, value)
    # An ingress replica that stops keeps answering for this long so that load balancers in front can take it
    # out first (Ray's default: 30 s, for every `serve.delete` or shutdown). Here the only one in front is the
    # cluster's own HAProxy, which learns of the change within a tenth of a second.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    return {name: int(os.environ.get(name, default)) for name, default in HAPROXY_PORT_ENV.items()}
