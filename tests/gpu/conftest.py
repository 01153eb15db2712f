"""The GPU tier (`make test-gpu`): real CUDA runs of training, serving and the engine on one GPU.

Every test here is marked `gpu` and skipped where torch sees no CUDA device. The tier is sized to run in
under 8 minutes on one GPU: each fine-tuning run is a single Ray Train worker for a few dozen steps of a
tiny preset, most of its time being start-up.
"""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "tests/gpu/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not HAS_CUDA:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_ray_cluster():
    """A local Ray cluster that sees this host's GPUs (the CPU tier's cluster fixes num_cpus=2)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
