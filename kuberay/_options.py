"""What a run config does not say about the Kubernetes side, and the names and paths derived from it."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kuberay import _pods

API_VERSION = "ray.io/v1"
RAY_VERSION = "2.60.0"  # the Ray of kuberay/Dockerfile's base image; keep both in step
DEFAULT_IMAGE = "llmopt:0.1.0"  # the tag kuberay/Dockerfile documents; push it under your registry
API_KEYS_ENV = "LLMOPT_API_KEYS"  # serving.api_keys_env set on the cluster when the config sets none
API_KEYS_SECRET_KEY = "api-keys"  # the key inside the Secret holding comma-separated API keys
LLM_APP = "serve_apps.llm:app"
LLM_APPS = (LLM_APP,)
# KubeRay appends 6 characters to RayJob and RayService names for their RayClusters (max 53).
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47, "RayService": 47}


class KubeRayOptions(BaseModel):
    """What a run config does not say about the Kubernetes side (image, namespace, limits, policies)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="Resource name; default: the run config's name, DNS-1035.")
    namespace: str = Field("default", description="Namespace of the resource.")
    image: str = Field(DEFAULT_IMAGE, description="Image with Ray and llmopt (kuberay/Dockerfile).")
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = Field(
        "IfNotPresent", description="Pull policy of every container."
    )
    service_account: str | None = Field(None, description="Service account of the Ray pods.")
    head_cpus: float = Field(1.0, gt=0, description="CPUs of the head pod (GCS, dashboard, drivers).")
    head_memory_gb: float = Field(4.0, gt=0, description="Memory of the head pod in GiB.")
    worker_memory_gb: float = Field(
        4.0, gt=0, description="Memory per worker when resources.memory_gb_per_worker is unset (GiB)."
    )
    node_overhead_gb: float = Field(
        1.0, ge=0, description="Memory added to each worker pod for the raylet and object store (GiB)."
    )
    runs_claim: str | None = Field(
        None,
        description="ReadWriteMany PersistentVolumeClaim mounted at /home/ray/runs on every pod (shared "
        "checkpoints and run directories); default: a per-pod emptyDir.",
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on resources and pods.")
    idle_timeout_s: int = Field(60, ge=0, description="Autoscaler: idle seconds before a worker pod goes.")
    # RayJob
    shutdown_after_job_finishes: bool = Field(True, description="Delete the RayJob's cluster when done.")
    ttl_seconds_after_finished: int = Field(
        300, ge=0, description="Seconds the finished cluster is kept (logs) before deletion."
    )
    active_deadline_seconds: int | None = Field(
        86400, ge=1, description="Fail the RayJob after this many seconds (null: no deadline)."
    )
    backoff_limit: int = Field(0, ge=0, description="RayJob retries, each on a new RayCluster.")
    working_dir: str | None = Field(
        None, description="Remote working_dir URI (zip/https/s3) for the job's runtime_env; default: image."
    )
    # RayService
    auth: bool = Field(True, description="Require API keys (from a Secret) on the Serve endpoints.")
    api_keys_secret: str | None = Field(
        None, description="Secret holding the key `api-keys`; default: <name>-api-keys."
    )
    throughput_optimized: bool = Field(
        False,
        description="RayService: Ray Serve's high-throughput mode on every pod (Ray 2.55+): HAProxy instead "
        "of the Python proxy, ingress replicas listening directly, gRPC between deployments.",
    )
    upgrade_strategy: Literal["NewCluster", "NewClusterWithIncrementalUpgrade", "None"] = Field(
        "NewCluster",
        description="RayService upgrades: blue/green on a new cluster; a new cluster that takes the traffic "
        "step by step through a Gateway (KubeRay 1.5+, feature gate RayServiceIncrementalUpgrade); or in "
        "place.",
    )
    gateway_class: str | None = Field(
        None,
        description="Incremental upgrades: the Gateway API GatewayClass that shifts traffic (e.g. istio); "
        "required for NewClusterWithIncrementalUpgrade.",
    )
    upgrade_step_percent: int = Field(
        10, ge=1, le=100, description="Incremental upgrades: traffic moved to the new cluster per step, %."
    )
    upgrade_interval_s: int = Field(60, ge=1, description="Incremental upgrades: seconds between steps.")
    upgrade_max_surge_percent: int = Field(
        100, ge=1, le=100, description="Incremental upgrades: capacity the new cluster may add per step, %."
    )

    @model_validator(mode="after")
    def _incremental_needs_gateway(self) -> KubeRayOptions:
        if self.upgrade_strategy == "NewClusterWithIncrementalUpgrade" and not self.gateway_class:
            raise ValueError(
                "upgrade_strategy NewClusterWithIncrementalUpgrade shifts traffic through a Gateway: pass "
                "--gateway-class (the GatewayClass of your Gateway API implementation, e.g. istio)"
            )
        return self

    # RayCluster
    min_workers: int | None = Field(None, ge=0, description="RayCluster: fewest worker pods (default 0).")
    max_workers: int | None = Field(
        None, ge=1, description="RayCluster: most worker pods (default: the config's workers/replicas)."
    )


def resource_name(text: str, kind: str) -> str:
    """A valid name for `kind`: a DNS-1035 label (lowercase, starts with a letter) within KubeRay's limit."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower())
    name = re.sub(r"-+", "-", name).lstrip("-0123456789")
    name = name[: MAX_NAME_LENGTH[kind]].rstrip("-")
    if not name:
        raise ValueError(f"cannot make a {kind} name from {text!r}; pass a name such as 'llm'")
    return name


def image_path(path: str | Path, repo_root: Path) -> str:
    """Where a repository file (a run config) lies inside the image built by kuberay/Dockerfile.

    Raises:
        ValueError: the file is outside the repository, so the image does not hold it.
    """
    path = Path(path)
    if not path.is_absolute():
        path = Path.cwd() / path
    try:
        relative = path.resolve().relative_to(repo_root.resolve())
    except ValueError:
        raise ValueError(
            f"{path} is outside the repository {repo_root}, so the image does not contain it: put the "
            "config under jobs/configs/ and rebuild the image, or serve it from a remote working_dir"
        ) from None
    return str(PurePosixPath(_pods.APP_DIR, *relative.parts))
