"""A lean decode step for Llama-architecture models on the native kernels, for one row or a padded batch.

With the native GEMV (`serving.decode_kernel`), batch-1 decoding of the ~100M preset spent about 18-21 ms
per token streaming weights and 4-5 ms in the Python around them: transformers' forward walks ~100 modules
per token, builds masks and position embeddings, and calls each projection through `nn.Module.__call__`;
torch's SDPA alone took 60-90 us per layer inside the loop (17 us on warm data). This step computes the
same thing with the same weights and cache: the same operations in the same order (RMSNorm, rotary
embedding, SiLU MLP), attention in the native single-query kernel. Logits match transformers' to 1e-5
(tests/unit/test_fast_decode.py). In the engine (`python -m jobs.benchmark serve`'s precision table, three
runs): tiny-llama 259-409 -> 656-792 tokens/s at batch 1; the ~100M preset 35-39 -> 38-42, within the
machine's noise (in one process, 4.2-5 -> 2.4-2.8 ms of Python per token).

`decode_batch` does the same for a left-padded batch (torch's matrix products, and attention from each
row's first real position): with 32 staggered requests on the tiny preset, the engine decoded about 2,050
tokens/s through transformers' forward and 2,550 through this step.

It serves only models whose maths it reproduces: `LlamaForCausalLM` with default RoPE whose projections
all run the native kernel, and no adapter; the engine uses it for decode steps, and transformers' forward
for everything else (prefill, adapters, other architectures). We write this step by hand because
transformers has no lean single-token path and torch.compile saved only 1-2 ms here after a ~50 s warm-up
per replica.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaForCausalLM

from llmopt.serve._native import DecodeLinear, load_kernels


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
    """Next-token logits of one unpadded sequence (`__call__`) or of a left-padded batch (`decode_batch`)
    whose KV cache covers every earlier position.

    Example::

        step = LlamaDecodeStep(model)  # after use_native_decode(model)
        logits = step(token_id, position, cache)  # [1, vocab]; the cache grows by one position
    """

    def __init__(self, model: LlamaForCausalLM):
        if reason := unsupported_reason(model):
            raise ValueError(f"the lean decode step cannot run this model: {reason}")
        self.model = model
        kernels, _ = load_kernels()  # loaded: every projection is a DecodeLinear
        self._gemv, self._attend_rows = kernels.gemv, kernels.attend_rows
        self._no_padding = torch.zeros(1, dtype=torch.int64)  # a lone row attends from position 0

    def _linear(
        self, module: torch.nn.Linear, x: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        if type(module) is not DecodeLinear:  # wrapped since (e.g. a LoRA layer injected): its own forward
            y = module(x)
            return y if out is None else out.copy_(y)
        y = torch.empty(module.out_features) if out is None else out
        bias = module.bias.data_ptr() if module.bias is not None else None
        self._gemv(module.weight.data_ptr(), x.data_ptr(), bias, y.data_ptr(), module.out_features, x.numel())
        return y

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attn) -> torch.Tensor:
        """softmax(q K^T * scale) V for one query position of one unpadded row (`_attention_rows`)."""
        heads, dim = q.shape
        return self._attention_rows(q.view(1, heads, dim), keys, values, self._no_padding, attn).view(-1)

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
            # Modules by dict lookup: nn.Module.__getattr__ cost ~0.25 ms per token over ~350 lookups.
            proj, norm = attn._modules, layer.input_layernorm
            h = F.rms_norm(x, (hidden,), norm.weight, norm.variance_epsilon)
            q_out, k_out = proj["q_proj"].out_features, proj["k_proj"].out_features
            qk = torch.empty(q_out + k_out)  # one rotary pass for the query and the key
            self._linear(proj["q_proj"], h, qk[:q_out])
            self._linear(proj["k_proj"], h, qk[q_out:])
            qk = _rotary(qk.view(-1, attn.head_dim), cos, sin)
            heads = q_out // attn.head_dim
            k = qk[heads:].view(1, -1, 1, attn.head_dim)
            v = self._linear(proj["v_proj"], h).view(1, -1, 1, attn.head_dim)
            keys, values = cache.update(k, v, index)
            x = x + self._linear(proj["o_proj"], self._attention(qk[:heads], keys, values, attn))
            proj, norm = mlp._modules, layer.post_attention_layernorm
            h = F.rms_norm(x, (hidden,), norm.weight, norm.variance_epsilon)
            gated = mlp.act_fn(self._linear(proj["gate_proj"], h)) * self._linear(proj["up_proj"], h)
            x = x + self._linear(proj["down_proj"], gated)
        x = F.rms_norm(x, (hidden,), inner.norm.weight, inner.norm.variance_epsilon)
        return self._linear(self.model.lm_head, x).view(1, -1)

    def _rows(self, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """A projection of a batch of rows on torch's kernel (what `DecodeLinear` runs for several rows)."""
        if type(module) is not DecodeLinear:  # wrapped since (e.g. a LoRA layer injected): its own forward
            return module(x)
        return F.linear(x, module.weight, module.bias)

    def _attention_rows(self, q, keys, values, starts: torch.Tensor, attn) -> torch.Tensor:
        """Single-query attention of each row over its cache positions ``starts[b]`` onwards."""
        batch, heads, dim = q.shape
        kv_heads, width = keys.shape[1], keys.shape[2]
        if keys.stride()[2:] != (dim, 1) or values.stride() != keys.stride():
            mask = (torch.arange(width) >= starts[:, None]).view(batch, 1, 1, width)
            group = heads // kv_heads
            keys, values = (t.repeat_interleave(group, dim=1) for t in (keys, values))
            out = F.scaled_dot_product_attention(
                q.view(batch, heads, 1, dim), keys, values, attn_mask=mask, scale=attn.scaling
            )
            return out.view(batch, heads * dim)
        out, scores = torch.empty(batch, heads * dim), torch.empty(width)
        self._attend_rows(
            q.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), batch, heads, kv_heads, width,
            dim, keys.stride(1), keys.stride(0), starts.data_ptr(), attn.scaling, scores.data_ptr(),
        )  # fmt: skip
        return out

    @torch.no_grad()
    def decode_batch(
        self, token_ids: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """Next-token logits ``[batch, vocab]`` of a left-padded batch.

        Args:
            token_ids: Each row's new token, ``[batch]``.
            positions: Each row's new token's position (its count of earlier real tokens), ``[batch]``.
            starts: Each row's first real cache position, ``[batch]`` int64: row b's real tokens are cache
                positions ``starts[b]`` onwards (left padding is a prefix of every row).
            cache: The batch's cache; it grows by one position.
        """
        inner = self.model.model
        rotary = inner.rotary_emb
        # LlamaRotaryEmbedding.forward per row, the same operations on the same dtypes.
        freqs = positions.float()[:, None] * rotary.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * rotary.attention_scaling)[:, None, :]
        sin = (emb.sin() * rotary.attention_scaling)[:, None, :]
        x = inner.embed_tokens.weight[token_ids]
        batch, hidden = x.shape
        starts = starts.to(torch.int64).contiguous()
        for index, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            proj, norm, dim = attn._modules, layer.input_layernorm, attn.head_dim
            h = F.rms_norm(x, (hidden,), norm.weight, norm.variance_epsilon)
            q = _rotary(self._rows(proj["q_proj"], h).view(batch, -1, dim), cos, sin)
            k = _rotary(self._rows(proj["k_proj"], h).view(batch, -1, dim), cos, sin)
            v = self._rows(proj["v_proj"], h).view(batch, -1, 1, dim)
            keys, values = cache.update(k.unsqueeze(2), v, index)
            x = x + self._rows(proj["o_proj"], self._attention_rows(q, keys, values, starts, attn))
            proj, norm = mlp._modules, layer.post_attention_layernorm
            h = F.rms_norm(x, (hidden,), norm.weight, norm.variance_epsilon)
            gated = mlp.act_fn(self._rows(proj["gate_proj"], h)) * self._rows(proj["up_proj"], h)
            x = x + self._rows(proj["down_proj"], gated)
        x = F.rms_norm(x, (hidden,), inner.norm.weight, inner.norm.variance_epsilon)
        return self._rows(self.model.lm_head, x)


def _rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' `apply_rotary_pos_emb` for one tensor: t * cos + rotate_half(t) * sin."""
    half = t.shape[-1] // 2
    return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin
