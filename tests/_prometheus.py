"""Debian's `prometheus` package for the tests that need Prometheus or promtool: found on PATH, or
installed (as root, with apt) on first use; otherwise the test is skipped, saying why."""

from __future__ import annotations

from tests._debian import debian_binary


def prometheus_binary(name: str) -> str:
    """The path of `name` (`prometheus` or `promtool`), installing Debian's `prometheus` if need be."""
    return debian_binary(name, "prometheus")
