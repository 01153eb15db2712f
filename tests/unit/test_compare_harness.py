"""The compare job's guards: a server is measured only once it lists its model on a port it has to itself."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks.compare import _port_free, _server_env, _vector_isa, _wait_ready
from tests.unit.test_native_decode import HAS_AVX2


class _Models(BaseHTTPRequestHandler):
    served = "other-model"

    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": self.served, "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def straggler():
    """An OpenAI-style server on a loopback port that serves some other model."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_an_answer_for_another_model_is_not_the_server_started(straggler):
    process = _sleeper()
    try:
        with pytest.raises(TimeoutError, match="did not list tiny-llama"):
            _wait_ready(f"http://127.0.0.1:{straggler}", process, "tiny-llama", timeout_s=2.5)
        assert _wait_ready(f"http://127.0.0.1:{straggler}", process, "other-model", timeout_s=5) < 5
    finally:
        process.kill()
        process.wait()


def test_a_server_that_exits_fails_the_wait(straggler):
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait()
    with pytest.raises(RuntimeError, match="exited with 3"):
        _wait_ready(f"http://127.0.0.1:{straggler}", process, "tiny-llama", timeout_s=5)


def test_a_held_port_is_reported_with_its_holder(straggler):
    problem = _port_free(straggler, timeout_s=1.0)
    assert problem is not None and "cannot listen on 127.0.0.1" in problem and "held by" in problem


@pytest.mark.skipif(not HAS_AVX2, reason="this CPU has no AVX2 + FMA")
def test_isa_avx2_limits_every_library_a_server_loads():
    """`compare --isa avx2`: a process started with the servers' environment runs llmopt's AVX2 build and
    torch's AVX2 kernels, whatever this CPU has beyond; the report names the instruction set."""
    args = argparse.Namespace(isa="avx2")
    probe = (
        "import torch; from llmopt.serve.native import load_kernels; "
        "print(load_kernels()[1]); print(torch.backends.cpu.get_cpu_capability())"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=_server_env(args), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    kernels, capability = done.stdout.split("\n")[:2]
    assert kernels.startswith("native AVX2 + FMA"), kernels
    assert capability == "AVX2"
    assert _vector_isa("avx2").startswith("AVX2")
    assert "LLMOPT_NATIVE_ISA" not in _server_env(argparse.Namespace(isa="native"))
