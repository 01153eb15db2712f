"""Evaluate the model of a run config on its held-out split, here or as a Ray task sized from the config
(`llmopt eval [--ray]`, `python -m jobs.evaluate`)."""

from __future__ import annotations

import time
from typing import Any

import torch

from llmopt.config import RunConfig
from llmopt.data import EvalResult, evaluate, load_rows
from llmopt.models import load_model, load_tokenizer

__all__ = ["evaluate_config", "evaluate_here", "evaluate_on_ray"]


def evaluate_config(
    config: RunConfig,
    split: str | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> tuple[EvalResult, float]:
    """Load the config's model and tokenizer and evaluate them on a split (default: the held-out one).

    Args:
        config: The run config.
        split: The split (default: `data.eval_split`).
        batch_size: Rows per forward and generate call.
        device: Where the model computes: fp32 on CPU, bf16 on a GPU that has it (else fp32).

    Returns:
        The result and the seconds the evaluation took (loading excluded).
    """
    from llmopt.devices import bf16_supported

    tokenizer = load_tokenizer(config.model)
    dtype = "bf16" if bf16_supported(device) else "fp32"
    model = load_model(config.model, dtype=dtype, device=device)
    rows = load_rows(
        config.data.dataset, split or config.data.eval_split, config.data.format, config.data.max_eval_samples
    )
    start = time.perf_counter()
    result = evaluate(
        model, tokenizer, rows, config.data.prompt_template, config.model.max_seq_len, batch_size
    )
    return result, time.perf_counter() - start


def evaluate_here(config: RunConfig, split: str | None = None) -> dict[str, Any]:
    """Evaluate in this process, on its GPU when the config asks for one, with the config's CPU share.

    Returns:
        The result's figures plus `seconds`, `torch_threads` and `device`.

    Raises:
        llmopt.devices.DeviceError: GPUs asked for and none is here.
    """
    from llmopt.devices import describe_device, local_device
    from llmopt.runtime import set_torch_threads

    threads = set_torch_threads(config.resources.cpus_per_worker)
    device = local_device(config.resources.accelerator, config.resources.gpus)
    result, seconds = evaluate_config(config, split, device=device)
    return {
        **result.to_dict(),
        "seconds": seconds,
        "torch_threads": threads,
        "device": describe_device(device),
    }


def evaluate_on_ray(config: RunConfig, split: str | None = None) -> dict[str, Any]:
    """Evaluate as a Ray task with the config's CPUs and GPUs (the embedded cluster, or RAY_ADDRESS's).

    Returns:
        `evaluate_here`'s figures plus the `node` that ran it.

    Raises:
        ConfigError: the cluster cannot run the task (checked before it starts).
    """
    import ray

    from llmopt.cluster import check_resources, init_ray

    init_ray()
    check_resources(config, "training")

    @ray.remote(num_cpus=config.resources.cpus_per_worker, num_gpus=config.resources.gpus)
    def _evaluate(config: RunConfig, split: str | None) -> dict[str, Any]:
        from transformers.utils import logging as hf_logging

        from llmopt.devices import describe_device, ray_assigned_device
        from llmopt.runtime import set_torch_threads

        hf_logging.disable_progress_bar()
        threads = set_torch_threads(config.resources.cpus_per_worker)
        device = ray_assigned_device(config.resources.accelerator)
        result, seconds = evaluate_config(config, split, device=device)
        return {
            **result.to_dict(),
            "seconds": seconds,
            "torch_threads": threads,
            "device": describe_device(device),
            "node": ray.util.get_node_ip_address(),
        }

    return ray.get(_evaluate.remote(config, split))
