"""LLMServer autoscales on the local Ray cluster: up to max_replicas under load, back to min_replicas after
(either engine inside the replicas).

Autoscaling comes from the run config (serving.autoscaling.*). Concurrent streamed requests keep more
requests in flight than target_ongoing_requests; the test waits (generous deadlines, no timing asserts)
for Serve to report two running replicas, stops the load and waits for one again.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests._serve import ENGINES, engine_overrides
from tests._serve import free_port as _free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

APP, PREFIX = "llm-autoscaling", "/autoscaling"  # its own name and route: no clash with other modules
OVERRIDES = [
    "model.max_seq_len=128",
    "serving.autoscaling.min_replicas=1",
    "serving.autoscaling.max_replicas=2",
    "serving.autoscaling.target_ongoing_requests=1",
    "serving.autoscaling.upscale_delay_s=0",
    "serving.autoscaling.downscale_delay_s=2",
    "serving.max_new_tokens=96",
    "resources.cpus_per_worker=0.5",
]
DEADLINE_S = 180


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(ray_cluster, repo, engine):
    """The app deployed with autoscaling; its base URL. Deletes it (and Serve, if started here) after."""
    from ray import serve

    # `python -m pytest` (the Makefile) puts the repository on sys.path; a bare `pytest` does not.
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from serve_apps.llm import app

    started_here = not serve.status().proxies
    if started_here:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    else:  # another module's Serve instance: its proxy's port (Ray has no public getter for it)
        from ray.serve.context import _get_global_client

        port = _get_global_client().http_config.port
    try:
        serve.run(app({"overrides": OVERRIDES + engine_overrides(engine)}), name=APP, route_prefix=PREFIX)
        yield f"http://127.0.0.1:{port}{PREFIX}"
    finally:
        serve.delete(APP)
        if started_here:
            serve.shutdown()


def _running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications[APP].deployments["LLMServer"]
    return deployment.replica_states.get("RUNNING", 0)


def _wait_for_replicas(n: int, errors: list[str]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        assert not errors, errors[:3]
        if _running_replicas() == n:
            return
        time.sleep(1)
    pytest.fail(
        f"LLMServer did not reach {n} running replica(s) within {DEADLINE_S} s: {_running_replicas()}"
    )


def _load(url: str, stop: threading.Event, errors: list[str]) -> int:
    """Stream long completions back to back until `stop`; the number completed."""
    body = {"prompt": "Once upon a time", "max_tokens": 96, "temperature": 1.0, "stream": True}
    done = 0
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            try:
                with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        errors.append(f"{response.status_code}: {response.read()[:300]!r}")
                        return done
                    for _ in response.iter_lines():
                        pass
                done += 1
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
                return done
    return done


def test_llm_server_scales_up_under_load_and_back_down(server):
    assert httpx.get(f"{server}/health", timeout=30).status_code == 200
    assert _running_replicas() == 1
    stop, errors = threading.Event(), []
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(_load, server, stop, errors) for _ in range(6)]
        try:
            _wait_for_replicas(2, errors)
        finally:
            stop.set()
        completed = sum(f.result() for f in futures)
    assert not errors, errors[:3]
    assert completed > 0
    _wait_for_replicas(1, errors)
    assert httpx.get(f"{server}/health", timeout=30).status_code == 200
