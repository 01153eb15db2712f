"""The real API-server tier: one kube-apiserver + etcd on loopback per session, with the KubeRay CRDs.

Run it with `make test-k8s` (builds kube-apiserver first, ~7 CPU-minutes once, then cached). A plain
`pytest` / `make test` skips it (it needs the binary and starts servers): it runs when LLMOPT_K8S=1.
`LLMOPT_KUBE_APISERVER` and `LLMOPT_ETCD` name the binaries (default: the build script's cache, and
`etcd` on PATH).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _local_cluster import BUILD_SCRIPT, REPO, LocalCluster, find_apiserver, find_etcd, install_crds

from kuberay._crd import CRD_FILES, default_crd_dir


@pytest.fixture(scope="session")
def cluster():
    """etcd + kube-apiserver on 127.0.0.1 with the KubeRay CRDs installed; stopped after the session."""
    apiserver, etcd = find_apiserver(), find_etcd()
    if apiserver is None or not apiserver.is_file():
        pytest.skip(f"no kube-apiserver binary ({apiserver or 'none cached'}); build it: {BUILD_SCRIPT}")
    if etcd is None:
        pytest.skip(f"no etcd on PATH: apt-get install etcd-server (or run {BUILD_SCRIPT})")
    crd_dir = default_crd_dir()
    if not crd_dir.is_dir():
        pytest.skip(f"no KubeRay CRDs at {crd_dir}")
    from kubernetes import config

    with LocalCluster(apiserver, etcd) as local:
        api_client = config.new_client_from_config(config_file=str(local.kubeconfig))
        local.api_client = api_client
        local.crd_changes = install_crds(api_client, crd_dir, list(CRD_FILES.values()))
        yield local
        api_client.close()


@pytest.fixture(scope="session")
def kube(cluster):
    """Our client, configured from the kubeconfig the tier wrote."""
    from kuberay import KubeRayClient

    return KubeRayClient(cluster.api_client)


@pytest.fixture(scope="session")
def llmopt(cluster):
    """Run `llmopt kuberay ARGS...` with KUBECONFIG pointing at the local server; returns the result."""
    script = Path(sys.executable).with_name("llmopt")
    command = [str(script), "kuberay"] if script.is_file() else [sys.executable, "-m", "kuberay.cli"]
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "COLUMNS": "200", "NO_COLOR": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )

    return run
