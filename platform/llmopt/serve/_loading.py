"""Load a model, and its LoRA adapters, for serving at the configured precision and quantization.

`serving.quantization=int8` uses torch dynamic quantization on CPU (int8 weights, activations quantized
per batch at run time) and bitsandbytes 8-bit on GPU; `nf4` uses bitsandbytes 4-bit (its CPU backend on
CPU). `serving.precision` picks the dtype of everything that is not quantized (`auto`: bf16 on a GPU that
has it, else fp32). `serving.decode_kernel` picks the decode kernels of fp32 models on CPU (see
`llmopt.serve.native`). Adapters come from fine-tuning run directories or peft adapter folders.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from llmopt.config import RunConfig
from llmopt.devices import bf16_supported, describe_device
from llmopt.models import load_model
from llmopt.serve._protocol import ServingSetupError
from llmopt.serve.native import use_native_decode

log = logging.getLogger(__name__)

_DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


class ServingPrecisionError(ValueError):
    """The requested precision or quantization cannot be served on this device."""


def serving_dtype(config: RunConfig, device: str | torch.device) -> str:
    """The dtype name (`fp32`, `bf16`, `fp16`) the served weights use on `device`."""
    on_gpu = torch.device(device).type == "cuda"
    precision = config.serving.precision
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "bf16" and on_gpu and not bf16_supported(device):
        raise ServingPrecisionError(
            f"serving.precision='bf16' on {describe_device(device)}, which has no bf16 units; set "
            "serving.precision=fp16 (or auto, which serves fp32 there)"
        )
    if config.serving.quantization == "int8" and not on_gpu and precision != "fp32":
        raise ServingPrecisionError(
            f"serving.quantization='int8' on CPU runs torch dynamic quantization, which needs fp32 "
            f"activations, but serving.precision={precision!r}; set serving.precision=fp32 (or auto)"
        )
    return _DTYPES[precision]


def _native_unsupported(config: RunConfig, dtype: str, on_gpu: bool) -> str | None:
    """Why the native decode kernel cannot serve this config (None when it can)."""
    if on_gpu or dtype != "fp32":
        return f"it is an fp32 CPU kernel, but this replica serves {dtype} on {'GPU' if on_gpu else 'CPU'}"
    if config.serving.quantization != "none":
        return f"serving.quantization={config.serving.quantization!r} layers keep their own kernels"
    return None


def _apply_decode_kernel(model, config: RunConfig, unsupported: str | None) -> None:
    """Apply `serving.decode_kernel` to a loaded model and record the choice as `model.decode_kernel`."""
    model.decode_kernel = "torch"
    choice = config.serving.decode_kernel
    if choice == "torch" or unsupported:
        return
    try:
        layers, description = use_native_decode(model, required=choice == "native")
    except RuntimeError as exc:
        raise ServingPrecisionError(
            f"serving.decode_kernel='native' cannot be used here: {exc}; set serving.decode_kernel=auto to "
            "fall back to torch's kernel"
        ) from exc
    if layers:
        model.decode_kernel = description
        log.info("batch-1 decode: %s on %d linear layers", description, layers)
    else:
        log.info("batch-1 decode: torch's kernel (%s)", description)


def load_serving_model(config: RunConfig, device: str | torch.device = "cpu"):
    """Load the config's model for inference, quantized and cast as `config.serving` says.

    Args:
        config: The run config (its `model` and `serving` sections).
        device: `cpu` or a CUDA device.

    Returns:
        The model in eval mode, with `decode_kernel` naming its batch-1 decode kernel (`torch` or the
        native kernel's description).

    Raises:
        ServingPrecisionError: an impossible combination (e.g. int8 with bf16 activations on CPU, or
            `decode_kernel=native` where it cannot run).
    """
    dtype = serving_dtype(config, device)
    on_gpu = torch.device(device).type == "cuda"
    unsupported = _native_unsupported(config, dtype, on_gpu)
    if unsupported and config.serving.decode_kernel == "native":  # before loading anything
        raise ServingPrecisionError(
            f"serving.decode_kernel='native' cannot serve this config: {unsupported}; set "
            "serving.decode_kernel=auto (or torch)"
        )
    model = _load(config, dtype, device, on_gpu)
    _apply_decode_kernel(model, config, unsupported)
    return model


def _load(config: RunConfig, dtype: str, device: str | torch.device, on_gpu: bool):
    mode = config.serving.quantization
    if mode == "none":
        return load_model(config.model, dtype=dtype, device=device).eval()
    if mode == "int8" and not on_gpu:
        model = load_model(config.model, dtype="fp32", device="cpu").eval()
        with warnings.catch_warnings():
            # torch.ao's eager dynamic quantization is deprecated in favour of torchao, which has no CPU
            # wheel here; it is still the built-in CPU int8 path of torch 2.x.
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    from transformers import BitsAndBytesConfig

    compute = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    quant = (
        BitsAndBytesConfig(load_in_8bit=True)
        if mode == "int8"
        else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    )
    device_map = {"": str(device)}
    model = load_model(config.model, dtype=dtype, quantization_config=quant, device_map=device_map).eval()
    if not on_gpu:
        for module in model.modules():
            # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights into a blocked layout the first
            # time a layer runs in eval mode, and asserts when a layer's rows are not a multiple of its block
            # (the tiny presets' are not). Its plain CPU kernel serves every shape.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def resolve_adapter(name: str, path: str) -> Path:
    """The directory holding ``adapter_config.json`` for a configured adapter.

    Accepts a fine-tuning run directory (its ``adapter/`` subfolder, as ``llmopt finetune`` writes it) or
    an adapter directory saved with peft's ``save_pretrained``.

    Raises:
        ServingSetupError: If neither holds an adapter (e.g. a full fine-tune run, which has no adapter).
    """
    root = Path(path).expanduser()
    for candidate in (root / "adapter", root):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ServingSetupError(
        f"serving.adapters.{name}={path!r} holds no LoRA adapter (no adapter_config.json in it or in its "
        "adapter/ folder); point it at a LoRA fine-tuning run directory or a peft adapter folder"
    )


def load_adapters(model, adapters: dict[str, str], device: torch.device | str):
    """Wrap `model` in a PeftModel holding every configured adapter (mixed batches need them all in one
    model), on `device` (peft would otherwise pick the first device it infers).

    Args:
        model: The loaded base model.
        adapters: `serving.adapters`: name -> run directory or adapter folder.
        device: The replica's device.

    Raises:
        ServingSetupError: A path that holds no LoRA adapter.
    """
    from peft import PeftModel

    peft_model = None
    for name, path in adapters.items():
        folder = str(resolve_adapter(name, path))
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, folder, adapter_name=name, torch_device=str(device))
        else:
            peft_model.load_adapter(folder, adapter_name=name, torch_device=str(device))
    return peft_model.eval()
