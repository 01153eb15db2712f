"""Built-in model presets: transformers configs for deterministic tiny models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TOKENIZER_VOCAB = 1024  # BPE target size and the presets' (padded) embedding rows


@dataclass(frozen=True)
class Preset:
    """A model built from a transformers config with a fixed seed."""

    name: str
    model_type: str
    config: dict[str, Any]
    description: str
    seed: int = 0
    default_test: bool = True  # built by the default test suite and `make demo`


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "tiny-llama",
            "llama",
            {
                "hidden_size": 256,
                "intermediate_size": 688,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 4096,
                "rope_theta": 10000.0,
                "tie_word_embeddings": False,
            },
            "Dense Llama-style model, ~3.4M parameters: tests, demo and the training figures.",
        ),
        Preset(
            "tiny-moe",
            "mixtral",
            {
                "hidden_size": 128,
                "intermediate_size": 256,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "router_aux_loss_coef": 0.01,
                "max_position_embeddings": 4096,
                "rope_theta": 10000.0,
                "tie_word_embeddings": False,
            },
            "Mixtral-style MoE, 4 experts top-2, ~1.9M parameters: MoE fine-tuning tests.",
        ),
        Preset(
            "base-100m",
            "llama",
            {
                "hidden_size": 768,
                "intermediate_size": 3072,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "num_key_value_heads": 12,
                "max_position_embeddings": 4096,
                "rope_theta": 10000.0,
                "tie_word_embeddings": False,
            },
            "Dense Llama-style model, ~115M parameters: realistic benchmark figures (built on demand).",
            default_test=False,
        ),
    ]
}
