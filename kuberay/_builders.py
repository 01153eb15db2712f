"""RayJob, RayService and RayCluster custom resources (ray.io/v1) built from llmopt run configs.

Sizing follows the run config: one Ray worker pod per training worker (RayJob) or per model replica
(RayService), each with `resources.cpus_per_worker` CPUs (rounded up to whole CPUs, which is what
KubeRay advertises to Ray), `resources.gpus_per_worker` GPUs (rounded up) and
`resources.memory_gb_per_worker` (or `KubeRayOptions.worker_memory_gb`) plus
`KubeRayOptions.node_overhead_gb` for the node's raylet and object store. The head advertises no CPUs
(`num-cpus: "0"`), so training workers and model replicas never land next to the GCS and the dashboard.
"""

from __future__ import annotations

import copy
import math
import shlex
from collections.abc import Sequence
from typing import Any, Literal

import yaml

from kuberay import _pods
from kuberay._options import (
    API_KEYS_ENV,
    API_KEYS_SECRET_KEY,
    API_VERSION,
    LLM_APP,
    LLM_APPS,
    RAY_VERSION,
    KubeRayOptions,
    resource_name,
)
from llmopt.cluster import SERVE_THROUGHPUT_ENV
from llmopt.config import RunConfig
from llmopt.deployment import INGRESS, SERVER, deployment_options


def _labels(config: RunConfig, options: KubeRayOptions, component: str) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "llmopt",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "llmopt",
        "llmopt.io/run": resource_name(config.name, "RayCluster")[:63],
    }
    return {**labels, **options.labels}


