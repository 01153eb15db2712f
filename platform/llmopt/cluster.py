"""Connecting to Ray: the embedded in-process cluster by default, an existing one when asked."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from llmopt.config import ConfigError, ConfigIssue, RunConfig

__all__ = [
    "HAPROXY_BINARY_ENV",
    "HAPROXY_PORT_ENV",
    "SERVE_THROUGHPUT_ENV",
    "check_resources",
    "gpus_have_bf16",
    "init_ray",
    "node_resources",
    "resource_errors",
    "use_serve_throughput_mode",
]

# Ray Serve's high-throughput mode (Ray 2.55 and later; older releases ignore the variables): HAProxy (C)
# takes the Python HTTP proxy's place and forwards to the ingress replicas, which listen themselves ("direct
# ingress"); deployments call each other over gRPC, and user code runs on the replica's own event loop.
SERVE_THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
# HAProxy's stats and Prometheus listeners, at fixed ports by default (on the HTTP host: `llmopt-haproxy`).
HAPROXY_PORT_ENV = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}
HAPROXY_BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"


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
    _use_haproxy_wrapper()
    # An ingress replica that stops keeps answering for this long so that load balancers in front can take it
    # out first (Ray's default: 30 s, for every `serve.delete` or shutdown). Here the only one in front is the
    # cluster's own HAProxy, which learns of the change within a tenth of a second.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    return {name: int(os.environ.get(name, default)) for name, default in HAPROXY_PORT_ENV.items()}


def _use_haproxy_wrapper() -> None:
    """Have Serve start HAProxy through `llmopt-haproxy` (listeners on the HTTP host, dies with its parent).

    A binary the user named in RAY_SERVE_HAPROXY_BINARY_PATH stays the one that runs, behind the wrapper.
    Without the console script (llmopt not installed, only imported), Ray's own way is kept.
    """
    import shutil
    import sys
    from pathlib import Path

    from llmopt.haproxy import REAL_BINARY_ENV

    wrapper = Path(sys.executable).parent / "llmopt-haproxy"
    wrapper = str(wrapper) if wrapper.exists() else shutil.which("llmopt-haproxy")
    if wrapper is None or os.environ.get(HAPROXY_BINARY_ENV) == wrapper:
        return
    if os.environ.get(HAPROXY_BINARY_ENV):
        os.environ.setdefault(REAL_BINARY_ENV, os.environ[HAPROXY_BINARY_ENV])
    os.environ[HAPROXY_BINARY_ENV] = wrapper


# GPUs without native bf16 (compute capability below 8.0), as Ray names them in its `accelerator_type:<name>`
# node resources. Newer GPUs (A100, A10G, L4, L40S, H100, H200, ...) have it.
NO_BF16_GPUS = frozenset(
    {"K80", "M60", "M40", "P4", "P40", "P100", "V100", "T4", "TITAN_V", "Quadro_RTX_6000"}
)
Role = Literal["training", "serving"]


def node_resources() -> list[dict[str, float]]:
    """The resources of every node the connected Ray cluster has or can add.

    Alive nodes come from `ray.nodes()`. An autoscaling cluster (KubeRay's in-tree autoscaler, `ray up`)
    can add node types that have no node yet (a GPU worker group at zero replicas): Ray publishes them
    only through the autoscaler's cluster config, read here through Ray's state API (private, so any
    failure to read it leaves the alive nodes alone).
    """
    import ray

    nodes = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        groups = list(config.node_group_configs) if config is not None else []
        nodes += [{k: float(v) for k, v in g.resources.items()} for g in groups if g.max_count != 0]
    except Exception:  # another Ray version, or no autoscaler state: the alive nodes are the cluster
        pass
    return nodes


def resource_errors(config: RunConfig, nodes: Sequence[Mapping[str, float]], role: Role) -> list[ConfigIssue]:
    """What the cluster's nodes cannot give a training worker or serving replica of `config`, with fixes.

    Checked before any worker starts: Ray would otherwise wait for resources that never come.

    Args:
        config: The run config (its `resources`, `precision` or `serving.precision`, `parallelism`).
        nodes: Each alive node's resources, as `ray.nodes()` reports them (`CPU`, `GPU`,
            `accelerator_type:<name>`, ...).
        role: `training` (Ray Train workers) or `serving` (model replicas).

    Returns:
        The problems found; empty when every worker fits on some node.
    """
    res = config.resources
    gpus = res.gpus
    issues: list[ConfigIssue] = []
    field = "resources.gpus_per_worker" if res.gpus_per_worker else "resources.accelerator"
    asked = (
        f"resources.gpus_per_worker={res.gpus_per_worker:g}" if res.gpus_per_worker else "accelerator='gpu'"
    )
    most_gpus = max((node.get("GPU", 0.0) for node in nodes), default=0.0)
    if gpus > 0 and most_gpus == 0:
        issues.append(
            ConfigIssue(
                field,
                f"{asked} asks for GPUs, but the Ray cluster has none (nodes: {len(nodes)}); run on CPU with "
                "resources.gpus_per_worker=0 (and accelerator=auto or cpu), or join a cluster with GPU nodes "
                "(RAY_ADDRESS=..., or `ray start --num-gpus N` on them)",
            )
        )
    elif gpus > most_gpus:
        issues.append(
            ConfigIssue(
                field,
                f"{asked}: each {'worker' if role == 'training' else 'replica'} needs {gpus:g} GPUs on one "
                f"node, but the largest node has {most_gpus:g}; lower resources.gpus_per_worker to at most "
                f"{most_gpus:g} (use more workers or replicas instead)",
            )
        )
    most_cpus = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
    if res.cpus_per_worker > most_cpus:
        issues.append(
            ConfigIssue(
                "resources.cpus_per_worker",
                f"resources.cpus_per_worker={res.cpus_per_worker:g}, but the largest node has {most_cpus:g} "
                f"CPUs; lower it to at most {most_cpus:g}",
            )
        )
    if role == "training" and gpus and gpus % 1 and config.parallelism.num_workers > 1:
        issues.append(
            ConfigIssue(
                "resources.gpus_per_worker",
                f"resources.gpus_per_worker={gpus:g} with parallelism.num_workers="
                f"{config.parallelism.num_workers}: nccl needs a GPU of its own per rank, and Ray would pack "
                "ranks onto one GPU; use whole GPUs (gpus_per_worker=1)",
            )
        )
    precision, precision_field = (
        (config.precision, "precision")
        if role == "training"
        else (config.serving.precision, "serving.precision")
    )
    if gpus and precision == "bf16" and not gpus_have_bf16(nodes):
        issues.append(
            ConfigIssue(
                precision_field,
                f"{precision_field}='bf16' but the cluster's GPUs ({', '.join(sorted(_gpu_types(nodes)))}) "
                f"have no bf16 units; use {precision_field}=fp16 (or auto, which picks fp32 there)",
            )
        )
    return issues


def _gpu_types(nodes: Sequence[Mapping[str, float]]) -> set[str]:
    return {key.split(":", 1)[1] for node in nodes for key in node if key.startswith("accelerator_type:")}


def gpus_have_bf16(nodes: Sequence[Mapping[str, float]]) -> bool:
    """False when every GPU type Ray reports is one without bf16 units; True otherwise (unknown types too:
    the worker checks its own GPU again)."""
    types = _gpu_types(nodes)
    return not types or not types <= NO_BF16_GPUS


def check_resources(
    config: RunConfig, role: Role, nodes: Sequence[Mapping[str, float]] | None = None
) -> None:
    """Raise a ConfigError when the connected cluster cannot run `config`'s workers (see `resource_errors`).

    Raises:
        ConfigError: naming each field and its fix.
    """
    issues = resource_errors(config, node_resources() if nodes is None else nodes, role)
    if issues:
        raise ConfigError(issues)
