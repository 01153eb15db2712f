"""Sparse upcycling of a dense Llama/Mistral model into Mixtral: same function, right layout, trainable."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralForCausalLM,
)

from llmopt.models import load_model, load_tokenizer
from llmopt.models._upcycle import upcycle_to_moe

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea, the wind and the long road home.",
]
TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.fixture(scope="module")
def dense():
    return load_model("tiny-llama").eval()


@pytest.fixture(scope="module")
def batch():
    tokenizer = load_tokenizer("tiny-llama")
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any(), "the batch should exercise left padding"
    return enc


@pytest.fixture(scope="module")
def moe(dense):
    return upcycle_to_moe(dense, num_experts=4, top_k=2)


@torch.no_grad()
def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_upcycled_model_computes_the_dense_function(dense, moe, batch):
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(_logits(moe, batch)[real], _logits(dense, batch)[real], atol=1e-5, rtol=1e-4)


def test_structure_config_and_parameter_count(dense, moe):
    cfg = dense.config
    assert isinstance(moe, MixtralForCausalLM)
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    assert moe.config.router_aux_loss_coef == 0.01 and moe.config.output_router_logits is False
    assert moe.config.rope_parameters == cfg.rope_parameters and moe.config.sliding_window is None
    assert not moe.training and moe.dtype == dense.dtype and moe.device == dense.device
    assert moe.generation_config.to_dict() == dense.generation_config.to_dict()

    mlp = 3 * cfg.hidden_size * cfg.intermediate_size  # gate, up, down
    router = 4 * cfg.hidden_size
    expected = dense.num_parameters() + cfg.num_hidden_layers * ((4 - 1) * mlp + router)
    assert moe.num_parameters() == expected

    router_w = moe.model.layers[0].mlp.gate.weight
    assert router_w.abs().sum() > 0, "router must not start at zero"
    assert 0.5 * cfg.initializer_range < router_w.std() < 2 * cfg.initializer_range
    assert not torch.equal(router_w, moe.model.layers[1].mlp.gate.weight)
    again = upcycle_to_moe(dense, num_experts=4, top_k=2)
    assert torch.equal(again.model.layers[0].mlp.gate.weight, router_w), "seeded init is reproducible"


def test_save_and_reload(dense, moe, batch, tmp_path):
    moe.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, MixtralForCausalLM)
    torch.testing.assert_close(_logits(reloaded, batch), _logits(moe, batch), atol=0, rtol=0)

    # transformers writes the classic per-expert Mixtral layout (w1 = gate, w3 = up, w2 = down): an
    # independent check that the fused gate_up_proj halves were filled in the right order.
    mlp = dense.model.layers[1].mlp
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        prefix = "model.layers.1.block_sparse_moe.experts.3"
        assert torch.equal(f.get_tensor(f"{prefix}.w1.weight"), mlp.gate_proj.weight)
        assert torch.equal(f.get_tensor(f"{prefix}.w3.weight"), mlp.up_proj.weight)
        assert torch.equal(f.get_tensor(f"{prefix}.w2.weight"), mlp.down_proj.weight)


def test_training_with_router_aux_loss(dense, batch):
    torch.manual_seed(0)
    model = upcycle_to_moe(dense, num_experts=4, top_k=2).train()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        out = model(**batch, labels=labels, output_router_logits=True)
        assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
        assert torch.isfinite(out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    grads = model.model.layers[0].mlp.gate.weight.grad
    assert grads is not None and grads.abs().sum() > 0, "the router is trained through the aux/LM loss"


def test_mistral_with_sliding_window_and_tied_embeddings():
    torch.manual_seed(0)
    cfg = MistralConfig(**TINY, sliding_window=4, tie_word_embeddings=True, pad_token_id=0)
    dense = MistralForCausalLM(cfg).eval()
    moe = upcycle_to_moe(dense, num_experts=3, top_k=1, seed=1)
    assert moe.config.sliding_window == 4
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(1, 128, (2, 12))  # longer than the window, so the window matters
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("model", "kwargs", "needle"),
    [
        (lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)), {}, "'gpt2'"),
        (lambda: LlamaForCausalLM(LlamaConfig(**TINY, attention_bias=True)), {}, "attention_bias=True"),
        (lambda: LlamaForCausalLM(LlamaConfig(**TINY, mlp_bias=True)), {}, "mlp_bias=True"),
        (lambda: LlamaForCausalLM(LlamaConfig(**TINY)), {"num_experts": 4, "top_k": 5}, "top_k=5"),
        (lambda: LlamaForCausalLM(LlamaConfig(**TINY)), {"num_experts": 1, "top_k": 1}, "num_experts=1"),
        (lambda: LlamaForCausalLM(LlamaConfig(**TINY)).model, {}, "LlamaModel"),
    ],
    ids=["architecture", "attention_bias", "mlp_bias", "top_k", "num_experts", "no_lm_head"],
)
def test_invalid_inputs_raise(model, kwargs, needle):
    # ValueError names the offending value (and, in its message, the fix).
    kwargs = {"num_experts": 4, "top_k": 2, **kwargs}
    with pytest.raises(ValueError, match=needle):
        upcycle_to_moe(model(), **kwargs)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
def test_peft_model_must_be_merged_first():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(LlamaForCausalLM(LlamaConfig(**TINY)), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge_and_unload"):
        upcycle_to_moe(peft_model, num_experts=2, top_k=1)


def test_keeps_dtype_and_training_mode_and_leaves_input_alone():
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**TINY)).to(torch.bfloat16).train()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    rng = torch.random.get_rng_state()
    moe = upcycle_to_moe(dense, num_experts=2, top_k=2, router_init_std=0.5, seed=3)
    assert moe.training and moe.dtype == torch.bfloat16
    assert 0.3 < moe.model.layers[0].mlp.gate.weight.float().std() < 0.7
    assert torch.equal(torch.random.get_rng_state(), rng), "the caller's RNG stream is untouched"
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    assert dense.config.model_type == "llama"