def _metadata(name: str, options: KubeRayOptions, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": options.namespace, "labels": dict(labels)}


def _gpus(config: RunConfig, per_replica: float | None = None) -> int:
    amount = config.resources.gpus if per_replica is None else per_replica
    return math.ceil(amount)


def _worker_memory(config: RunConfig, options: KubeRayOptions) -> float:
    return (config.resources.memory_gb_per_worker or options.worker_memory_gb) + options.node_overhead_gb


def _head_group(
    options: KubeRayOptions,
    labels: dict[str, str],
    *,
    extra_ports: dict[str, int],
    env: list[dict[str, Any]],
    autoscaling: bool,
) -> dict[str, Any]:
    container = _pods.ray_container(
        name="ray-head",
        image=options.image,
        pull_policy=options.image_pull_policy,
        cpus=options.head_cpus,
        memory_gib=options.head_memory_gb,
        gpus=0,
        container_ports={**_pods.HEAD_PORTS, **extra_ports},
        env=env,
    )
    template = _pods.pod_template(
        container,
        labels=labels,
        runs_claim=options.runs_claim,
        service_account=options.service_account,
        gpus=0,
        kubernetes_api=autoscaling,
    )
    return {
        # ClusterIP: the dashboard, GCS and client ports are reachable inside the cluster only
        # (`kubectl port-forward` for people); no Ingress, no LoadBalancer, no NodePort.
        "serviceType": "ClusterIP",
        "enableIngress": False,
        # dashboard-host 0.0.0.0 binds the pod IP, which the operator, the job submitter and the
        # ClusterIP service need; num-cpus 0 keeps workloads off the head.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": template,
    }


def _worker_group(
    group: str,
    options: KubeRayOptions,
    labels: dict[str, str],
    *,
    cpus: float,
    memory_gib: float,
    gpus: int,
    replicas: int,
    min_replicas: int,
    max_replicas: int,
    extra_ports: dict[str, int],
    env: list[dict[str, Any]],
) -> dict[str, Any]:
    container = _pods.ray_container(
        name="ray-worker",
        image=options.image,
        pull_policy=options.image_pull_policy,
        cpus=max(1, math.ceil(cpus)),
        memory_gib=memory_gib,
        gpus=gpus,
        container_ports={"metrics": _pods.HEAD_PORTS["metrics"], **extra_ports},
        env=env,
    )
    template = _pods.pod_template(
        container,
        labels=labels,
        runs_claim=options.runs_claim,
        service_account=options.service_account,
        gpus=gpus,
    )
    return {
        "groupName": group,
        "replicas": replicas,
        "minReplicas": min_replicas,
        "maxReplicas": max(max_replicas, 1),
        "rayStartParams": {},
        "template": template,
    }


def _cluster_spec(
    head: dict[str, Any], workers: list[dict[str, Any]], options: KubeRayOptions, autoscaling: bool
) -> dict[str, Any]:
    spec: dict[str, Any] = {"rayVersion": RAY_VERSION, "enableInTreeAutoscaling": autoscaling}
    if autoscaling:
        spec["autoscalerOptions"] = {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": options.idle_timeout_s,
            "imagePullPolicy": options.image_pull_policy,
            "resources": _pods.resources(0.5, 0.5),
            "securityContext": _pods.container_security_context(),
        }
    spec["headGroupSpec"] = head
    spec["workerGroupSpecs"] = workers
    return spec


def _with_output_dir(overrides: Sequence[str]) -> list[str]:
    """Overrides plus output_dir on the runs volume, unless they set an output_dir already."""
    overrides = list(overrides)
    if not any(o.startswith("output_dir=") for o in overrides):
        overrides.append(f"output_dir={_pods.RUNS_DIR}")
    return overrides


def build_rayjob(
    config: RunConfig,
    *,
    config_path: str,
    overrides: Sequence[str] = (),
    job: Literal["finetune", "tune"] = "finetune",
    job_args: Sequence[str] = (),
    options: KubeRayOptions | None = None,
) -> dict[str, Any]:
    """A RayJob running `python -m jobs.<job> --config ...` on its own RayCluster, deleted when done.

    Args:
        config: The run config (with `overrides` applied), which sizes the worker group.
        config_path: The config's path inside the image (`image_path`), given to the job.
        overrides: `a.b=value` overrides passed to the job after the config.
        job: `finetune` (Ray Train) or `tune` (a strategy search; its trials share the worker group,
            which autoscales from one trial's workers up to twice that).
        job_args: Extra arguments of the job module (e.g. `--run-dir`).
        options: Kubernetes-side settings.

    Returns:
        The RayJob as a dict, ready for YAML or the API server.
    """
    options = options or KubeRayOptions()
    name = resource_name(options.name or config.name, "RayJob")
    labels = _labels(config, options, job)
    par = config.parallelism
    workers = par.num_workers
    if job == "tune":
        low, high, autoscaling = workers, 2 * workers, True
    elif par.min_workers is not None and par.min_workers < workers:
        low, high, autoscaling = par.min_workers, workers, True  # elastic training
    else:
        low, high, autoscaling = workers, workers, False
    head = _head_group(options, labels, extra_ports={}, env=[], autoscaling=autoscaling)
    group = _worker_group(
        job,
        options,
        labels,
        cpus=config.resources.cpus_per_worker,
        memory_gib=_worker_memory(config, options),
        gpus=_gpus(config),
        replicas=workers,
        min_replicas=low,
        max_replicas=high,
        extra_ports={},
        env=[],
    )
    command = [
        "python",
        "-m",
        f"jobs.{job}",
        "--config",
        config_path,
        *job_args,
        *_with_output_dir(overrides),
    ]
    runtime_env: dict[str, Any] = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}}
    if options.working_dir:
        runtime_env["working_dir"] = options.working_dir
    submitter = {
        "metadata": {"labels": dict(labels)},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": _pods.pod_security_context(),
            "automountServiceAccountToken": False,
            # KubeRay fills in the `ray job submit` command and the dashboard address.
            "containers": [
                {
                    "name": "ray-job-submitter",
                    "image": options.image,
                    "imagePullPolicy": options.image_pull_policy,
                    "resources": _pods.resources(0.5, 1.0),
                    "securityContext": _pods.container_security_context(),
                }
            ],
        },
    }
    spec: dict[str, Any] = {
        "entrypoint": shlex.join(command),
        "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=False),
        "shutdownAfterJobFinishes": options.shutdown_after_job_finishes,
        "ttlSecondsAfterFinished": options.ttl_seconds_after_finished,
        "backoffLimit": options.backoff_limit,
    }
    if options.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = options.active_deadline_seconds
    spec["submissionMode"] = "K8sJobMode"
    spec["submitterPodTemplate"] = submitter
    spec["rayClusterSpec"] = _cluster_spec(head, [group], options, autoscaling)
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": _metadata(name, options, labels),
        "spec": spec,
    }


