"""Build presets into a content-addressed cache and load any model through `from_pretrained`.

A preset's directory name carries a hash of everything that determines its bytes (config, seed,
tokenizer inputs, format version), so a second call finds it instantly and a changed preset never
reuses a stale build. Builds go to a temporary directory renamed into place, so concurrent builders
(several Ray workers) never see a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from llmopt.config import ModelConfig
from llmopt.data import BUILTIN_DIR
from llmopt.models._presets import PRESETS, TOKENIZER_VOCAB, Preset
from llmopt.models._tokenizer import CHAT_TEMPLATE, train_tokenizer

FORMAT_VERSION = 1
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelLoadError(OSError):
    """A model or tokenizer reference could not be resolved or loaded."""


def cache_dir() -> Path:
    """Root of llmopt's on-disk cache: `$LLMOPT_CACHE_DIR`, else `$XDG_CACHE_HOME/llmopt`, else ~/.cache."""
    if os.environ.get("LLMOPT_CACHE_DIR"):
        return Path(os.environ["LLMOPT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmopt"


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _tokenizer_key() -> str:
    corpus = hashlib.sha256()
    for path in sorted(BUILTIN_DIR.iterdir()):
        corpus.update(path.name.encode())
        corpus.update(path.read_bytes())
    return _digest(
        {
            "format": FORMAT_VERSION,
            "vocab": TOKENIZER_VOCAB,
            "corpus": corpus.hexdigest(),
            "chat": CHAT_TEMPLATE,
        }
    )


def _build_atomically(final: Path, build) -> Path:
    if (final / "llmopt.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "llmopt.json").is_file():  # lost a race to a complete build: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_tokenizer() -> Path:
    """Build (once) the shared local tokenizer and return its directory."""
    key = _tokenizer_key()

    def build(tmp: Path) -> None:
        train_tokenizer(TOKENIZER_VOCAB, tmp)
        (tmp / "llmopt.json").write_text(json.dumps({"kind": "tokenizer", "key": key}))

    return _build_atomically(cache_dir() / "tokenizers" / f"bpe{TOKENIZER_VOCAB}-{key}", build)


def preset_key(preset: Preset) -> str:
    """Content hash of everything that determines a preset's bytes."""
    import transformers

    return _digest(
        {
            "format": FORMAT_VERSION,
            "type": preset.model_type,
            "config": preset.config,
            "seed": preset.seed,
            "tokenizer": _tokenizer_key(),
            "transformers": transformers.__version__.split(".")[0],
        }
    )


def build_preset(name: str) -> Path:
    """Build a preset model (once; later calls return the cached directory) and return its path.

    The weights are initialised by transformers from the config under `torch.manual_seed(preset.seed)`,
    in fp32, and written with `save_pretrained` next to the tokenizer.

    Raises:
        ModelLoadError: for an unknown preset name.
    """
    if name not in PRESETS:
        raise ModelLoadError(f"unknown preset {name!r}; built-in presets: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    tokenizer_dir = build_tokenizer()

    def build(tmp: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        # The embedding is padded to TOKENIZER_VOCAB rows (BPE may stop short of its target size).
        config = AutoConfig.for_model(
            preset.model_type,
            vocab_size=TOKENIZER_VOCAB,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **preset.config,
        )
        torch.manual_seed(preset.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"kind": "model", "preset": name, "key": preset_key(preset), "description": preset.description}
        (tmp / "llmopt.json").write_text(json.dumps(meta, indent=2))

    return _build_atomically(cache_dir() / "models" / f"{name}-{preset_key(preset)}", build)


def resolve_model_path(name_or_path: str) -> str:
    """Turn a preset name into its built directory; leave local paths and hub ids as they are."""
    if name_or_path in PRESETS:
        return str(build_preset(name_or_path))
    return name_or_path


def _load_hint(name_or_path: str, exc: Exception) -> ModelLoadError:
    local = Path(name_or_path).expanduser()
    if local.exists():
        why = f"the local path exists but could not be loaded: {exc}"
    else:
        why = (
            f"it is not a preset ({', '.join(PRESETS)}) nor a local directory, "
            f"and the hub did not provide it ({exc})"
        )
    return ModelLoadError(f"cannot load model {name_or_path!r}: {why}")


def load_tokenizer(model: ModelConfig | str):
    """Load the tokenizer of a model config (or reference) via `AutoTokenizer.from_pretrained`.

    A tokenizer without a pad token gets EOS as pad, so batches can be padded.
    """
    from transformers import AutoTokenizer

    if isinstance(model, str):
        model = ModelConfig(name_or_path=model)
    ref = resolve_model_path(model.tokenizer or model.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            ref, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise _load_hint(ref, exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: ModelConfig | str, dtype: str = "fp32", device: str | torch.device = "cpu", **kwargs):
    """Load a causal LM through `AutoModelForCausalLM.from_pretrained` (presets are built first).

    Args:
        model: A model config section, or a preset name / local path / hub id.
        dtype: `fp32`, `bf16` or `fp16`.
        device: Where to put the weights.
        **kwargs: Passed to `from_pretrained` (e.g. `quantization_config`).

    Raises:
        ModelLoadError: with what was tried and why it failed.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(model, str):
        model = ModelConfig(name_or_path=model)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    ref = resolve_model_path(model.name_or_path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            ref,
            dtype=_DTYPES[dtype],
            revision=model.revision,
            trust_remote_code=model.trust_remote_code,
            attn_implementation=model.attn_implementation,
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise _load_hint(ref, exc) from exc
    return loaded.to(device) if "quantization_config" not in kwargs else loaded
