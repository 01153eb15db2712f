"""`llmopt prune`: prune a model's linear layers, optionally recover with a short LoRA fine-tune, and write a
model directory that every command loads like any model.

Recovery trains LoRA adapters on the pruned model through the same Ray Train + DeepSpeed path as any run
(the config's data, adapters and optimizer; `training.max_steps` set to the recovery steps), merges them,
and zeroes the pruned weights again: a merged B @ A is dense, and the model must keep its sparsity pattern
(the updates of the surviving weights, and of any layer trained in full such as the output head, stay).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from llmopt.config import RunConfig, validate_config
from llmopt.models import apply_masks, load_model, load_tokenizer, merge_adapter, prune_model, weight_masks


def prune_to_directory(
    config: RunConfig,
    sparsity: float,
    pattern: str = "unstructured",
    output: str | Path | None = None,
    recover_steps: int = 0,
) -> tuple[Path, dict[str, Any]]:
    """Prune `config.model`, optionally recover, and save model, tokenizer and `prune.json` to `output`.

    Args:
        config: The run config: its model is pruned; recovery uses its data, LoRA and training settings.
        sparsity: Fraction of each decoder linear layer's weights to zero.
        pattern: `unstructured` or `2:4`.
        output: The model directory (default: `<output_dir>/<name>-pruned<percent>[-recovered]`).
        recover_steps: LoRA recovery steps (0: none).

    Returns:
        (the directory, the report written to its prune.json).

    Raises:
        ValueError: a bad sparsity or pattern; RuntimeError: the recovery run failed.
    """
    model = load_model(config.model)
    report = prune_model(model, sparsity, pattern)
    tag = f"pruned{round(100 * sparsity)}" + ("-2of4" if pattern == "2:4" else "")
    target = Path(output) if output else Path(config.output_dir) / f"{config.name}-{tag}"
    result: dict[str, Any] = {"source": config.model.name_or_path, **report.to_dict(), "recovery": None}
    if recover_steps <= 0:
        _save(model, config, target, result)
        return target, result
    from llmopt.train._trainer import finetune

    masks = weight_masks(model)
    with tempfile.TemporaryDirectory(prefix="llmopt-pruned-") as pruned_dir:
        _save(model, config, Path(pruned_dir), result)
        del model
        data = config.model_dump(mode="json")
        data["model"]["name_or_path"] = pruned_dir
        data["name"] = f"{config.name}-{tag}-recovery"
        data["lora"]["enabled"] = True
        warmup = min(data["training"]["warmup_steps"], recover_steps // 10)
        data["training"].update(max_steps=recover_steps, save_merged=False, warmup_steps=warmup)
        every = data["training"].get("eval_every_steps")
        data["training"]["eval_every_steps"] = recover_steps if every is None else min(every, recover_steps)
        run = finetune(validate_config(data), progress=False)
        if not run.ok:
            raise RuntimeError(f"the recovery fine-tune failed: {run.error}; run directory {run.run_dir}")
        merged = merge_adapter(run.run_dir, Path(pruned_dir) / "merged")
        recovered = load_model(str(merged))
    apply_masks(recovered, masks)
    result["recovery"] = {
        "steps": recover_steps,
        "run_dir": str(run.run_dir),
        "eval_loss": run.metrics.get("eval_loss"),
        "eval_exact_match": run.metrics.get("eval_exact_match"),
    }
    _save(recovered, config, target, result)
    return target, result


def _save(model, config: RunConfig, target: Path, report: dict[str, Any]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    load_tokenizer(config.model).save_pretrained(target)
    (target / "prune.json").write_text(json.dumps(report, indent=2))
