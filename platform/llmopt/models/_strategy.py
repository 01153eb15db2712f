"""Apply a run's strategy to a model: quantized loading (QLoRA), MoE upcycling and router loss, LoRA.

Gradient checkpointing is applied by the training loop (it needs a sample batch for the
memory-budget policy); see `llmopt.train`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from llmopt.config import PROMPT_METHODS, RunConfig
from llmopt.models._experts import pad_expert_groups
from llmopt.models._upcycle import upcycle_to_moe
from llmopt.models._zoo import _DTYPES, load_model

# Attention projections per architecture: what `lora.target_modules: auto` adapts.
ATTENTION_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
}

# MoE parts per architecture. transformers 5 fuses experts into 3-D parameters, reached through
# peft's `target_parameters`; routers are small and trained in full (`modules_to_save`).
MOE_TARGETS: dict[str, dict[str, dict[str, list[str]]]] = {
    "mixtral": {
        "experts": {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]},
        "router": {"modules_to_save": ["mlp.gate"]},
    },
    "qwen3_moe": {
        "experts": {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]},
        "router": {"modules_to_save": ["mlp.gate"]},
    },
    "qwen2_moe": {
        "experts": {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]},
        "router": {"modules_to_save": ["mlp.gate"]},
        "shared_expert": {
            "target_modules": ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"]
        },
    },
}


class StrategyError(ValueError):
    """A strategy cannot be applied to this model (the message names the setting and the fix)."""


@dataclass
class StrategyReport:
    """What was applied, and how many parameters train."""

    model_type: str
    method: str  # full | lora | qlora
    trainable_parameters: int
    total_parameters: int
    lora_targets: dict[str, list[str]] = field(default_factory=dict)
    moe: dict[str, Any] = field(default_factory=dict)
    peft_method: str | None = None  # lora.method when adapters train

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_parameters / max(self.total_parameters, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trainable_fraction": self.trainable_fraction}


def quantization_config(config: RunConfig, training_dtype: str | None = None):
    """The bitsandbytes config for QLoRA loading, or None.

    `training_dtype` (the precision DeepSpeed casts the model to; default: the compute dtype) is the
    4-bit storage dtype: packed nf4 bytes are kept in a float tensor, and casting that tensor to another
    float dtype (DeepSpeed's bf16 cast of an fp32-stored model) scrambles the packed bytes.
    """
    mode = config.quantization.mode
    if mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    compute = config.quantization.compute_dtype
    if compute == "auto":
        compute = training_dtype or "fp32"
    dtype = _DTYPES[compute]
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=config.quantization.double_quant,
        bnb_4bit_quant_storage=_DTYPES[training_dtype] if training_dtype else dtype,
    )


def load_for_training(
    config: RunConfig,
    dtype: str = "fp32",
    device: str | torch.device = "cpu",
    training_dtype: str | None = None,
):
    """Load the config's model for training: quantized for QLoRA, else at `dtype` on `device`.

    `training_dtype` is the precision the engine will cast the model to; QLoRA stores its 4-bit
    weights in it (see `quantization_config`).
    """
    pad_expert_groups()
    quant = quantization_config(config, training_dtype)
    if quant is None:
        return load_model(config.model, dtype=dtype, device=device)
    device_map = {"": str(device) if str(device) != "cpu" else "cpu"}
    model = load_model(config.model, dtype="fp32", quantization_config=quant, device_map=device_map)
    for module in model.modules():
        # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights into an inference-only layout
        # the first time a layer runs in eval mode (our held-out evaluation); training after that
        # would go through a kernel without backward. Training runs keep the trainable layout.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    from peft import prepare_model_for_kbit_training

    # Checkpointing is applied later, per layer, by llmopt.train.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def lora_targets(config: RunConfig, model_type: str) -> dict[str, list[str]]:
    """Resolve `lora.target_modules` / `target_parameters` / `modules_to_save` for an architecture.

    Raises:
        StrategyError: `auto` on an architecture without a preset, or MoE targets on a dense model.
    """
    lora, moe = config.lora, config.moe
    if lora.method in PROMPT_METHODS:  # prompt learning wraps no layer
        return {"target_modules": [], "target_parameters": [], "modules_to_save": list(lora.modules_to_save)}
    modules: list[str] | str
    if lora.method == "ia3":
        return _ia3_targets(config, model_type)
    if lora.target_modules == "auto":
        if model_type not in ATTENTION_TARGETS:
            raise StrategyError(
                f"lora.target_modules='auto' has no preset for model_type {model_type!r}; list the module "
                f"names (e.g. lora.target_modules=[q_proj,v_proj]) or use 'all-linear'"
            )
        modules = list(ATTENTION_TARGETS[model_type])
    else:
        modules = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    parameters, to_save = list(lora.target_parameters), list(lora.modules_to_save)
    if moe.mode != "none":
        if model_type not in MOE_TARGETS:
            raise StrategyError(
                f"moe.mode={moe.mode!r} but model_type {model_type!r} is not a supported MoE "
                f"({', '.join(MOE_TARGETS)}); set moe.mode=none or moe.mode=upcycle for a dense model"
            )
        if "attention" not in moe.adapter_targets and modules == ATTENTION_TARGETS.get(model_type):
            modules = []
        for part in moe.adapter_targets:
            if part == "attention":
                continue
            spec = MOE_TARGETS[model_type].get(part)
            if spec is None:
                raise StrategyError(
                    f"moe.adapter_targets has {part!r}, which {model_type!r} does not have; remove it"
                )
            if isinstance(modules, list):
                modules += spec.get("target_modules", [])
            parameters += spec.get("target_parameters", [])
            to_save += spec.get("modules_to_save", [])
    return {"target_modules": modules, "target_parameters": parameters, "modules_to_save": to_save}


def _ia3_targets(config: RunConfig, model_type: str) -> dict[str, Any]:
    """IA3's targets: peft's per-architecture preset for `auto` (keys, values and the MLP's output
    projection, whose input it scales), else the listed modules; `feedforward_modules` are the targets that
    peft's preset marks as feed-forward."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PRESET,
    )

    lora = config.lora
    # MoE models fuse their experts into 3-D parameters that IA3 cannot wrap; their preset is k and v.
    fused = model_type in MOE_TARGETS
    feedforward = [] if fused else list(FEEDFORWARD.get(model_type, []))
    if lora.target_modules == "auto":
        if fused:
            modules: list[str] | str = ["k_proj", "v_proj"]
        elif model_type in PRESET:
            modules = list(PRESET[model_type])
        else:
            raise StrategyError(
                f"lora.target_modules='auto' with lora.method='ia3' has no preset for model_type "
                f"{model_type!r}; list the module names (e.g. lora.target_modules=[k_proj,v_proj,down_proj])"
            )
    else:
        modules = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    to_save = list(lora.modules_to_save)
    for part in config.moe.adapter_targets if config.moe.mode != "none" else []:
        spec = MOE_TARGETS.get(model_type, {}).get(part, {})  # experts are refused by the config
        if isinstance(modules, list):
            modules += spec.get("target_modules", [])
        to_save += spec.get("modules_to_save", [])
    if isinstance(modules, list):
        feedforward = [m for m in feedforward if m in modules]
    return {
        "target_modules": modules,
        "target_parameters": [],
        "modules_to_save": to_save,
        "feedforward_modules": feedforward,
    }


