"""Binaries from Debian's packages for the tests that start real services: found on PATH, or installed (as
root, with apt) on first use; otherwise the test is skipped, saying why."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def debian_binary(name: str, package: str) -> str:
    """The path of `name`, installing Debian's `package` if need be."""
    found = shutil.which(name)
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
            env=env,
            capture_output=True,
            timeout=600,
        )
        found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} not found and Debian's `{package}` could not be installed (needs root and apt)")
    return found
