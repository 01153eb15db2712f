"""A lean batch-1 decode step for Llama-architecture models on the native kernel.

With the native GEMV (`serving.decode_kernel`), batch-1 decoding of the ~100M preset spent about 21 ms per
token streaming weights and 4-5 ms in the Python around them: transformers' forward walks ~100 modules per
token, builds masks and position embeddings, and calls each projection through `nn.Module.__call__`. This
step computes the same thing for one token of one unpadded sequence with the same weights, the same cache
and the same float operations in the same order (RMSNorm, rotary embedding, SDPA, SiLU MLP): logits equal
transformers' (tests/unit/test_fast_decode.py). It saved 2-3 ms per token there (about 10%).

It serves only what it reproduces exactly: `LlamaForCausalLM` with default RoPE whose projections all run
the native kernel; the engine uses it when one request is running and no adapter is loaded, and
transformers' forward for everything else (prefill, batches, adapters, other architectures). We write this
step by hand because transformers has no lean single-token path and torch.compile saved only 1-2 ms here
after a ~50 s warm-up per replica.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaForCausalLM

from llmopt.serve._native import DecodeLinear


def unsupported_reason(model) -> str | None:
    """Why `model` cannot use the lean step (None when it can)."""
    if type(model) is not LlamaForCausalLM:
        return f"{type(model).__name__} is not LlamaForCausalLM"
    if model.training:
        return "the model is in training mode"
    rotary = model.model.rotary_emb
    if getattr(rotary, "rope_type", None) != "default":
        return f"RoPE type {getattr(rotary, 'rope_type', None)!r} (only 'default' is reproduced)"
    linears = [model.lm_head]
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if any(type(m) is not DecodeLinear for m in linears):
        return "not every projection runs the native decode kernel"
    return None


class LlamaDecodeStep:
    """Next-token logits of a single unpadded sequence whose KV cache covers every earlier position.

    Example::

        step = LlamaDecodeStep(model)  # after use_native_decode(model)
        logits = step(token_id, position, cache)  # [1, vocab]; the cache grows by one position
    """

    def __init__(self, model: LlamaForCausalLM):
        if reason := unsupported_reason(model):
            raise ValueError(f"the lean decode step cannot run this model: {reason}")
        self.model = model
        self._gemv = DecodeLinear._gemv

    def _linear(self, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if type(module) is not DecodeLinear:  # wrapped since (e.g. a LoRA layer injected): its own forward
            return module(x)
        y = torch.empty(module.out_features)
        bias = module.bias.data_ptr() if module.bias is not None else None
        self._gemv(module.weight.data_ptr(), x.data_ptr(), bias, y.data_ptr(), module.out_features, x.numel())
        return y

    @torch.no_grad()
    def __call__(self, token_id: int, position: int, cache: DynamicCache) -> torch.Tensor:
        inner = self.model.model
        rotary = inner.rotary_emb
        # LlamaRotaryEmbedding.forward for one position, the same operations on the same dtypes.
        freqs = torch.tensor([float(position)]) * rotary.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling
        x = inner.embed_tokens.weight[token_id]
        hidden = x.numel()
        for index, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            norm = layer.input_layernorm
            h = F.rms_norm(x, (hidden,), norm.weight, norm.variance_epsilon)
            q = self._linear(attn.q_proj, h).view(1, -1, 1, attn.head_dim)
            k = self._linear(attn.k_proj, h).view(1, -1, 1, attn.head_dim)
            v = self._linear(attn.v_proj, h).view(1, -1, 1, attn.head_dim)
            q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
            keys, values = cache.update(k, v, index)
            o = F.scaled_dot_product_attention(
                q, keys, values, scale=attn.scaling, enable_gqa=attn.num_key_value_groups > 1
            )
            x = x + self._linear(attn.o_proj, o.reshape(-1))
            norm = layer.post_attention_layernorm
            h = F.rms_norm(x, (hidden,), norm.weight, norm.variance_epsilon)
            gated = mlp.act_fn(self._linear(mlp.gate_proj, h)) * self._linear(mlp.up_proj, h)
            x = x + self._linear(mlp.down_proj, gated)
        x = F.rms_norm(x, (hidden,), inner.norm.weight, inner.norm.variance_epsilon)
        return self._linear(self.model.lm_head, x).view(1, -1)


def _rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' `apply_rotary_pos_emb` for one tensor: t * cos + rotate_half(t) * sin."""
    half = t.shape[-1] // 2
    return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin
