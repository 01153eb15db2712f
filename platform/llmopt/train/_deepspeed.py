"""DeepSpeed engine config generated from the run schema; a user's raw JSON overrides its keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmopt.config import RunConfig, deep_merge


def _load_user_config(raw: str | dict | None) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return raw
    path = Path(raw)
    if not path.is_file():
        raise FileNotFoundError(
            f"parallelism.deepspeed_config={raw!r} is not a file; "
            "give a path to a DeepSpeed JSON or a mapping"
        )
    return json.loads(path.read_text())


def build_deepspeed_config(config: RunConfig, world_size: int, precision: str) -> dict[str, Any]:
    """Generate the DeepSpeed config for a run.

    The optimizer is not declared here: the worker passes a client `torch.optim.AdamW` (with
    `zero_allow_untested_optimizer`), which avoids compiling DeepSpeed's fused/CPU Adam C++ ops on CPU.
    With optimizer offload the states move to host memory all the same.

    Args:
        config: The run config.
        world_size: Data-parallel workers.
        precision: `fp32`, `bf16` or `fp16` (see `resolve_precision`).

    Returns:
        The DeepSpeed config mapping, with `parallelism.deepspeed_config` merged over it.
    """
    train, par = config.training, config.parallelism
    zero: dict[str, Any] = {"stage": par.zero_stage}
    if par.zero_stage >= 1:
        zero.update({"overlap_comm": False, "contiguous_gradients": True})
    if par.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": par.offload_optimizer, "pin_memory": False}
    if par.offload_params != "none":
        zero["offload_param"] = {"device": par.offload_params, "pin_memory": False}
    if par.zero_stage == 3:
        # Gather the 16-bit weights on save so a ZeRO-3 run still writes a loadable adapter/model.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * world_size,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }
    if par.offload_optimizer != "none":
        # We hand DeepSpeed a torch AdamW (client optimizer). DeepSpeed refuses that under ZeRO-Offload
        # unless told otherwise, pushing its own DeepSpeedCPUAdam, whose C++ op is compiled on first use
        # (needs a compiler and ninja, which a CPU-only worker image may lack). Offload still moves the
        # optimizer states to host memory; DeepSpeedCPUAdam can be chosen through
        # parallelism.deepspeed_config ("optimizer") where the op builds.
        ds["zero_force_ds_cpu_optimizer"] = False
    if train.max_grad_norm is not None:
        ds["gradient_clipping"] = train.max_grad_norm
    return deep_merge(ds, _load_user_config(par.deepspeed_config))
