"""A client for RayJob, RayService and RayCluster on the `kubernetes` package's CustomObjectsApi.

KubeRay's own Python client covers RayCluster and RayJob only; this one covers RayService too. Every
API-server error is raised as a `KubeRayError` carrying the HTTP status, the reason and the server's
message (and each field cause of a 422 Invalid), never swallowed or retried silently. Creation and
patches ask for strict field validation, so a field the CRD does not know is an error, not a field
silently dropped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from kuberay._status import Phase, phase

GROUP, VERSION = "ray.io", "v1"
PLURALS = {"RayJob": "rayjobs", "RayService": "rayservices", "RayCluster": "rayclusters"}
KIND_ALIASES = {
    **{kind.lower(): kind for kind in PLURALS},
    **{plural: kind for kind, plural in PLURALS.items()},
    "rayjob": "RayJob",
    "rayservice": "RayService",
    "raycluster": "RayCluster",
}
MERGE_PATCH = "application/merge-patch+json"


class KubeRayError(RuntimeError):
    """An API-server (or connection) error with what was being done and what the server said."""

    def __init__(self, message: str, status: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason


def kind_of(text: str) -> str:
    """`RayJob` from `rayjob`, `rayjobs`, `RayJob`, ..."""
    kind = KIND_ALIASES.get(text.lower())
    if kind is None:
        raise ValueError(f"unknown kind {text!r}; use one of {', '.join(PLURALS)}")
    return kind


def api_error(exc: Exception, action: str) -> KubeRayError:
    """A KubeRayError from an ApiException: status, reason, the server's message and field causes."""
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    body = getattr(exc, "body", None)
    server_message, server_reason, causes = None, None, []
    if body:
        try:
            payload = json.loads(body)
        except (TypeError, ValueError):
            server_message = str(body).strip()[:2000]
        else:
            if isinstance(payload, dict):
                server_message = payload.get("message")
                server_reason = payload.get("reason")
                for cause in (payload.get("details") or {}).get("causes") or []:
                    field = cause.get("field")
                    text = cause.get("message") or cause.get("reason") or ""
                    causes.append(f"{field}: {text}" if field else text)
    head = f"{action} failed: HTTP {status} {reason or ''}".rstrip()
    if server_reason and server_reason != reason:
        head += f" ({server_reason})"
    message = f"{head}: {server_message}" if server_message else head
    # The server's message usually lists the causes already; add those it does not mention.
    extra = [c for c in causes if c and (not server_message or c not in server_message)]
    if extra:
        message += "\n" + "\n".join(f"  - {c}" for c in extra)
    return KubeRayError(message, status=status, reason=server_reason or reason)


def _namespace(obj: dict[str, Any], default: str) -> str:
    return (obj.get("metadata") or {}).get("namespace") or default


