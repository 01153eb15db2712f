"""Pod templates for Ray head and worker pods: resources, security contexts, volumes, ports.

Every container gets requests equal to its limits (Guaranteed QoS: Ray sizes itself from the limits,
and a Ray node whose memory is overcommitted gets OOM-killed at random) and a restricted security
context: non-root uid 1000 (the `ray` user of the Ray images), no privilege escalation, every Linux
capability dropped, the runtime's default seccomp profile.
"""

from __future__ import annotations

import copy
import math
from typing import Any

RAY_UID = 1000  # the `ray` user of rayproject/ray images (and of kuberay/Dockerfile)
RAY_GID = 100  # its primary group, `users`
APP_DIR = "/home/ray/app"  # where kuberay/Dockerfile puts the repository (jobs/, serve_apps/, configs)
RUNS_DIR = "/home/ray/runs"  # output_dir of jobs on the cluster: an emptyDir, or a shared claim

# Standard port names: KubeRay builds the head service (and the serve service) from these names.
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}
SERVE_PORT = 8000


def cpu_quantity(cpus: float) -> str:
    """A Kubernetes CPU quantity: whole CPUs as `"2"`, fractions in millicores (`"500m"`)."""
    if cpus <= 0:
        raise ValueError(f"a container needs a positive CPU amount, got {cpus}")
    millis = round(cpus * 1000)
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def memory_quantity(gib: float) -> str:
    """A Kubernetes memory quantity in binary units: whole GiB as `"4Gi"`, otherwise MiB."""
    if gib <= 0:
        raise ValueError(f"a container needs a positive memory amount, got {gib} GiB")
    mib = math.ceil(gib * 1024)
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def resources(cpus: float, memory_gib: float, gpus: int = 0) -> dict[str, Any]:
    """Requests equal to limits for CPU, memory and (when asked) `nvidia.com/gpu`."""
    amounts: dict[str, str] = {"cpu": cpu_quantity(cpus), "memory": memory_quantity(memory_gib)}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def container_security_context() -> dict[str, Any]:
    """The restricted Pod Security Standard for one container."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "runAsGroup": RAY_GID,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    """Pod-level defaults: non-root, volumes group-owned by the `ray` user's group."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "runAsGroup": RAY_GID,
        "fsGroup": RAY_GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def ports(names: dict[str, int]) -> list[dict[str, Any]]:
    """Named TCP container ports."""
    return [{"name": name, "containerPort": port, "protocol": "TCP"} for name, port in names.items()]


def runs_volume(claim: str | None) -> dict[str, Any]:
    """Where jobs write run directories: a shared PersistentVolumeClaim, or a per-pod emptyDir.

    Ray Train workers on several pods write checkpoints under the same path, which only adds up to
    one run directory on a filesystem every pod shares (a ReadWriteMany claim).
    """
    if claim:
        return {"name": "runs", "persistentVolumeClaim": {"claimName": claim}}
    return {"name": "runs", "emptyDir": {}}


def shm_volume() -> dict[str, Any]:
    """A memory-backed /dev/shm: the container default (64 MiB) would push Ray's object store to disk."""
    return {"name": "shm", "emptyDir": {"medium": "Memory"}}


def volume_mounts() -> list[dict[str, Any]]:
    return [{"name": "runs", "mountPath": RUNS_DIR}, {"name": "shm", "mountPath": "/dev/shm"}]


def secret_env(env_name: str, secret: str, key: str) -> dict[str, Any]:
    """An environment variable read from a Secret key (the pod does not start when it is missing)."""
    return {"name": env_name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": False}}}


def ray_container(
    *,
    name: str,
    image: str,
    pull_policy: str,
    cpus: float,
    memory_gib: float,
    gpus: int,
    container_ports: dict[str, int],
    env: list[dict[str, Any]],
) -> dict[str, Any]:
    """The Ray container of a head or worker pod (KubeRay adds the `ray start` command)."""
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": pull_policy,
        "resources": resources(cpus, memory_gib, gpus),
        "securityContext": container_security_context(),
        "volumeMounts": volume_mounts(),
    }
    if container_ports:
        container["ports"] = ports(container_ports)
    if env:
        container["env"] = copy.deepcopy(env)
    return container


def pod_template(
    container: dict[str, Any],
    *,
    labels: dict[str, str],
    runs_claim: str | None,
    service_account: str | None,
    gpus: int,
    kubernetes_api: bool = False,
) -> dict[str, Any]:
    """A pod template around one Ray container.

    Only a head pod running KubeRay's autoscaler sidecar (`kubernetes_api=True`) gets a service-account
    token: Ray itself never calls the Kubernetes API.
    """
    spec: dict[str, Any] = {"securityContext": pod_security_context()}
    if not kubernetes_api:
        spec["automountServiceAccountToken"] = False
    spec["containers"] = [container]
    spec["volumes"] = [runs_volume(runs_claim), shm_volume()]
    if service_account:
        spec["serviceAccountName"] = service_account
    if gpus:
        # GPU nodes are commonly tainted so that only pods asking for GPUs land there.
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": dict(labels)}, "spec": spec}
