"""A model's dimensions and the counts the cost model needs: parameters, LoRA adapters, activations.

Everything here is arithmetic on the transformers config (read without weights). The activation
coefficients were derived for Hugging Face decoder layers (Llama / Mistral / Qwen2 attention with
`sdpa`, gated-SiLU MLPs, Mixtral-style routed experts) by counting the tensors autograd saves for
backward, and checked against `llmopt.train._checkpointing.measure_layer_activations` on several
dimension sets (they match it exactly for llama and mixtral; see tests/unit/test_tune_cost.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache
from typing import Any

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP = ("gate_proj", "up_proj", "down_proj")
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class LoraCount:
    """Parameters LoRA adds and trains, for one strategy on one model.

    Attributes:
        adapter_params: Adapter (A and B) parameters over all layers.
        saved_params: Parameters of `modules_to_save` (trained in full; the frozen original stays).
        targeted: Short names of the adapted parts in a decoder layer (`q_proj`, ..., `experts`).
        saves_lm_head: Whether the output head trains in full.
        rank_elems_per_token: Adapter intermediate elements (r per adapted linear) per token per layer.
        method: `lora.method`.
        delta_elems_per_layer: LoHa and LoKr build each adapted linear's full delta weight in every forward
            and multiply by it: its elements per layer (0 for the other methods).
        virtual_tokens: Prompt tuning's extra positions in every sequence; prefix tuning's extra keys and
            values in every attention.
        expert_elems_per_layer: Elements of the fused expert parameters with adapters, all experts of one
            layer. peft folds `W + B @ A` into them on every forward (`ParamWrapper`), so the grouped product
            takes a weight that needs a gradient: the full weight gradient is computed, and `B @ A` is built
            and differentiated, where a linear's adapter multiplies each token by `A` and `B`.
        expert_adapter_params: The part of `adapter_params` on fused experts (all layers): trained like the
            others, but computed through the fold, not per token.
        rank: The adapter rank.
    """

    adapter_params: int
    saved_params: int
    targeted: frozenset[str]
    saves_lm_head: bool
    rank_elems_per_token: int
    method: str = "lora"
    delta_elems_per_layer: int = 0
    virtual_tokens: int = 0
    expert_elems_per_layer: int = 0
    expert_adapter_params: int = 0
    rank: int = 0

    @property
    def trainable(self) -> int:
        return self.adapter_params + self.saved_params

    def expert_flops(self, top_k: int, num_experts: int) -> tuple[float, float]:
        """FLOPs of the adapters on fused experts, per layer: `(per token, per micro-batch)`.

        A token's `top_k` experts each add a weight-gradient product. Each forward builds `B @ A` for every
        expert twice: peft registers the fold as a parametrization on every forward, and torch evaluates a
        new parametrization once to check it. The backward differentiates one build for both factors.
        (Counted with torch's FlopCounterMode on tiny-moe in tests/unit/test_tune_cost.py.)"""
        if not self.expert_elems_per_layer:
            return 0.0, 0.0
        per_expert = self.expert_elems_per_layer / max(1, num_experts)
        return 2.0 * top_k * per_expert, 8.0 * self.rank * self.expert_elems_per_layer


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of a decoder-only transformer (dense or mixture of experts).

    Attributes:
        name: The model reference it was read from.
        model_type: transformers' model type (`llama`, `mixtral`, ...).
        num_layers, hidden, intermediate, heads, kv_heads, head_dim, vocab: The usual dimensions;
            `intermediate` is one expert's FFN size for an MoE.
        num_experts: Routed experts per layer (0 for a dense model).
        top_k: Experts per token (0 for a dense model).
        shared_intermediate: FFN size of a shared expert (Qwen2-MoE), 0 if none.
        tie_embeddings: Whether the output head shares the input embedding.
        qkv_bias: Whether q/k/v projections have biases (Qwen2).
        total_params: Exact parameter count when known (meta-device count), else None.
    """

    name: str
    model_type: str
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    num_experts: int = 0
    top_k: int = 0
    shared_intermediate: int = 0
    tie_embeddings: bool = False
    qkv_bias: bool = False
    total_params: int | None = None

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Any, name: str = "") -> ModelShape:
        """Read the dimensions of a transformers config (text config of multimodal ones)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or 0
        intermediate = getattr(text, "moe_intermediate_size", None) if experts else None
        return cls(
            name=name,
            model_type=text.model_type,
            num_layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            intermediate=intermediate or text.intermediate_size,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            vocab=text.vocab_size,
            num_experts=experts,
            top_k=getattr(text, "num_experts_per_tok", 0) if experts else 0,
            shared_intermediate=getattr(text, "shared_expert_intermediate_size", 0) or 0,
            tie_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
            qkv_bias=text.model_type.startswith("qwen2"),
        )

    def upcycled(self, num_experts: int, top_k: int) -> ModelShape:
        """The shape after `llmopt.models.upcycle_to_moe` (every FFN copied into each expert)."""
        return replace(self, model_type="mixtral", num_experts=num_experts, top_k=top_k, total_params=None)

    # --- dimensions ------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """nn.Linear modules of one decoder layer: dotted name -> (in_features, out_features)."""
        h, i = self.hidden, self.intermediate
        shapes = {
            "self_attn.q_proj": (h, self.q_dim),
            "self_attn.k_proj": (h, self.kv_dim),
            "self_attn.v_proj": (h, self.kv_dim),
            "self_attn.o_proj": (self.q_dim, h),
        }
        if not self.is_moe:
            shapes.update({"mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)})
            return shapes
        shapes["mlp.gate"] = (h, self.num_experts)
        if self.shared_intermediate:
            s = self.shared_intermediate
            shapes.update(
                {
                    "mlp.shared_expert.gate_proj": (h, s),
                    "mlp.shared_expert.up_proj": (h, s),
                    "mlp.shared_expert.down_proj": (s, h),
                    "mlp.shared_expert_gate": (h, 1),
                }
            )
        return shapes

    def expert_shapes(self) -> dict[str, tuple[int, int]]:
        """Fused 3-D expert parameters of one layer: dotted name -> (in, out) of each of `num_experts`."""
        if not self.is_moe:
            return {}
        h, i = self.hidden, self.intermediate
        return {"mlp.experts.gate_up_proj": (h, 2 * i), "mlp.experts.down_proj": (i, h)}

    @property
    def layer_linear_params(self) -> int:
        """Quantizable weights of one layer: its linear layers and fused experts (biases excluded)."""
        linear = sum(a * b for a, b in self.linear_shapes().values())
        return linear + self.num_experts * sum(a * b for a, b in self.expert_shapes().values())

    @property
    def layer_params(self) -> int:
        """All parameters of one decoder layer (two RMSNorm weights and q/k/v biases included)."""
        bias = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return self.layer_linear_params + 2 * self.hidden + bias

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab * self.hidden

    @property
    def linear_params(self) -> int:
        """What int8/nf4 quantize: every decoder layer's linear weights and experts (not the head)."""
        return self.num_layers * self.layer_linear_params

    @property
    def params(self) -> int:
        """Total parameters: exact when known, else the analytic count."""
        if self.total_params is not None:
            return self.total_params
        return self.embedding_params + self.num_layers * self.layer_params + self.hidden + self.head_params

    def matmul_params_per_token(self, top_k: int | None = None) -> int:
        """Weights one token multiplies in a forward pass (routed experts: only its top-k; head included)."""
        k = self.top_k if top_k is None else top_k
        layer = sum(a * b for a, b in self.linear_shapes().values())
        layer += k * sum(a * b for a, b in self.expert_shapes().values())
        return self.num_layers * layer + self.vocab * self.hidden

    # --- LoRA --------------------------------------------------------------------------------------
    def lora_count(
        self, targets: dict[str, Any], r: int, method: str = "lora", virtual_tokens: int = 0
    ) -> LoraCount:
        """Adapter and fully-trained parameters of a peft strategy.

        Args:
            targets: What `llmopt.models.lora_targets` resolves (`target_modules` as a list or
                `all-linear`, `target_parameters`, `modules_to_save`, IA3's `feedforward_modules`).
            r: Adapter rank.
            method: `lora.method`.
            virtual_tokens: `lora.num_virtual_tokens` (prompt and prefix tuning).

        Returns:
            The counts, as peft builds the adapters for a linear (in, out): LoRA r * (in + out); DoRA that
            plus a magnitude per output; IA3 one scale per output (per input for feed-forward modules);
            LoHa 2 * r * (in + out); LoKr a full Kronecker factor and a rank-r (or full) second factor over
            peft's factorisation of in and out. A fused expert parameter of `num_experts` matrices (in, out)
            gets r * num_experts * (in + out) (plain LoRA). Prompt tuning learns `virtual_tokens` input
            embeddings; prefix tuning their keys and values in every layer.
        """
        linear = self.linear_shapes()
        modules = targets.get("target_modules") or []
        if modules == "all-linear":
            chosen = set(linear)
        else:
            chosen = {name for name in linear if any(_matches(name, t) for t in modules)}
        feedforward = targets.get("feedforward_modules") or []
        adapter = sum(_adapter_params(method, r, *linear[n], _feedforward(n, feedforward)) for n in chosen)
        experts = {
            name
            for name in self.expert_shapes()
            if any(_matches(name, t) for t in targets.get("target_parameters") or [])
        }
        on_experts = sum(r * self.num_experts * sum(self.expert_shapes()[n]) for n in experts)
        adapter += on_experts
        saved, saves_head = 0, False
        for target in targets.get("modules_to_save") or []:
            if target in ("lm_head", "model.lm_head"):
                saves_head = True
                saved += self.vocab * self.hidden
            else:
                saved += self.num_layers * sum(a * b for n, (a, b) in linear.items() if _matches(n, target))
        short = {n.rsplit(".", 1)[-1] for n in chosen} | ({"experts"} if experts else set())
        adapter *= self.num_layers
        if method == "prompt_tuning":
            adapter = virtual_tokens * self.hidden
        elif method == "prefix_tuning":
            adapter = virtual_tokens * self.num_layers * 2 * self.kv_dim
        rank = {"ia3": 0, "prompt_tuning": 0, "prefix_tuning": 0}.get(method, r)
        prompt = method if method in ("prompt_tuning", "prefix_tuning") else None
        return LoraCount(
            adapter_params=adapter,
            saved_params=saved,
            targeted=frozenset(short),
            saves_lm_head=saves_head,
            rank_elems_per_token=rank * len(chosen),
            method=method,
            delta_elems_per_layer=sum(a * b for n, (a, b) in linear.items() if n in chosen)
            if method in ("loha", "lokr")
            else 0,
            virtual_tokens=virtual_tokens if method in ("prompt_tuning", "prefix_tuning") else 0,
            expert_elems_per_layer=self.num_experts
            * sum(a * b for a, b in (self.expert_shapes()[n] for n in experts))
            if prompt is None
            else 0,
            expert_adapter_params=on_experts * self.num_layers if prompt is None else 0,
            rank=rank,
        )

    # --- activations -------------------------------------------------------------------------------
    def activation_elems(
        self,
        frozen_base: bool,
        lora: LoraCount | None = None,
        top_k: int | None = None,
        router_loss: bool = False,
    ) -> tuple[float, float, float, float]:
        """Elements autograd saves for backward, per token, in one forward (sdpa attention).

        Args:
            frozen_base: True under LoRA/QLoRA (base weights frozen: their inputs are saved only where
                an adapter or another op needs them).
            lora: The LoRA count (which parts are adapted, its rank), when `frozen_base`.
            top_k: Experts per token (default: the model's).
            router_loss: The MoE load-balancing loss is on (`output_router_logits`): it keeps every
                layer's router logits and their softmax.

        Returns:
            `(first_layer, other_layer, layer_constant, outside)`: elements per token for the first decoder
            layer and for each other one, elements per layer independent of the token count (LoRA on
            fused experts materializes each layer's delta weights), and elements per token outside the
            layers (embedding, final norm, head, loss). Multiply by the activation dtype's bytes.
        """
        h, kv, i, a, d, v = self.hidden, self.kv_dim, self.intermediate, self.heads, self.head_dim, self.vocab
        k = self.top_k if top_k is None else top_k
        route = (k * (2 * h + 10) + self.num_experts + 1) if self.is_moe else 0
        aux = 2 * self.num_experts * self.num_layers if self.is_moe and router_loss else 0
        if not frozen_base:
            mlp = 4 * i * (k if self.is_moe else 1) + route
            mlp += 4 * self.shared_intermediate + (h if self.shared_intermediate else 0)
            layer = 8 * h + 2 * kv + a + 2 + mlp
            return float(layer), float(layer), 0.0, float(v + 3 * h + d + 5 + aux)
        targeted = lora.targeted if lora else frozenset()
        layer = 3 * h + 2 * kv + a + 2
        if targeted & {"q_proj", "k_proj", "v_proj"}:
            layer += h  # the normed input, kept for the adapters' weight gradients
        if "o_proj" in targeted:
            layer += h  # the attention output
        if self.is_moe:
            layer += k * (3 * i + h + 10) + self.num_experts + 1
            if "experts" in targeted:
                layer += k * (h + i)
            layer += 3 * self.shared_intermediate
        else:
            layer += 3 * i
            if targeted & {"gate_proj", "up_proj"}:
                layer += h
            if "down_proj" in targeted:
                layer += i
        layer += lora.rank_elems_per_token if lora else 0
        constant = 0.0
        if "experts" in targeted:  # peft adds B @ A to the fused weights: one delta per expert matrix
            constant = float(self.num_experts * sum(a_ * b_ for a_, b_ in self.expert_shapes().values()))
        if lora is not None:  # LoHa / LoKr keep each adapted linear's built delta weight for backward
            constant += float(lora.delta_elems_per_layer)
        outside = v + h + d + 3 + aux + (2 * h + 2 if lora and lora.saves_lm_head else 0)
        # The first layer's input is the frozen embedding output, which its norm need not keep.
        return float(layer - h - 1), float(layer), constant, float(outside)

    def upcast_elems(
        self,
        frozen_base: bool,
        lora: LoraCount | None = None,
        top_k: int | None = None,
        router_loss: bool = False,
    ) -> tuple[float, float, float]:
        """What 16-bit training keeps beyond `activation_elems` x 2 bytes, per token, in 16-bit elements:
        `(first_layer, other_layer, outside)` (measured against autograd's saved tensors in
        tests/unit/test_tune_cost.py).

        `activation_elems` counts elements as fp32 training saves them, where an RMSNorm's upcast of its
        input to fp32 is the input itself. In bf16 / fp16 each RMSNorm that autograd records keeps that fp32
        copy (twice the input's bytes) and its fp32 statistics: `hidden + 3` more 16-bit elements; the
        loss keeps the fp32 upcast of the logits beside the 16-bit logits (`vocab` more, in `outside`). An
        MoE router's fp32 softmax and its index tensors take twice the 16-bit elements they take in fp32
        ones (`top_k x 10 + experts + 1` more a layer; with the load-balancing loss, its fp32 softmax over
        every layer's router logits: `experts x layers + 1` more outside). In the first layer a norm (and
        the router after it) is recorded only when its input requires grad: under a full fine-tune (the
        embedding trains), or when attention has adapters to train.
        """
        norm = self.hidden + 3
        k = self.top_k if top_k is None else top_k
        route = k * 10 + self.num_experts + 1 if self.is_moe else 0
        outside = (
            norm + self.vocab + (self.num_experts * self.num_layers + 1 if self.is_moe and router_loss else 0)
        )
        other = 2.0 * norm + route
        if not frozen_base:
            return other, other, float(outside)
        targeted = lora.targeted if lora else frozenset()
        attention = bool(targeted & {"q_proj", "k_proj", "v_proj", "o_proj"})
        return float(norm + route if attention else 0), other, float(outside)

    def adapter_dropout_elems(
        self, lora: LoraCount | None, shared_qkv_input: bool = False, mask_elems: float = 1.0
    ) -> tuple[float, float]:
        """What adapters' input dropouts add to a layer's saved tensors, per token: `(first_layer,
        other_layer)` in elements of the activation dtype (measured against autograd's saved tensors in
        tests/unit/test_tune_cost.py).

        Each adapted linear's adapter keeps its own dropped copy of its input (peft), or the q/k/v adapters
        share one (LitGPT's LoRAQKVLinear, a fused qkv). Where that input requires grad, dropout keeps its
        mask too: `mask_elems` per element (1 on CPU, where dropout keeps a noise tensor of the input's
        dtype; 1 / dtype bytes on CUDA, whose fused dropout keeps a bool mask). The copies replace the
        inputs only the adapters kept without dropout (the normed inputs of q/k/v and of gate/up, the
        input of down_proj); the attention output stays, as attention keeps it whenever q/k/v require
        grad. In the first layer q/k/v's input (the frozen embedding's) requires no grad.
        """
        if lora is None:
            return 0.0, 0.0
        t = lora.targeted
        h, i = self.hidden, self.intermediate
        qkv, o = t & {"q_proj", "k_proj", "v_proj"}, "o_proj" in t
        mlp_in = set() if self.is_moe else t & {"gate_proj", "up_proj"}
        down = not self.is_moe and "down_proj" in t
        qkv_copies = (1 if shared_qkv_input else len(qkv)) * h if qkv else 0
        copies = qkv_copies + (self.q_dim if o else 0) + len(mlp_in) * h + (i if down else 0)
        freed = (h if qkv else 0) + (h if mlp_in else 0) + (i if down else 0)
        other = copies - freed + mask_elems * copies
        # First layer: dropout records nothing on an input that requires no grad, and without q/k/v
        # adapters attention keeps no output, so o_proj's copy replaces it too.
        attention_grad = bool(qkv)
        stream_grad = attention_grad or o
        first_masked = (self.q_dim if o and attention_grad else 0) + (len(mlp_in) * h if stream_grad else 0)
        first_masked += i if down and (stream_grad or mlp_in) else 0
        first = copies - freed - (0 if attention_grad or not o else self.q_dim) + mask_elems * first_masked
        return float(first), float(other)


def _feedforward(name: str, feedforward: list[str]) -> bool:
    return any(_matches(name, t) for t in feedforward)


def _adapter_params(method: str, r: int, fan_in: int, fan_out: int, feedforward: bool = False) -> int:
    """Adapter parameters peft adds to one linear layer (fan_in -> fan_out) for `method`."""
    if method == "ia3":
        return fan_in if feedforward else fan_out
    if method == "loha":
        return 2 * r * (fan_in + fan_out)
    if method == "lokr":
        # peft's LoKr: W = kron(w1, w2) over factorisations out = l * k, in = m * n; w1 (l, m) in full,
        # w2 (k, n) as w2_a @ w2_b of rank r unless r is at least half of max(k, n).
        from peft.tuners.lokr.layer import factorization

        m, n = factorization(fan_in, -1)
        l_, k = factorization(fan_out, -1)
        second = k * n if r >= max(k, n) / 2 else r * (k + n)
        return l_ * m + second
    return r * (fan_in + fan_out) + (fan_out if method == "dora" else 0)


def _matches(name: str, target: str) -> bool:
    """peft's rule: a target names a module exactly or as a dotted suffix."""
    return name == target or name.endswith("." + target)


@cache
def model_shape(name_or_path: str) -> ModelShape:
    """The shape of a preset, local model directory or hub id (config only; exact parameter count).

    Raises:
        llmopt.models.ModelLoadError: the config cannot be read.
    """
    from llmopt.models import load_config_only, model_info

    shape = ModelShape.from_hf_config(load_config_only(name_or_path), name_or_path)
    return replace(shape, total_params=model_info(name_or_path).num_parameters)
