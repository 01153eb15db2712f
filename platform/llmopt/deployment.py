"""Serve deployment options of the LLM application, from a run config: the one mapping the Serve app
builder (`serve_apps.llm:app`) and the RayService renderer (`kuberay`) both use.

Torch-free on purpose: the KubeRay tooling renders manifests on machines that have no torch.
"""

from __future__ import annotations

from typing import Any

from llmopt.config import RunConfig

__all__ = ["INGRESS", "SERVER", "deployment_options"]

SERVER = "LLMServer"
INGRESS = "LLMIngress"


def deployment_args(config: RunConfig) -> dict[str, dict[str, Any]]:
    """The constructor arguments (the config as data) of both deployments.

    What changes at runtime stays out of them, so that changing it reconfigures the live replicas instead
    of replacing them: the model replicas never see `serving.routes`, and the ingress sees the routes with
    every weight 1 (the real ones are its `user_config`).
    """
    data = config.model_dump(mode="json")
    server = {**data, "serving": {**data["serving"], "routes": {}, "models": {}}}
    routes = {
        name: {**route, "arms": {arm: {**spec, "weight": 1.0} for arm, spec in route["arms"].items()}}
        for name, route in data["serving"]["routes"].items()
    }
    ingress = {**data, "serving": {**data["serving"], "routes": routes}}
    return {SERVER: server, INGRESS: ingress}


def model_deployment_args(config: RunConfig) -> dict[str, tuple[str, dict[str, Any]]]:
    """The extra model deployments of `serving.models`: name -> (deployment name, constructor arguments).

    Each is the main model's deployment for another model: the same serving settings and options, its own
    model, no adapters.
    """
    server = deployment_args(config)[SERVER]
    out = {}
    for name, path in config.serving.models.items():
        data = {**server, "model": {**server["model"], "name_or_path": path}}
        data["serving"] = {**server["serving"], "adapters": {}}
        out[name] = (f"{SERVER}-{name}", data)
    return out


def deployment_options(config: RunConfig, *, kuberay: bool = False) -> dict[str, dict[str, Any]]:
    """Options of both deployments (`LLMServer`, `LLMIngress`), as `Deployment.options` and a Serve
    config's `deployments` entries take them.

    The model deployment gets its replicas (fixed or autoscaled), its queue bounds, its resolved batch
    settings as `user_config` (applied by `LLMServer.reconfigure` without a restart) and its actor's CPUs
    and GPUs; the ingress one replica with a sliver of CPU and room for every request the replicas can hold,
    and the weights of `serving.routes` as its `user_config` (applied by `LLMIngress.reconfigure`).

    Args:
        config: The run config (`serving` and `resources`).
        kuberay: The pod layout of a rendered RayService: each worker pod is sized for one model replica
            (`max_replicas_per_node: 1`), and the ingress asks for no CPU, since the head advertises none
            and a worker pod's CPUs are its model replica's.

    Returns:
        `{"LLMServer": {...}, "LLMIngress": {...}}`, or only `{"LLMServer": {...}}` for
        `serving.layout=single` (its replicas serve HTTP too); plain data, safe to dump as YAML.
    """
    serving, res = config.serving, config.resources
    batching, scaling = serving.batching, serving.autoscaling
    ongoing = serving.ongoing_requests
    actor: dict[str, Any] = {"num_cpus": res.cpus_per_worker}
    if res.gpus:
        actor["num_gpus"] = res.gpus
    server: dict[str, Any] = {
        "max_ongoing_requests": ongoing,
        "max_queued_requests": serving.max_queued_requests,
        "ray_actor_options": actor,
        "user_config": {
            "max_batch_size": batching.max_batch_size,
            "batch_wait_timeout_s": batching.wait_timeout_s,  # resolved: never null
        },
        **scaling.serve_options(),
    }
    # The ingress only parses and relays: a sliver of CPU, and room for every request the model replicas can
    # hold or queue, so overload surfaces as the replicas' bounded queue (HTTP 503 + Retry-After).
    queued = max(serving.max_queued_requests, 0)
    ingress = {
        "num_replicas": 1,
        "max_ongoing_requests": scaling.max_replicas * (ongoing + queued) + 16,
        "ray_actor_options": {"num_cpus": 0 if kuberay else 0.1},
    }
    if serving.routes:  # the split's weights: changed on the live ingress by LLMIngress.reconfigure
        ingress["user_config"] = {
            "routes": {n: {a: arm.weight for a, arm in r.arms.items()} for n, r in serving.routes.items()}
        }
    if kuberay:
        server["max_replicas_per_node"] = 1
    if serving.single_layout:
        # One deployment, HTTP and engine in each replica. Serve's own bounds would answer overload with its
        # plain-text 503 before the request reached us (its router counts a burst's requests waiting for a
        # replica as queued, even with room); the replica bounds its generations itself instead
        # (`serve_apps._local.LocalModel`: OpenAI's error body and Retry-After), so Serve lets every request
        # the replica could hold or queue through.
        return {SERVER: {**server, "max_ongoing_requests": ongoing + queued + 16, "max_queued_requests": -1}}
    return {SERVER: server, INGRESS: ingress}
