"""Parameter counts and weight memory of a model, computed on the meta device (no weights loaded)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from llmopt.models._presets import PRESETS, TOKENIZER_VOCAB
from llmopt.models._zoo import ModelLoadError

# Bytes per parameter of weights quantized by bitsandbytes: int8 keeps one fp32 scale per row
# (negligible), nf4 packs two values per byte plus one fp32 absmax per 64-value block.
_NF4_BYTES = 0.5 + 4 / 64


@dataclass
class ModelInfo:
    """What `llmopt models info` reports."""

    name_or_path: str
    model_type: str
    num_parameters: int
    linear_parameters: int  # in nn.Linear layers other than the output head: what int8/nf4 quantize
    embedding_parameters: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int | None
    num_experts: int | None
    experts_per_token: int | None
    weight_bytes: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_config_only(name_or_path: str):
    """The transformers config of a preset, local directory or hub id, without its weights."""
    from transformers import AutoConfig

    if name_or_path in PRESETS:
        preset = PRESETS[name_or_path]
        return AutoConfig.for_model(preset.model_type, vocab_size=TOKENIZER_VOCAB, **preset.config)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot read the config of {name_or_path!r}: not a preset ({', '.join(PRESETS)}), "
            f"not a local model directory, and the hub did not provide it ({exc})"
        ) from exc


def model_info(name_or_path: str) -> ModelInfo:
    """Count parameters and weight bytes at fp32 / bf16 / int8 / nf4 for any model reference.

    The model is instantiated on the meta device, so even a 70B config costs no memory. For int8 and
    nf4, linear layers (but the output head) are quantized and everything else stays at 16 bits, as
    bitsandbytes does.
    """
    from transformers import AutoModelForCausalLM

    config = load_config_only(name_or_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    linear = sum(
        p.numel()
        for module in model.modules()
        if isinstance(module, torch.nn.Linear)
        for p in module.parameters(recurse=False)
        if id(p) not in head_ids
    )
    # Fused MoE experts are 3-D parameters of an experts module, quantized like linear weights.
    linear += sum(p.numel() for name, p in model.named_parameters() if p.dim() == 3 and "experts" in name)
    embedding = sum(p.numel() for p in model.get_input_embeddings().parameters())
    rest = total - linear
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelInfo(
        name_or_path=name_or_path,
        model_type=config.model_type,
        num_parameters=total,
        linear_parameters=linear,
        embedding_parameters=embedding,
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        vocab_size=text.vocab_size,
        max_position_embeddings=getattr(text, "max_position_embeddings", None),
        num_experts=getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None),
        experts_per_token=getattr(text, "num_experts_per_tok", None),
        weight_bytes={
            "fp32": 4 * total,
            "bf16": 2 * total,
            "int8": linear + 2 * rest,
            "nf4": int(_NF4_BYTES * linear) + 2 * rest,
        },
    )
