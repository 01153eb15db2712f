"""Debian's `redis-server` for the tests that need Redis: found on PATH, or installed (as root, with apt) on
first use, then started by the test on a free loopback port and stopped by it; without it the test is
skipped, saying why."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests._serve import free_port


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"],
            env=env,
            capture_output=True,
            timeout=600,
        )
        found = shutil.which("redis-server")
    if not found:
        pytest.skip(
            "redis-server not found and Debian's `redis-server` could not be installed (needs root and apt)"
        )
    return found


@contextlib.contextmanager
def redis_server(tmp_path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A fresh redis-server on 127.0.0.1 (no persistence); yields its URL and process, stops it after."""
    port = free_port()
    proc = subprocess.Popen(
        [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"redis-server did not answer on port {port}")
        client.close()
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
