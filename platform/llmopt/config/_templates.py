"""The seed system's strategy templates (kept as YAML data) and its rule-based selector.

The templates are the baseline the strategy search (llmopt.tune) has to beat. A config starts from one
with a top-level `template: NAME` key; the file's own keys then override the template's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

from llmopt.config._errors import ConfigError, ConfigIssue, deep_merge

TEMPLATE_DIR = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Template:
    """A named partial config with a one-line description."""

    name: str
    description: str
    overlay: dict[str, Any]


@cache
def templates() -> dict[str, Template]:
    """All shipped templates by name, read from `llmopt/config/templates/*.yaml`."""
    found = {}
    for path in sorted(TEMPLATE_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        description = data.pop("description", "")
        found[path.stem] = Template(path.stem, description, data)
    return found


def get_template(name: str) -> Template:
    """Return a template by name, or raise a ConfigError listing the known names."""
    known = templates()
    if name not in known:
        raise ConfigError(
            [ConfigIssue("template", f"unknown template {name!r}; choose one of {', '.join(known)}")]
        )
    return known[name]


def resolve_template(data: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """If `data` names a `template`, return the template overlaid with the rest of `data`."""
    name = data.pop("template", None)
    if name is None:
        return data
    if not isinstance(name, str):
        raise ConfigError([ConfigIssue("template", f"must be a template name, got {name!r}")], source)
    return deep_merge(get_template(name).overlay, data)


Mode = Literal["train", "inference"]


@dataclass(frozen=True)
class Recommendation:
    """What the seed's rules pick for a model size: a template, extra settings and the reasons."""

    tier: str
    template: str
    overlay: dict[str, Any]
    reasons: list[str] = field(default_factory=list)

    def config_data(self) -> dict[str, Any]:
        """The recommended settings as a config mapping (template included)."""
        return deep_merge(get_template(self.template).overlay, self.overlay)


_BILLION = 1_000_000_000


def rule_based_recommendation(num_params: int, mode: Mode = "train") -> Recommendation:
    """Apply the seed system's fixed rules by parameter count.

    Rules: under 1B, LoRA r=8 + checkpointing; 1-10B, LoRA r=32 + checkpointing + fp16; 10B and more,
    LoRA r=64 + MoE + model parallel; inference mode, KV cache + batching + int8.

    Args:
        num_params: Total parameters of the model.
        mode: `train` for a fine-tuning strategy, `inference` for serving.

    Returns:
        The recommendation.
    """
    size = f"{num_params / _BILLION:.3g}B parameters"
    if mode == "inference":
        return Recommendation(
            "inference", "inference_optimized", {}, [f"inference mode ({size}): KV cache + batching + int8"]
        )
    if num_params < _BILLION:
        return Recommendation("<1B", "small_model", {}, [f"{size} < 1B: LoRA r=8 + gradient checkpointing"])
    if num_params < 10 * _BILLION:
        return Recommendation(
            "1-10B",
            "small_model",
            {"lora": {"r": 32, "alpha": 32}, "precision": "fp16"},
            [f"1B <= {size} < 10B: LoRA r=32 + gradient checkpointing + fp16"],
        )
    reasons = [f"{size} >= 10B: LoRA r=64 + MoE + model parallel (tensor 4 x pipeline 2)"]
    if num_params > 70 * _BILLION:
        reasons.append("above the rules' 70B range: the large_model tier is the closest")
    return Recommendation(">=10B", "large_model", {}, reasons)
