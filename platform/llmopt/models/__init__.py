"""Model zoo: deterministic tiny presets, a local tokenizer, loading of any model, size figures."""

from llmopt.models._info import ModelInfo, load_config_only, model_info
from llmopt.models._presets import PRESETS, Preset
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
    "PRESETS",
    "ModelInfo",
    "ModelLoadError",
    "Preset",
    "build_preset",
    "build_tokenizer",
    "cache_dir",
    "load_config_only",
    "load_model",
    "load_tokenizer",
    "model_info",
    "preset_key",
    "resolve_model_path",
]
