"""Debian's `redis-server` for the tests that need Redis: found on PATH, or installed (as root, with apt) on
first use, then started by the test on a free loopback port and stopped by it; without it the test is
skipped, saying why."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator

from tests._debian import debian_binary
from tests._serve import free_port


def redis_binary() -> str:
    return debian_binary("redis-server", "redis-server")


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