def set_experts_per_token(model, top_k: int) -> None:
    """Route every token of a loaded MoE model to `top_k` experts (its config, routers, MoE blocks and
    load-balancing loss), so that the trained model and its saved config agree.

    Transformers reads `num_experts_per_tok` once, into each router's and MoE block's `top_k` and the
    causal LM's `num_experts_per_tok`; those copies are updated with the config.

    Raises:
        StrategyError: a dense model, or `top_k` above the model's experts per layer.
    """
    config = model.config
    old = getattr(config, "num_experts_per_tok", None)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if old is None or not experts:
        raise StrategyError(
            f"moe.top_k={top_k} needs an MoE model; {config.model_type!r} has no experts (drop moe.top_k, "
            "or use moe.mode=upcycle)"
        )
    if not 1 <= top_k <= experts:
        raise StrategyError(f"moe.top_k={top_k} is invalid for a model with {experts} experts per layer")
    config.num_experts_per_tok = top_k
    for module in model.modules():  # the model itself included
        if getattr(module, "top_k", None) == old and not isinstance(module, torch.nn.Linear):
            module.top_k = top_k
        if getattr(module, "num_experts_per_tok", None) == old:
            module.num_experts_per_tok = top_k


def apply_strategy(model, config: RunConfig):
    """Upcycle (if asked), switch on the router auxiliary loss, and wrap LoRA adapters with peft.

    Args:
        model: A causal LM from `load_for_training`.
        config: The run config.

    Returns:
        (model, StrategyReport). Without LoRA every parameter trains (a full fine-tune).
    """
    moe_info: dict[str, Any] = {}
    if config.moe.mode == "upcycle":
        model = upcycle_to_moe(
            model,
            config.moe.num_experts,
            config.moe.upcycle_top_k,
            config.moe.router_aux_loss_coef,
            seed=config.training.seed,
        )
        moe_info["upcycled"] = True
    model_type = model.config.model_type
    if config.moe.mode == "finetune" and config.moe.top_k is not None:
        set_experts_per_token(model, config.moe.top_k)
    if config.moe.mode != "none":
        model.config.router_aux_loss_coef = config.moe.router_aux_loss_coef
        model.config.output_router_logits = True  # adds coef x load-balancing loss to the LM loss
        moe_info.update(
            num_experts=getattr(model.config, "num_local_experts", None)
            or getattr(model.config, "num_experts", None),
            top_k=model.config.num_experts_per_tok,
            router_aux_loss_coef=config.moe.router_aux_loss_coef,
        )
    total = sum(p.numel() for p in model.parameters())
    if not config.lora.enabled:
        for p in model.parameters():
            p.requires_grad_(True)
        return model, StrategyReport(model_type, "full", total, total, moe=moe_info)

    import peft

    targets = lora_targets(config, model_type)
    torch.manual_seed(config.training.seed)  # adapter initialisation
    model = peft.get_peft_model(model, build_peft_config(config, targets))
    trainable, total = model.get_nb_trainable_parameters()
    method = "qlora" if config.quantization.mode != "none" else "lora"
    return model, StrategyReport(
        model_type, method, trainable, total, targets, moe_info, peft_method=config.lora.method
    )


