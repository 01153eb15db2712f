"""Merge a trained adapter into its base model: a plain model directory every command loads like any model.

DoRA, IA3, LoHa and LoKr adapters cannot share a serving batch with other rows (peft has no per-row forward
for them), so they are served merged; LoRA adapters can be merged too (one model, no adapter overhead).
"""

from __future__ import annotations

import json
from pathlib import Path

from llmopt.models._zoo import load_model, load_tokenizer

# Prompt learning is learned input positions, not a change of any weight: nothing to merge.
UNMERGEABLE = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")


class MergeError(ValueError):
    """The path holds no mergeable adapter (the message names the fix)."""


def merge_adapter(path: str | Path, output: str | Path | None = None) -> Path:
    """Merge the adapter of a fine-tuning run (or a peft adapter folder) into its base model and save both
    weights and tokenizer.

    Args:
        path: A run directory of `llmopt finetune` (its `adapter/` and `config.yaml`), or an adapter folder
            whose `adapter_config.json` names its base model.
        output: Where to write the merged model (default: `RUN/merged`, or `ADAPTER-merged`).

    Returns:
        The merged model's directory.

    Raises:
        MergeError: no adapter there, or a prompt or prefix tuning adapter.
    """
    from peft import PeftModel

    root = Path(path).expanduser()
    adapter = root / "adapter" if (root / "adapter" / "adapter_config.json").is_file() else root
    spec_file = adapter / "adapter_config.json"
    if not spec_file.is_file():
        raise MergeError(
            f"{root} holds no adapter (no adapter_config.json in it or in its adapter/ folder); pass a LoRA-"
            "family fine-tuning run directory or a peft adapter folder (a full fine-tune is already a model)"
        )
    spec = json.loads(spec_file.read_text())
    kind = spec.get("peft_type")
    if kind in UNMERGEABLE:
        raise MergeError(
            f"{adapter} is a {kind} adapter: its virtual tokens change no weight, so there is nothing to "
            "merge; serve it as an adapter (serving.adapters)"
        )
    if (root / "config.yaml").is_file() and adapter != root:
        from llmopt.config import load_config

        model_config = load_config(root / "config.yaml").model
    else:
        from llmopt.config import ModelConfig

        model_config = ModelConfig(name_or_path=spec["base_model_name_or_path"])
    target = (
        Path(output)
        if output is not None
        else (root / "merged" if adapter != root else Path(f"{root}-merged"))
    )
    base = load_model(model_config)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(target)
    load_tokenizer(model_config).save_pretrained(target)
    return target
