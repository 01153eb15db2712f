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


# peft types served in mixed batches through peft's `adapter_names` (LoRA; peft refuses it for DoRA).
MIXED_TYPES = ("LORA",)
# Prompt learning: the adapter is a fixed key/value prefix, served in mixed batches as a KV cache.
PREFIX_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING")
# Adapters that change the weights in a way peft cannot mix per row: served merged into a model.
MERGEABLE_TYPES = ("IA3", "LOHA", "LOKR")


def adapter_spec(name: str, path: str) -> dict:
    """The adapter's ``adapter_config.json`` (peft_type, use_dora, modules_to_save, ...)."""
    import json

    return json.loads((resolve_adapter(name, path) / "adapter_config.json").read_text())


def check_models(config: RunConfig) -> None:
    """Each of `serving.models` loads and shares the main model's tokenizer (the ingress tokenizes once for
    every model it serves).

    Raises:
        ServingSetupError: a model that does not load, or has another tokenizer, naming the fix.
    """
    from llmopt.models import ModelLoadError, load_tokenizer

    if not config.serving.models:
        return
    main = load_tokenizer(config.model)
    problems = []
    for name, path in config.serving.models.items():
        try:
            other = load_tokenizer(config.model.model_copy(update={"name_or_path": path}))
        except (ModelLoadError, OSError, ValueError) as exc:
            problems.append(f"serving.models.{name}={path!r} does not load: {exc}")
            continue
        if other.get_vocab() != main.get_vocab() or other.all_special_tokens != main.all_special_tokens:
            problems.append(
                f"serving.models.{name}={path!r} has another tokenizer than {config.model.name_or_path!r}; "
                "serve it as its own app (llmopt serve model.name_or_path=...)"
            )
    if problems:
        raise ServingSetupError("; ".join(problems))


def check_native_setup(config: RunConfig) -> None:
    """What the native engine cannot serve, refused when the app is built (before any replica starts).

    Raises:
        ServingSetupError: an adapter it cannot serve (see `check_adapters`), or prompt / prefix tuning
            adapters with the KV cache off (their virtual tokens live in it).
    """
    serving = config.serving
    if serving.engine == "vllm" or not serving.adapters:
        return
    check_adapters(serving.adapters)
    if not serving.kv_cache.enabled:
        prompt = [
            n for n, p in serving.adapters.items() if adapter_spec(n, p).get("peft_type") in PREFIX_TYPES
        ]
        if prompt:
            raise ServingSetupError(
                f"serving.adapters {prompt} are prompt or prefix tuning adapters, whose virtual tokens are "
                "served as KV-cache prefixes; set serving.kv_cache.enabled=true"
            )


def check_adapters(adapters: dict[str, str]) -> None:
    """Refuse adapters the native engine cannot serve next to others, before any weight is loaded.

    LoRA adapters share batches through peft's mixed-batch forward; prompt and prefix tuning adapters
    become a fixed KV prefix per request (so they mix too). peft has no per-row forward for DoRA, IA3,
    LoHa or LoKr: those are served as their merged model.

    Raises:
        ServingSetupError: naming each adapter that cannot be served and the fix.
    """
    problems = []
    for name, path in adapters.items():
        spec = adapter_spec(name, path)
        kind = spec.get("peft_type")
        if kind in MERGEABLE_TYPES or (kind == "LORA" and spec.get("use_dora")):
            what = "DoRA" if kind == "LORA" else kind
            problems.append(
                f"serving.adapters.{name} is {what}, an adapter type that peft cannot mix with other rows "
                "in a batch; serve its merged model instead: `llmopt merge RUN` (or "
                "training.save_merged=true) writes RUN/merged; serve it with model.name_or_path=RUN/merged"
            )
        elif kind in PREFIX_TYPES and spec.get("modules_to_save"):
            problems.append(
                f"serving.adapters.{name} is a {kind} adapter that also trained {spec['modules_to_save']} "
                "(lora.modules_to_save); its virtual tokens are served as a KV prefix on the shared base "
                "model, which cannot carry those modules: retrain with lora.modules_to_save=[]"
            )
        elif kind not in MIXED_TYPES + PREFIX_TYPES:
            problems.append(
                f"serving.adapters.{name} is a {kind} adapter; llmopt serves LoRA, prompt and prefix tuning "
                "adapters, and DoRA, IA3, LoHa and LoKr merged (merge others with peft's merge_and_unload)"
            )
    if problems:
        raise ServingSetupError("; ".join(problems))


def load_adapters(model, adapters: dict[str, str], device: torch.device | str):
    """Wrap `model` in a PeftModel holding every configured LoRA adapter (mixed batches need them
    all in one model), on `device` (peft would otherwise pick the first device it infers).

    Prompt and prefix tuning adapters are not loaded here: see `load_virtual_prefixes`.

    Args:
        model: The loaded base model.
        adapters: `serving.adapters`: name -> run directory or adapter folder.
        device: The replica's device.

    Returns:
        The PeftModel, or `model` itself when no LoRA adapter is configured.

    Raises:
        ServingSetupError: A path that holds no adapter, or an adapter that cannot be served.
    """
    from peft import PeftModel

    check_adapters(adapters)
    peft_model = None
    for name, path in adapters.items():
        if adapter_spec(name, path).get("peft_type") not in MIXED_TYPES:
            continue
        folder = str(resolve_adapter(name, path))
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, folder, adapter_name=name, torch_device=str(device))
        else:
            peft_model.load_adapter(folder, adapter_name=name, torch_device=str(device))
    return peft_model.eval() if peft_model is not None else model


@torch.no_grad()
def load_virtual_prefixes(model, adapters: dict[str, str], device: torch.device | str) -> dict:
    """The key/value prefix of every prompt or prefix tuning adapter, on the plain base `model`.

    peft runs prompt tuning as learned embeddings in front of the input and prefix tuning as learned keys
    and values in front of every layer's cache; in a causal model neither depends on the tokens after
    them. So each adapter is exactly a batch-1 ``DynamicCache`` of ``num_virtual_tokens`` positions that a
    request starts from, with its own tokens at positions ``num_virtual_tokens`` on, as in peft's forward.

    Returns:
        adapter name -> DynamicCache (computed once, copied per request).
    """
    from peft import PeftModel
    from transformers import DynamicCache

    prefixes = {}
    for name, path in adapters.items():
        kind = adapter_spec(name, path).get("peft_type")
        if kind not in PREFIX_TYPES:
            continue
        wrapped = PeftModel.from_pretrained(model, str(resolve_adapter(name, path)), torch_device=str(device))
        wrapped.eval()
        dtype = next(model.parameters()).dtype
        if kind == "PROMPT_TUNING":
            embeds = wrapped.get_prompt(batch_size=1).to(device=device, dtype=dtype)
            out = model(inputs_embeds=embeds, use_cache=True, past_key_values=DynamicCache())
            cache = out.past_key_values
        else:
            cache = wrapped.get_prompt(batch_size=1)
            if not isinstance(cache, DynamicCache):  # legacy tuples: one (keys, values) per layer
                legacy, cache = cache, DynamicCache()
                for index, (keys, values) in enumerate(legacy):
                    cache.update(keys, values, index)
        copy = DynamicCache()
        for index, layer in enumerate(cache.layers):
            copy.update(
                layer.keys.detach().to(device, dtype).clone(),
                layer.values.detach().to(device, dtype).clone(),
                index,
            )
        prefixes[name] = copy
        del wrapped
    return prefixes
