"""A canary rollout through `serving.routes`, the way an operator runs one: `serve deploy` of a config whose
ingress `user_config` holds the split's weights, on a `ray start --head` cluster. A 90/10 split holds,
callers stick to their arm, each arm is scored on held-out rows, and redeploying with new weights
(promotion, then rollback) under load fails no request and restarts no replica."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
ROUTE = "assistant"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from llmopt.models import load_model

    torch.manual_seed(0)
    model = get_peft_model(load_model("tiny-llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("canary") / "v2"
    model.save_pretrained(path)
    return path


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


@pytest.fixture(scope="module")
def deploy(head_node, free_port, adapter, tmp_path_factory):
    """`serve deploy` with given weights (Serve started first on a free port); yields (deploy, URL)."""
    port = free_port()
    started = _run(str(BIN / "serve"), "start", "--address", head_node.gcs, "--http-host", "127.0.0.1",
                   "--http-port", str(port), env=head_node.env)  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    path = tmp_path_factory.mktemp("deploy") / "canary.yaml"
    overrides = [
        "model.max_seq_len=128",
        "serving.engine=native",
        "serving.batching.max_batch_size=8",
        "resources.cpus_per_worker=1",
        f"serving.adapters.v2={adapter}",
        f"serving.routes.{ROUTE}.arms.stable.model=tiny-llama",
        f"serving.routes.{ROUTE}.arms.stable.weight=1",
        f"serving.routes.{ROUTE}.arms.canary.model=tiny-llama:v2",
        f"serving.routes.{ROUTE}.arms.canary.weight=1",
        f"serving.routes.{ROUTE}.eval_samples=8",
    ]

    def run(stable: float, canary: float) -> None:
        weights = {"stable": stable, "canary": canary}
        config = {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": port},
            "applications": [{
                "name": "canary", "route_prefix": "/", "import_path": "serve_apps.llm:app",
                "args": {"overrides": overrides},
                # The operator's knob: the split's weights, applied to the live ingress.
                "deployments": [{"name": "LLMIngress", "user_config": {"routes": {ROUTE: weights}}}],
            }],
        }  # fmt: skip
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        done = _run(
            str(BIN / "serve"), "deploy", str(path), "--address", head_node.dashboard, env=head_node.env
        )
        assert done.returncode == 0, done.stdout + done.stderr

    return run, f"http://127.0.0.1:{port}"


def _ask(url: str, user: str) -> httpx.Response:
    body = {
        "model": ROUTE,
        "prompt": "Reverse the digits: 123",
        "max_tokens": 2,
        "temperature": 0,
        "user": user,
    }
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def _split(url: str, users: list[str]) -> Counter:
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda u: _ask(url, u), users))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][
        :2
    ]
    return Counter(r.headers["x-route-arm"] for r in responses)


def _routes(url: str) -> dict:
    return httpx.get(f"{url}/api/v1/routes", timeout=30).json()["routes"][ROUTE]


def _wait_share(url: str, arm: str, share: float, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _routes(url)["arms"][arm]["share"] == share:
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass  # not answering yet
        time.sleep(1)
    pytest.fail(f"the {arm} arm's share did not reach {share} within {timeout} s")


def test_canary_split_promotion_and_rollback_under_load(deploy):
    run, url = deploy
    run(90, 10)
    _wait_share(url, "canary", 0.1)
    models = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
    assert {ROUTE, "tiny-llama", "tiny-llama:v2"} <= models
    users = [f"user-{i}" for i in range(400)]
    split = _split(url, users)
    print(f"observed split at 90/10 over {len(users)} users: {dict(split)}")
    assert split["canary"] / len(users) == pytest.approx(0.10, abs=0.05), split
    assert len({_ask(url, "user-3").headers["x-route-arm"] for _ in range(3)}) == 1  # sticky per user
    replica = httpx.get(f"{url}/api/v1/stats", timeout=30).json()["replica"]
    served = _routes(url)["arms"]["stable"]["requests"]

    statuses: list[int] = []  # load that runs through both weight changes: every request must be answered
    stop = threading.Event()

    def load(worker: int) -> None:
        i = 0
        while not stop.is_set():
            statuses.append(_ask(url, f"load-{worker}-{i}").status_code)
            i += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    try:
        run(50, 50)  # promotion: the canary takes half
        _wait_share(url, "canary", 0.5)
        promoted = _split(url, users)
        print(f"observed split at 50/50 over {len(users)} users: {dict(promoted)}")
        assert promoted["canary"] / len(users) == pytest.approx(0.5, abs=0.08), promoted
        run(100, 0)  # rollback
        _wait_share(url, "canary", 0.0)
        assert _split(url, users[:100]) == Counter({"stable": 100})
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    print(f"requests under load through both changes: {dict(Counter(statuses))}")
    assert len(statuses) > 20 and set(statuses) == {200}, Counter(statuses)
    assert (
        httpx.get(f"{url}/api/v1/stats", timeout=30).json()["replica"] == replica
    )  # the model replica stayed
    arms = _routes(url)["arms"]
    assert arms["stable"]["requests"] > served + 100  # the ingress kept its counters: it was not replaced
    assert arms["canary"]["requests"] > 40 and arms["stable"]["errors"] == arms["canary"]["errors"] == 0
    assert arms["stable"]["latency_p99_s"] >= arms["stable"]["latency_p50_s"] > 0
    deadline = time.monotonic() + 120  # each arm scored on 8 held-out rows in the background
    while time.monotonic() < deadline and not all(arms[a]["evaluation"] for a in ("stable", "canary")):
        time.sleep(1)
        arms = _routes(url)["arms"]
    for arm in ("stable", "canary"):
        assert arms[arm]["evaluation"]["rows"] == 8 and 0.0 <= arms[arm]["evaluation"]["exact_match"] <= 1.0
