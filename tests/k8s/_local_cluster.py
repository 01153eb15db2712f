"""A real kube-apiserver with etcd on loopback for the `k8s` test tier, and the CRDs made loadable there.

The binary comes from `kuberay/k8s/build-apiserver.sh` (Kubernetes 1.20.2 from Debian's source package,
cached outside the repository); etcd from Debian's `etcd-server`. `LocalCluster` starts both on free
ports of 127.0.0.1 in their own process groups (so nothing they fork survives them), with token
authentication, AlwaysAllow authorization and the service-account flags 1.20 insists on, writes a
kubeconfig, and stops them again (terminate, then kill) and removes its folder.

`crd_for_1_20` takes out what a 1.20 server does not know (the CEL rules), counted so the tests can say
what this tier does not check (the offline tier evaluates the rules).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "kuberay" / "k8s" / "build-apiserver.sh"


def cache_dir() -> Path:
    """Where build-apiserver.sh caches binaries (the same default as the script)."""
    if os.environ.get("LLMOPT_K8S_CACHE"):
        return Path(os.environ["LLMOPT_K8S_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmopt" / "k8s"


def find_apiserver() -> Path | None:
    """$LLMOPT_KUBE_APISERVER, else the newest binary in the build script's cache, else None."""
    if os.environ.get("LLMOPT_KUBE_APISERVER"):
        return Path(os.environ["LLMOPT_KUBE_APISERVER"])
    found = sorted(cache_dir().glob("*/kube-apiserver"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def find_etcd() -> Path | None:
    """$LLMOPT_ETCD, else `etcd` on PATH (Debian's etcd-server), else None."""
    if os.environ.get("LLMOPT_ETCD"):
        return Path(os.environ["LLMOPT_ETCD"])
    found = shutil.which("etcd")
    return Path(found) if found else None


def read_yaml(path: Path) -> Any:
    """One YAML document, with libyaml when PyYAML has it (the CRDs are 1-1.4 MB each)."""
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


# --- the CRDs as a 1.20 server takes them -----------------------------------------------------------


def schema_children(schema: dict[str, Any]):
    """The subschemas of a schema (properties, items, additionalProperties, allOf/anyOf/oneOf/not)."""
    yield from (schema.get("properties") or {}).values()
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            yield schema[key]
    for key in ("allOf", "anyOf", "oneOf"):
        yield from schema.get(key) or []


def _rewrite(schema: dict[str, Any], counts: Counter) -> None:
    rules = schema.pop("x-kubernetes-validations", None)
    if rules is not None:
        counts["CEL rules dropped (x-kubernetes-validations)"] += len(rules)
    for sub in schema_children(schema):
        _rewrite(sub, counts)


def crd_for_1_20(crd: dict[str, Any]) -> tuple[dict[str, Any], Counter]:
    """A copy of `crd` for Kubernetes 1.20, and what was changed (counts by change).

    1.20 predates CEL validation rules (1.25): it would drop `x-kubernetes-validations` silently while
    decoding the CRD; they are dropped here instead, and counted, so the tier says what it does not check
    (the offline tier evaluates them). Everything else is served as written: types, formats, enums,
    required fields, defaults (`default: ""` included: the build applies kube-openapi#230, without which
    1.20 built with today's Go reads "" as null), list/map types, the status subresource.
    """
    crd = copy.deepcopy(crd)
    counts: Counter = Counter()
    for version in crd["spec"]["versions"]:
        _rewrite(version["schema"]["openAPIV3Schema"], counts)
    return crd, counts


# --- processes ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec: SIGTERM when pytest dies
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(process: subprocess.Popen | None, timeout: float = 15.0) -> None:
    if process is None or process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ClusterError(RuntimeError):
    """etcd or kube-apiserver did not come up (the message carries its log's tail)."""


class LocalCluster:
    """etcd + kube-apiserver on 127.0.0.1; use as a context manager (stops both, removes the folder)."""

    TOKEN_USER = "llmopt-test"

    def __init__(self, apiserver: Path, etcd: Path, *, startup_timeout: float = 120.0):
        self.apiserver_bin, self.etcd_bin = apiserver, etcd
        self.startup_timeout = startup_timeout
        self.root = Path(tempfile.mkdtemp(prefix="llmopt-k8s-"))
        self.token = secrets.token_hex(16)
        self.etcd: subprocess.Popen | None = None
        self.apiserver: subprocess.Popen | None = None
        self.port = 0
        self.kubeconfig = self.root / "kubeconfig"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalCluster:
        try:
            self._start_etcd()
            self._start_apiserver()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        _stop(self.apiserver)
        _stop(self.etcd)
        shutil.rmtree(self.root, ignore_errors=True)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (the child keeps it)
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: _stop signals everything it forked
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()

    def _wait(self, name: str, process: subprocess.Popen, ready) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ClusterError(
                    f"{name} exited with {process.returncode}:\n{_tail(self.root / f'{name}.log')}"
                )
            if ready():
                return
            time.sleep(0.25)
        raise ClusterError(
            f"{name} not ready after {self.startup_timeout:g} s:\n{_tail(self.root / f'{name}.log')}"
        )

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self.etcd = self._spawn(
            "etcd",
            [
                str(self.etcd_bin),
                "--name=llmopt-test",
                f"--data-dir={self.root / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=llmopt-test=http://127.0.0.1:{peer}",
            ],
        )

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as answer:
                    return json.load(answer).get("health") == "true"
            except (OSError, ValueError):
                return False

        self._wait("etcd", self.etcd, healthy)

    def _write_keys(self) -> tuple[Path, Path]:
        key, pub = self.root / "sa.key", self.root / "sa.pub"
        try:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import rsa
        except ImportError:
            subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
            subprocess.run(
                ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)],
                check=True,
                capture_output=True,
            )
            return key, pub
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        pub.write_bytes(
            private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return key, pub

    def _start_apiserver(self) -> None:
        key, pub = self._write_keys()
        tokens = self.root / "tokens.csv"
        tokens.write_text(f'{self.token},{self.TOKEN_USER},{self.TOKEN_USER},"system:masters"\n')
        certs = self.root / "certs"
        self.port = free_port()
        self.apiserver = self._spawn(
            "kube-apiserver",
            [
                str(self.apiserver_bin),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                "--insecure-port=0",  # 1.20 still opens an unauthenticated :8080 otherwise
                f"--cert-dir={certs}",
                f"--token-auth-file={tokens}",
                "--anonymous-auth=false",
                "--authorization-mode=AlwaysAllow",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pub}",
                f"--service-account-signing-key-file={key}",
                "--service-cluster-ip-range=10.96.0.0/24",
                "--profiling=false",
                "--logtostderr=true",
                "--v=1",
            ],
        )
        self.ca_file = certs / "apiserver.crt"  # self-signed serving cert (with its CA) written at start

        def ready() -> bool:
            if not self.ca_file.is_file():
                return False
            context = ssl.create_default_context(cafile=str(self.ca_file))
            request = urllib.request.Request(
                f"{self.url}/readyz", headers={"Authorization": f"Bearer {self.token}"}
            )
            try:
                with urllib.request.urlopen(request, timeout=5, context=context) as answer:
                    return answer.status == 200
            except (OSError, urllib.error.HTTPError, ssl.SSLError):
                return False

        self._wait("kube-apiserver", self.apiserver, ready)
        self.kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "llmopt-test",
                            "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                        }
                    ],
                    "users": [{"name": self.TOKEN_USER, "user": {"token": self.token}}],
                    "contexts": [
                        {
                            "name": "llmopt-test",
                            "context": {"cluster": "llmopt-test", "user": self.TOKEN_USER},
                        }
                    ],
                    "current-context": "llmopt-test",
                }
            )
        )

    def log_tail(self, name: str = "kube-apiserver", lines: int = 30) -> str:
        return _tail(self.root / f"{name}.log", lines)