class KubeRayClient:
    """Create or patch, read, wait for and delete KubeRay resources.

    Args:
        api_client: A configured `kubernetes.client.ApiClient`; default: from the kubeconfig (or
            the in-cluster service account when running in a pod).
        context: kubeconfig context to use (default: the current one).
        field_manager: Recorded as the manager of the fields this client writes.
    """

    def __init__(self, api_client: Any = None, *, context: str | None = None, field_manager: str = "llmopt"):
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_kube_config(context=context)
            except Exception as kube_exc:
                try:
                    config.load_incluster_config()
                except config.ConfigException:
                    raise KubeRayError(
                        f"no Kubernetes configuration: {kube_exc}; set KUBECONFIG or ~/.kube/config "
                        "(e.g. `kind create cluster`), or run inside a pod with a service account"
                    ) from None
            api_client = client.ApiClient()
        self.api = client.CustomObjectsApi(api_client)
        self.field_manager = field_manager

    def _call(self, action: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(GROUP, VERSION, *args, **kwargs)
        except ApiException as exc:
            raise api_error(exc, action) from None
        except (HTTPError, OSError) as exc:
            host = self.api.api_client.configuration.host
            raise KubeRayError(f"{action} failed: cannot reach the API server at {host}: {exc}") from None

    def apply(
        self, obj: dict[str, Any], *, namespace: str = "default", dry_run: bool = False
    ) -> tuple[str, dict]:
        """Create the resource, or merge-patch it when it exists already.

        Args:
            obj: A RayJob, RayService or RayCluster (apiVersion ray.io/v1).
            namespace: Used when the object's metadata names none.
            dry_run: Server-side dry run (`dryRun=All`): validated and defaulted, not stored.

        Returns:
            (`created` or `configured`, the object the server returned).
        """
        kind = kind_of(obj.get("kind", ""))
        if obj.get("apiVersion") != f"{GROUP}/{VERSION}":
            raise KubeRayError(f"apiVersion {obj.get('apiVersion')!r} is not {GROUP}/{VERSION}")
        name = obj["metadata"]["name"]
        ns = _namespace(obj, namespace)
        extra = {"field_manager": self.field_manager, "field_validation": "Strict"}
        if dry_run:
            extra["dry_run"] = "All"
        try:
            created = self._call(
                f"create {kind} {ns}/{name}",
                self.api.create_namespaced_custom_object,
                ns,
                PLURALS[kind],
                obj,
                **extra,
            )
            return "created", created
        except KubeRayError as exc:
            if exc.status != 409:
                raise
        patched = self._call(
            f"patch {kind} {ns}/{name}",
            self.api.patch_namespaced_custom_object,
            ns,
            PLURALS[kind],
            name,
            obj,
            _content_type=MERGE_PATCH,
            **extra,
        )
        return "configured", patched

    def get(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any]:
        """The resource as the server has it (status included)."""
        kind = kind_of(kind)
        return self._call(
            f"get {kind} {namespace}/{name}",
            self.api.get_namespaced_custom_object,
            namespace,
            PLURALS[kind],
            name,
        )

    def list(self, kind: str, namespace: str = "default", label_selector: str | None = None) -> list[dict]:
        """Resources of a kind in a namespace."""
        kind = kind_of(kind)
        extra = {"label_selector": label_selector} if label_selector else {}
        result = self._call(
            f"list {PLURALS[kind]} in {namespace}",
            self.api.list_namespaced_custom_object,
            namespace,
            PLURALS[kind],
            **extra,
        )
        return list(result.get("items") or [])

    def status(self, kind: str, name: str, namespace: str = "default") -> tuple[dict[str, Any], Phase]:
        """The resource and its phase (done, ok, summary)."""
        obj = self.get(kind, name, namespace)
        obj.setdefault("kind", kind_of(kind))
        return obj, phase(obj)

    def wait(
        self,
        kind: str,
        name: str,
        namespace: str = "default",
        *,
        timeout_s: float = 3600.0,
        poll_s: float = 5.0,
        on_change: Callable[[Phase], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> Phase:
        """Poll until a RayJob finishes, a RayService is Ready or a RayCluster is ready.

        Returns:
            The final phase (`ok` False for a failed RayJob).

        Raises:
            KubeRayError: an API error, or `timeout_s` passed first (status 408).
        """
        deadline = clock() + timeout_s
        last = None
        while True:
            _, current = self.status(kind, name, namespace)
            if current != last and on_change is not None:
                on_change(current)
            last = current
            if current.done:
                return current
            if clock() >= deadline:
                raise KubeRayError(
                    f"{kind_of(kind)} {namespace}/{name} not done after {timeout_s:g} s: {current.summary}",
                    status=408,
                    reason="Timeout",
                )
            sleep(poll_s)

    def delete(
        self, kind: str, name: str, namespace: str = "default", *, propagation: str = "Foreground"
    ) -> dict[str, Any]:
        """Delete a resource; KubeRay deletes the clusters, pods and services it created for it."""
        kind = kind_of(kind)
        return self._call(
            f"delete {kind} {namespace}/{name}",
            self.api.delete_namespaced_custom_object,
            namespace,
            PLURALS[kind],
            name,
            propagation_policy=propagation,
        )
