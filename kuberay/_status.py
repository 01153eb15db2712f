"""What a RayJob, RayService or RayCluster status says: finished or not, succeeded or not, and why.

Field names follow the KubeRay CRDs' status schemas: a RayJob's `jobDeploymentStatus` (the operator's
view: Initializing, Running, Complete, Failed, ...) and `jobStatus` (Ray's: PENDING, RUNNING,
SUCCEEDED, FAILED, STOPPED); a RayService's condition `Ready` (and `UpgradeInProgress`) with the
deprecated `serviceStatus` as a fallback; a RayCluster's `state` and condition `HeadPodReady`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

JOB_DEPLOYMENT_TERMINAL = {"Complete", "Failed", "ValidationFailed"}
JOB_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass(frozen=True)
class Phase:
    """Where a resource stands: `done` (nothing more will happen without a change), `ok`, and a summary."""

    done: bool
    ok: bool
    summary: str


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == kind:
            return condition
    return None


def _because(*parts: Any) -> str:
    text = ": ".join(str(p) for p in parts if p)
    return f" ({text})" if text else ""


def rayjob_phase(obj: dict[str, Any]) -> Phase:
    """A RayJob is done when its deployment status is terminal; ok when its Ray job SUCCEEDED."""
    status = obj.get("status") or {}
    deployment = status.get("jobDeploymentStatus") or "New"
    job = status.get("jobStatus") or "-"
    summary = f"deployment {deployment}, job {job}"
    if deployment in JOB_DEPLOYMENT_TERMINAL:
        ok = deployment == "Complete" and job == "SUCCEEDED"
        if not ok:
            summary += _because(status.get("reason"), status.get("message"))
        return Phase(done=True, ok=ok, summary=summary)
    return Phase(done=False, ok=False, summary=summary)


def rayservice_phase(obj: dict[str, Any]) -> Phase:
    """A RayService is done (for `wait`) once Ready=True; it never fails for good on its own."""
    status = obj.get("status") or {}
    ready = _condition(status, "Ready")
    upgrading = _condition(status, "UpgradeInProgress")
    endpoints = status.get("numServeEndpoints")
    if ready is not None:
        is_ready = ready.get("status") == "True"
        summary = f"Ready={ready.get('status')}" + _because(ready.get("reason"), ready.get("message"))
    else:  # operators older than the conditions
        is_ready = status.get("serviceStatus") == "Running"
        summary = f"serviceStatus {status.get('serviceStatus') or '-'}"
    if endpoints is not None:
        summary += f", {endpoints} serve endpoint(s)"
    if upgrading is not None and upgrading.get("status") == "True":
        summary += ", upgrade in progress"
    apps = ((status.get("activeServiceStatus") or {}).get("applicationStatuses")) or {}
    for app, app_status in apps.items():
        summary += f", app {app} {app_status.get('status', '-')}"
    return Phase(done=is_ready, ok=is_ready, summary=summary)


def raycluster_phase(obj: dict[str, Any]) -> Phase:
    """A RayCluster is done (for `wait`) once ready: state `ready` or condition HeadPodReady=True."""
    status = obj.get("status") or {}
    head_ready = _condition(status, "HeadPodReady")
    state = status.get("state") or "-"
    ready = state == "ready" or (head_ready is not None and head_ready.get("status") == "True")
    summary = f"state {state}, {status.get('readyWorkerReplicas', 0)} worker(s) ready"
    if head_ready is not None and not ready:
        summary += _because(head_ready.get("reason"), head_ready.get("message"))
    failed = state == "failed"
    if failed:
        summary += _because(status.get("reason"))
    return Phase(done=ready or failed, ok=ready, summary=summary)


PHASES = {"RayJob": rayjob_phase, "RayService": rayservice_phase, "RayCluster": raycluster_phase}


def phase(obj: dict[str, Any]) -> Phase:
    """The phase of any of the three kinds."""
    kind = obj.get("kind")
    if kind not in PHASES:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(PHASES)}")
    return PHASES[kind](obj)
