"""Schema-driven fuzzing of the served OpenAPI document with schemathesis, bodies included: valid and invalid
bodies for every operation; zero 5xx, zero truncated streams and zero replica restarts.

The status codes of every case are counted and printed at the end (`pytest -s` shows them).
"""

from __future__ import annotations

import collections
import sys

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests._serve import free_port as _free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CASES_PER_OPERATION = 300
OVERRIDES = [
    "model.max_seq_len=96",
    "serving.batching.max_batch_size=8",
    "serving.max_new_tokens=8",
    "serving.max_n=4",
    "serving.max_prompts=8",
    "resources.cpus_per_worker=1",
]
STATUSES: collections.Counter = collections.Counter()


@pytest.fixture(scope="module")
def server(ray_cluster, repo):
    from ray import serve

    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from serve_apps.llm import app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app({"overrides": OVERRIDES}), name="llm", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        replica = httpx.get(f"{url}/api/v1/stats", timeout=60).json()["replica"]
        yield url
        assert httpx.get(f"{url}/api/v1/stats", timeout=60).json()["replica"] == replica, (
            "a replica restarted"
        )
        print(f"\nfuzzing: {sum(STATUSES.values())} cases, status codes {dict(sorted(STATUSES.items()))}")
        assert not [s for s in STATUSES if s >= 500]
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def api(server):
    return schemathesis.openapi.from_url(f"{server}/openapi.json")


OPERATIONS = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/api/v1/model/generate"),
    ("POST", "/api/v1/model/batch-generate"),
]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_no_request_gets_a_5xx_or_a_cut_stream(server, api, method, path, mode):
    """Bodies drawn from the document (valid ones, and ones that break it: wrong types, out-of-range values,
    missing fields, extra nesting); each is sent and its answer checked."""
    operation = api[path][method]
    # Cases are drawn by schemathesis' strategy (hypothesis) rather than its pytest plugin, whose lazy
    # fixture loader does not run under pytest 9.

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=CASES_PER_OPERATION // 2,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def check(case):
        response = case.call(base_url=server, timeout=120)  # a cut chunked body raises here
        STATUSES[response.status_code] += 1
        assert response.status_code < 500, (path, case.body, response.text[:500])
        assert "Traceback" not in response.text
        body = case.body if isinstance(case.body, dict) else {}
        if response.status_code == 200 and body.get("stream") is True and path.startswith("/v1/"):
            assert response.text.rstrip().endswith("data: [DONE]"), response.text[-500:]

    check()
