"""Model zoo: deterministic tiny presets, a local tokenizer, loading of any model, size figures."""

from llmopt.models._info import ModelInfo, load_config_only, model_info
from llmopt.models._merge import MergeError, merge_adapter
from llmopt.models._presets import PRESETS, Preset
from llmopt.models._prune import PruneReport, apply_masks, prune_model, weight_masks
from llmopt.models._strategy import (
    ATTENTION_TARGETS,
    MOE_TARGETS,
    StrategyError,
    StrategyReport,
    apply_strategy,
    load_for_training,
    lora_targets,
    quantization_config,
)
from llmopt.models._upcycle import upcycle_to_moe
from llmopt.models._zoo import (
    ModelLoadError,
    build_preset,
    build_tokenizer,
    cache_dir,
    load_model,
    load_tokenizer,
    preset_key,
    resolve_model_path,
)

__all__ = [
    "ATTENTION_TARGETS",
    "MOE_TARGETS",
    "PRESETS",
    "MergeError",
    "ModelInfo",
    "ModelLoadError",
    "Preset",
    "PruneReport",
    "StrategyError",
    "StrategyReport",
    "apply_masks",
    "apply_strategy",
    "build_preset",
    "build_tokenizer",
    "cache_dir",
    "load_config_only",
    "load_for_training",
    "load_model",
    "load_tokenizer",
    "lora_targets",
    "merge_adapter",
    "model_info",
    "preset_key",
    "prune_model",
    "quantization_config",
    "resolve_model_path",
    "upcycle_to_moe",
    "weight_masks",
]