def build_peft_config(config: RunConfig, targets: dict[str, Any]):
    """peft's config for `lora.method`, over the targets `lora_targets` resolved."""
    import peft

    lora = config.lora
    modules = targets.get("target_modules") or None
    to_save = targets.get("modules_to_save") or None
    if lora.method in ("lora", "dora"):
        return peft.LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            bias=lora.bias,
            use_dora=lora.method == "dora",
            target_modules=modules,
            target_parameters=targets.get("target_parameters") or None,
            modules_to_save=to_save,
            task_type="CAUSAL_LM",
        )
    if lora.method == "ia3":
        return peft.IA3Config(
            target_modules=modules,
            feedforward_modules=targets.get("feedforward_modules") or [],
            modules_to_save=to_save,
            task_type="CAUSAL_LM",
        )
    if lora.method in ("loha", "lokr"):
        kind = peft.LoHaConfig if lora.method == "loha" else peft.LoKrConfig
        return kind(
            r=lora.r,
            alpha=lora.alpha,
            rank_dropout=lora.dropout,
            target_modules=modules,
            modules_to_save=to_save,
            task_type="CAUSAL_LM",
        )
    if lora.method == "prompt_tuning":
        return peft.PromptTuningConfig(
            num_virtual_tokens=lora.num_virtual_tokens, modules_to_save=to_save, task_type="CAUSAL_LM"
        )
    return peft.PrefixTuningConfig(
        num_virtual_tokens=lora.num_virtual_tokens, modules_to_save=to_save, task_type="CAUSAL_LM"
    )