def install_crds(
    api_client: Any, crd_dir: Path, files: list[str], timeout: float = 60.0
) -> dict[str, Counter]:
    """Create the CRDs (rewritten by `crd_for_1_20`) and wait until each is Established and served.

    Returns:
        {CRD name: the changes made to it}.
    """
    from kubernetes import client

    ext = client.ApiextensionsV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    changes = {}
    for filename in files:
        crd, counts = crd_for_1_20(read_yaml(crd_dir / filename))
        ext.create_custom_resource_definition(crd, _preload_content=False)  # skip the models: ~1 MB
        changes[crd["metadata"]["name"]] = counts
    deadline = time.monotonic() + timeout
    for name in changes:
        while True:
            answer = ext.read_custom_resource_definition(name, _preload_content=False)
            status = json.loads(answer.data).get("status") or {}
            established = any(
                c.get("type") == "Established" and c.get("status") == "True"
                for c in status.get("conditions") or []
            )
            if established:
                break
            if time.monotonic() > deadline:
                raise ClusterError(f"CRD {name} not Established after {timeout:g} s: {status}")
            time.sleep(0.2)
        plural, group = name.split(".", 1)
        while True:  # Established comes a moment before the resource is served
            try:
                custom.list_cluster_custom_object(group, "v1", plural, _preload_content=False)
                break
            except client.exceptions.ApiException as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    return changes
