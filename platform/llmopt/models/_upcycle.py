"""Sparse upcycling: turn a dense Llama/Mistral causal LM into an equivalent Mixtral mixture of experts.

Every expert of a layer starts as an exact copy of that layer's dense MLP, and everything else
(embeddings, attention, norms, LM head) is copied unchanged. Mixtral renormalises the top-k router
weights to sum to 1, so a token's output is `sum_k w_k * mlp(x) = mlp(x)` whatever the router says:
the upcycled model computes the same function as the dense one until training makes the experts diverge.
The router is still initialised with small random values (not zeros), so that routing is not degenerate
(all ties) and the experts receive different tokens, hence different gradients, from the first step.
"""

from __future__ import annotations

import copy

import torch

_SUPPORTED = ("llama", "mistral")
# Dense config fields carried over to MixtralConfig unchanged (when the dense config has them).
_COPIED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_dropout",
)


def _check(config, num_experts: int, top_k: int) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in _SUPPORTED:
        raise ValueError(
            f"cannot upcycle model_type {model_type!r}: only dense {' / '.join(_SUPPORTED)} causal LMs "
            "(LlamaForCausalLM, MistralForCausalLM) are supported; start from one of those"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ValueError(
                f"cannot upcycle a model with {flag}=True: Mixtral has no biases in its attention and "
                "expert projections; use a checkpoint trained without biases"
            )
    if num_experts < 2:
        raise ValueError(
            f"num_experts={num_experts} is too small: a mixture of experts needs num_experts >= 2"
        )
    if not 1 <= top_k <= num_experts:
        raise ValueError(
            f"top_k={top_k} is invalid for num_experts={num_experts}: choose 1 <= top_k <= num_experts"
        )


def _mixtral_config(
    config, num_experts: int, top_k: int, router_aux_loss_coef: float = 0.01
):  # -> MixtralConfig
    """Build the `MixtralConfig` of the upcycled model from a dense Llama/Mistral config.

    Args:
        config: The dense model's `LlamaConfig` or `MistralConfig`.
        num_experts: Experts per layer (`num_local_experts`).
        top_k: Experts each token is routed to (`num_experts_per_tok`).
        router_aux_loss_coef: Weight of the load-balancing loss added to the LM loss when router
            logits are requested.

    Raises:
        ValueError: for an unsupported architecture, attention/MLP biases, or an invalid expert count.
    """
    from transformers import MixtralConfig

    _check(config, num_experts, top_k)
    fields = {name: getattr(config, name) for name in _COPIED_FIELDS if hasattr(config, name)}
    return MixtralConfig(
        **fields,
        # transformers 5 keeps rope_theta / rope_scaling inside `rope_parameters`; copy it whole, since
        # MixtralConfig's default theta (1e6) differs from Llama's (1e4).
        rope_parameters=copy.deepcopy(config.rope_parameters),
        # Llama has no sliding window (None); Mistral's is kept so attention stays the same function.
        sliding_window=getattr(config, "sliding_window", None),
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        router_aux_loss_coef=router_aux_loss_coef,
        output_router_logits=False,
        architectures=["MixtralForCausalLM"],
    )


@torch.no_grad()
def upcycle_to_moe(
    model,
    num_experts: int,
    top_k: int,
    router_aux_loss_coef: float = 0.01,
    router_init_std: float | None = None,
    seed: int = 0,
):  # -> MixtralForCausalLM
    """Turn a dense Llama-style causal LM into a `MixtralForCausalLM` computing the same function.

    Embeddings, attention, norms and LM head are copied exactly; each layer's dense MLP
    (`gate_proj`, `up_proj`, `down_proj`) is copied into every expert of that layer, and the router
    (`mlp.gate.weight`) is drawn from N(0, std²) with a generator seeded by `seed` (the global RNG is
    left untouched). The result has the input's dtype, device, train/eval mode and generation config.

    Args:
        model: A dense `LlamaForCausalLM` or `MistralForCausalLM` (merge a PEFT adapter first).
        num_experts: Experts per layer, at least 2.
        top_k: Experts each token is routed to, 1 to `num_experts`.
        router_aux_loss_coef: Weight of the load-balancing loss (used when `output_router_logits=True`).
        router_init_std: Standard deviation of the router initialisation; defaults to the config's
            `initializer_range`.
        seed: Seed of the router initialisation.

    Returns:
        The new `MixtralForCausalLM`; the input model is not modified.

    Raises:
        ValueError: for an unsupported architecture or wrapper (e.g. PEFT), attention/MLP biases,
            `num_experts < 2` or `top_k > num_experts`.
    """
    from transformers import LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM

    dense = model.config
    config = _mixtral_config(dense, num_experts, top_k, router_aux_loss_coef)
    if not isinstance(model, (LlamaForCausalLM, MistralForCausalLM)):
        raise ValueError(
            f"cannot upcycle a {type(model).__name__}: pass the LlamaForCausalLM / MistralForCausalLM itself "
            "(for a PEFT model, call merge_and_unload() first)"
        )
    embed = model.get_input_embeddings().weight
    dtype, device = embed.dtype, embed.device
    std = config.initializer_range if router_init_std is None else router_init_std

    # Building the model runs transformers' random init (all of it overwritten below): keep it off the
    # caller's CPU RNG stream.
    with torch.random.fork_rng(devices=[]), torch.device(device):
        moe = MixtralForCausalLM._from_config(
            config, dtype=dtype, attn_implementation=dense._attn_implementation
        )

    src, dst = model.model, moe.model
    dst.embed_tokens.weight.copy_(src.embed_tokens.weight)
    dst.norm.weight.copy_(src.norm.weight)
    moe.lm_head.weight.copy_(model.lm_head.weight)
    generator = torch.Generator().manual_seed(seed)
    for old, new in zip(src.layers, dst.layers, strict=True):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(new.self_attn, name).weight.copy_(getattr(old.self_attn, name).weight)
        new.input_layernorm.weight.copy_(old.input_layernorm.weight)
        new.post_attention_layernorm.weight.copy_(old.post_attention_layernorm.weight)
        # MixtralExperts: `gate, up = linear(x, gate_up_proj[e]).chunk(2)` -> rows [gate; up], each an
        # nn.Linear weight (out, in); `linear(h, down_proj[e])` -> down_proj[e] is the (H, I) Linear weight.
        gate_up = torch.cat([old.mlp.gate_proj.weight, old.mlp.up_proj.weight], dim=0)
        new.mlp.experts.gate_up_proj.copy_(gate_up.unsqueeze(0).expand_as(new.mlp.experts.gate_up_proj))
        new.mlp.experts.down_proj.copy_(
            old.mlp.down_proj.weight.unsqueeze(0).expand_as(new.mlp.experts.down_proj)
        )
        router = new.mlp.gate.weight
        router.copy_(torch.randn(router.shape, generator=generator, dtype=torch.float32) * std)

    if model.config.tie_word_embeddings:
        moe.tie_weights()
    moe.generation_config = copy.deepcopy(model.generation_config)
    moe.train(model.training)
    return moe