def llm_application(config_path: str | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The Serve `applications` entry of `serve_apps.llm:app` for a run config (as in llm.yaml).

    Args:
        config_path: The run config's path where the application runs (inside the image); `None` for the
            built-in default run config, which the application builder loads when `args` names none.
        overrides: `a.b=value` overrides of that config.

    Returns:
        The application entry, with no deployment options yet.
    """
    args: dict[str, Any] = {} if config_path is None else {"config": config_path}
    if overrides:
        args["overrides"] = list(overrides)
    return {"name": "llm", "route_prefix": "/", "import_path": LLM_APP, "args": args, "deployments": []}


def _deployment(app: dict[str, Any], name: str) -> dict[str, Any]:
    deployments = app.setdefault("deployments", [])
    for deployment in deployments:
        if deployment.get("name") == name:
            return deployment
    deployments.append({"name": name})
    return deployments[-1]


def _replica_bounds(deployment: dict[str, Any]) -> tuple[int, int]:
    if "num_replicas" in deployment and deployment["num_replicas"] != "auto":
        return int(deployment["num_replicas"]), int(deployment["num_replicas"])
    scaling = deployment.get("autoscaling_config") or {}
    low = int(scaling.get("min_replicas", 1))
    return low, max(low, int(scaling.get("max_replicas", low)))


def build_rayservice(
    config: RunConfig, application: dict[str, Any], options: KubeRayOptions | None = None
) -> dict[str, Any]:
    """A RayService serving `application` (an entry of a Serve config's `applications`) with autoscaling.

    The application must be `serve_apps.llm:app` with `args.config` a path inside the image (or no
    `args.config`: the default run config); `config` is that run config with the application's overrides
    applied. Deployment options the application leaves out are filled from the run config by
    `llmopt.deployment.deployment_options`, the application builder's own mapping, in the pod layout: the
    model deployment's `autoscaling_config` (or `num_replicas`), `user_config` and `ray_actor_options`,
    one model replica per worker pod; the ingress asks for no CPU so it can run anywhere, the head included
    (`serving.layout=single` has no ingress: the model replicas serve HTTP behind the proxies).
    The worker group spans the model deployment's replica bounds and Ray's autoscaler follows Serve's.
    With `options.auth`, the API keys come from a Secret through `serving.api_keys_env`.

    Returns:
        The RayService as a dict.
    """
    options = options or KubeRayOptions()
    if application.get("import_path") not in LLM_APPS:
        raise ValueError(
            f"application {application.get('name')!r} imports {application.get('import_path')!r}; the "
            f"RayService builder sizes clusters for {LLM_APP} only"
        )
    name = resource_name(options.name or config.name, "RayService")
    labels = _labels(config, options, "serve")
    app = copy.deepcopy(application)
    args = app.setdefault("args", {})
    env: list[dict[str, Any]] = []
    if options.auth:
        env_name = config.serving.api_keys_env or API_KEYS_ENV
        if not config.serving.api_keys_env:
            args["overrides"] = [*args.get("overrides", []), f"serving.api_keys_env={env_name}"]
        secret = options.api_keys_secret or f"{name}-api-keys"
        env.append(_pods.secret_env(env_name, secret, API_KEYS_SECRET_KEY))
    if options.throughput_optimized:  # read by Serve's processes when they start: on every pod
        env += [{"name": key, "value": value} for key, value in SERVE_THROUGHPUT_ENV.items()]

    # The application's own options win; the rest come from the run config through the mapping the app
    # builder uses, in its pod layout (one model replica per worker pod, an ingress that asks for no CPU).
    declared = next((d for d in app.get("deployments", []) if d.get("name") == SERVER), None)
    # `auto` decides from the run config, which cannot see replica bounds that the Serve config's own entry
    # sets: with several replicas, the split layout's ingress keeps sending a session's turns to the replica
    # that holds its cache.
    auto_single = config.serving.layout == "auto" and config.serving.single_layout
    if auto_single and declared and _replica_bounds(declared)[1] > 1:
        args["overrides"] = [*args.get("overrides", []), "serving.layout=split"]
        config = config.model_copy(update={"serving": config.serving.model_copy(update={"layout": "split"})})
    derived = deployment_options(config, kuberay=True)
    server = _deployment(app, SERVER)
    replicas = {"num_replicas", "autoscaling_config"}
    for key, value in derived[SERVER].items():
        if key not in replicas or not replicas & server.keys():  # a fixed count or bounds, never both
            server.setdefault(key, copy.deepcopy(value))
    if INGRESS in derived:
        ingress = _deployment(app, INGRESS)
        for key, value in derived[INGRESS].items():
            ingress.setdefault(key, copy.deepcopy(value))
    elif any(d.get("name") == INGRESS for d in app.get("deployments", [])):
        # Serve fails a config naming a deployment the application does not have, on the cluster, later.
        raise ValueError(
            f"application {application.get('name')!r} sets options of {INGRESS}, which "
            "serving.layout=single does not deploy (its LLMServer replicas serve HTTP); set "
            "serving.layout=split, or move the options to LLMServer"
        )
    for name in config.serving.models:  # each extra model's deployment: the model deployment's options
        extra = _deployment(app, f"{SERVER}-{name}")
        for key, value in server.items():
            if key != "name":
                extra.setdefault(key, copy.deepcopy(value))
    serve_config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": _pods.SERVE_PORT},
        "applications": [app],
    }

    low, high = _replica_bounds(server)
    low, high = (n * (1 + len(config.serving.models)) for n in (low, high))  # a pod per model replica
    actor = server["ray_actor_options"]
    serve_ports = {"serve": _pods.SERVE_PORT}
    head = _head_group(options, labels, extra_ports=serve_ports, env=env, autoscaling=True)
    group = _worker_group(
        "llm",
        options,
        labels,
        cpus=float(actor.get("num_cpus", 1)),
        memory_gib=_worker_memory(config, options),
        gpus=_gpus(config, float(actor.get("num_gpus", 0))),
        replicas=low,
        min_replicas=low,
        max_replicas=high,
        extra_ports=serve_ports,
        env=env,
    )
    upgrade: dict[str, Any] = {"type": options.upgrade_strategy}
    if options.upgrade_strategy == "NewClusterWithIncrementalUpgrade":
        # KubeRay moves the Gateway's traffic to the new cluster stepSizePercent at a time, every
        # intervalSeconds, growing the new cluster by at most maxSurgePercent of the old one's capacity.
        upgrade["clusterUpgradeOptions"] = {
            "gatewayClassName": options.gateway_class,
            "stepSizePercent": options.upgrade_step_percent,
            "intervalSeconds": options.upgrade_interval_s,
            "maxSurgePercent": options.upgrade_max_surge_percent,
        }
    spec = {
        "upgradeStrategy": upgrade,
        "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
        "serveService": {
            "metadata": {"name": f"{name}-serve", "labels": dict(labels)},
            "spec": {
                "type": "ClusterIP",
                "ports": [{"name": "serve", "port": _pods.SERVE_PORT, "targetPort": _pods.SERVE_PORT}],
            },
        },
        "rayClusterConfig": _cluster_spec(head, [group], options, autoscaling=True),
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "RayService",
        "metadata": _metadata(name, options, labels),
        "spec": spec,
    }


def build_raycluster(config: RunConfig, options: KubeRayOptions | None = None) -> dict[str, Any]:
    """A standalone autoscaling RayCluster for interactive `ray job submit` (and `serve deploy`).

    Worker pods are sized like a training worker of `config`; the group scales between
    `options.min_workers` (default 0) and `options.max_workers` (default: the larger of
    `parallelism.num_workers` and `serving.autoscaling.max_replicas`).

    Returns:
        The RayCluster as a dict.
    """
    options = options or KubeRayOptions()
    name = resource_name(options.name or config.name, "RayCluster")
    labels = _labels(config, options, "cluster")
    low = options.min_workers if options.min_workers is not None else 0
    high = options.max_workers or max(config.parallelism.num_workers, config.serving.autoscaling.max_replicas)
    if low > high:
        raise ValueError(f"min_workers={low} exceeds max_workers={high}; raise max_workers")
    head = _head_group(options, labels, extra_ports={"serve": _pods.SERVE_PORT}, env=[], autoscaling=True)
    group = _worker_group(
        "workers",
        options,
        labels,
        cpus=config.resources.cpus_per_worker,
        memory_gib=_worker_memory(config, options),
        gpus=_gpus(config),
        replicas=low,
        min_replicas=low,
        max_replicas=high,
        extra_ports={},
        env=[],
    )
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCluster",
        "metadata": _metadata(name, options, labels),
        "spec": _cluster_spec(head, [group], options, autoscaling=True),
    }
