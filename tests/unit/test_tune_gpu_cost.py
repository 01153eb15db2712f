"""The GPU cost model (llmopt.tune._gpu_cost) against published fine-tuning measurements, and sanity.

Run with `pytest -s` to see the table of predicted against published figures.

Tolerances: the issue's aims are 10% for memory and 25% for throughput. Rows that meet them are held to
them; rows that miss are held to the achieved error rounded up, with the reason next to them, so that a
change that makes them worse still fails.
"""

from __future__ import annotations

import pytest

from llmopt.tune._catalog import gpu_profile
from llmopt.tune._gpu_cost import (
    GpuStrategy,
    compare_published,
    format_comparison,
    predict_memory,
    predict_throughput,
)

MEMORY_AIM = 0.10
THROUGHPUT_AIM = 0.25

# (id, quantity) -> tolerance, for the rows that miss the aims, with why.
MISSES = {
    # LitGPT QLoRA (Oct 2023, bf16-true, no checkpointing): its LoRA rows are within the aim once the 16-bit
    # upcasts and the LoRA dropout are counted; its QLoRA rows keep ~3 GB more than bitsandbytes' saved
    # inputs and the dequantized weight account for. Not modelled.
    ("litgpt-llama2-7b-qlora-nf4-1xa100-40gb", "memory_gb"): 0.18,
    ("litgpt-llama2-13b-qlora-nf4-1xa100-40gb", "memory_gb"): 0.17,
    # Multi-GPU LitGPT (FSDP): 35.6 GB per GPU is barely below the 1-GPU figure while the training state is
    # sharded 4 ways; the peak is presumably when the full checkpoint is loaded into the FSDP module, not in
    # training. The model predicts the training peak only.
    ("litgpt-llama2-13b-lora-fsdp-4xa100-40gb", "memory_gb"): 0.76,
    # Qwen full fine-tune: the published figure is the whole card at the longest length that still fit
    # (a lower bound on the need, "G" of unknown meaning); the model's 2P + 18P/N DeepSpeed ZeRO-2 states
    # alone are 85 GB, so it over-predicts a run that did fit. See the follow-ups in the module report.
    ("qwen-7b-full-zero2-seq1024-2xa100-80gb", "memory_gb"): 0.13,
    # torchtune 8B QLoRA on an RTX 4090: the README's config version is not pinned; later single-device
    # configs offload activations to the CPU, which would remove most of the predicted 1.8 GB of
    # activations and 2.1 GB of logits.
    ("torchtune-llama31-8b-qlora-1xrtx4090", "memory_gb"): 0.31,
    # torchtune numbers are with torch.compile (README note): fused kernels run above the single eager
    # MFU constant (these rows imply ~0.6 of the A100's peak).
    ("torchtune-llama31-70b-lora-8xa100", "tokens_per_s"): 0.30,
    ("torchtune-llama31-70b-full-cpu-offload-8xa100", "tokens_per_s"): 0.30,
}

ROWS = compare_published()
COMPARED = [r for r in ROWS if not r.skipped]


def test_prints_the_table() -> None:
    print("\n" + format_comparison(ROWS))
    assert len(COMPARED) >= 15  # 22 published rows; skips are for an unknown setup only


@pytest.mark.parametrize("row", COMPARED, ids=lambda r: f"{r.id}:{r.quantity}")
def test_row_within_tolerance(row) -> None:
    aim = MEMORY_AIM if row.quantity == "memory_gb" else THROUGHPUT_AIM
    tolerance = MISSES.get((row.id, row.quantity), aim)
    assert abs(row.error) <= tolerance, (
        f"{row.id} {row.quantity}: predicted {row.predicted:.1f}, published {row.published:.1f}, "
        f"error {100 * row.error:+.1f}% > {100 * tolerance:.0f}%; breakdown {row.breakdown}"
    )


def test_misses_are_still_misses() -> None:
    """A listed miss that now meets the aim should move back to the aim (keeps MISSES honest)."""
    errors = {(r.id, r.quantity): abs(r.error) for r in COMPARED}
    for key in MISSES:
        aim = MEMORY_AIM if key[1] == "memory_gb" else THROUGHPUT_AIM
        assert key in errors, f"{key} is no longer compared"
        assert errors[key] > aim, f"{key} now meets the aim ({100 * errors[key]:.1f}%); drop it from MISSES"


def test_skips_say_why() -> None:
    for r in ROWS:
        if r.skipped:
            assert r.predicted is None and len(r.skipped) > 10


# --- sanity -----------------------------------------------------------------------------------------------
LLAMA_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}
H100 = gpu_profile("h100")


def test_zero3_over_more_gpus_uses_less_memory_per_gpu() -> None:
    base = GpuStrategy(method="full", deepspeed=True, zero_stage=3, gradient_checkpointing=True)
    mems = [
        predict_memory(LLAMA_7B, GpuStrategy(**{**base.__dict__, "gpus_per_node": n})).allocated
        for n in (1, 2, 4, 8)
    ]
    assert mems == sorted(mems, reverse=True) and mems[0] > 2 * mems[-1]


def test_zero_stages_lower_memory() -> None:
    mems = [
        predict_memory(
            LLAMA_7B, GpuStrategy(method="full", deepspeed=True, zero_stage=z, gpus_per_node=8)
        ).allocated
        for z in (0, 1, 2, 3)
    ]
    assert mems[0] > mems[1] > mems[2] > mems[3]


def test_checkpointing_lowers_activations() -> None:
    off = predict_memory(LLAMA_7B, GpuStrategy(method="lora", seq_len=4096))
    on = predict_memory(LLAMA_7B, GpuStrategy(method="lora", seq_len=4096, gradient_checkpointing=True))
    assert on.activations < off.activations / 4
    slow = predict_throughput(LLAMA_7B, GpuStrategy(method="lora", gradient_checkpointing=True), H100)
    assert slow < predict_throughput(LLAMA_7B, GpuStrategy(method="lora"), H100)


def test_adapter_dropout_keeps_a_byte_mask_and_a_copy_in_place_of_the_input() -> None:
    t = 4 * 1024  # tokens of one micro-batch
    plain = GpuStrategy(method="lora", micro_batch=4, seq_len=1024)  # q_proj and v_proj
    base = predict_memory(LLAMA_7B, plain).activations
    peft = predict_memory(LLAMA_7B, GpuStrategy(**{**vars(plain), "lora_dropout": 0.05})).activations
    # peft: q and v each keep a 2-byte copy of the 4096-wide input (which no longer needs keeping itself)
    # and, but in the first layer, CUDA's 1-byte dropout mask.
    assert peft - base == pytest.approx(t * (32 * 4096 * 2 + 31 * 2 * 4096))
    shared = GpuStrategy(**{**vars(plain), "lora_dropout": 0.05, "shared_qkv_input": True})
    assert predict_memory(LLAMA_7B, shared).activations - base == pytest.approx(
        t * 31 * 4096
    )  # LitGPT: a mask
    full = GpuStrategy(method="full", micro_batch=4, seq_len=1024, lora_dropout=0.05)
    assert (
        predict_memory(LLAMA_7B, full).activations
        == predict_memory(LLAMA_7B, GpuStrategy(method="full", micro_batch=4, seq_len=1024)).activations
    )  # no adapters, no adapter dropout


def test_qlora_below_lora_below_full() -> None:
    kw = {"gradient_checkpointing": True, "seq_len": 2048}
    full = predict_memory(LLAMA_7B, GpuStrategy(method="full", **kw)).allocated
    lora = predict_memory(LLAMA_7B, GpuStrategy(method="lora", **kw)).allocated
    qlora = predict_memory(LLAMA_7B, GpuStrategy(method="qlora", quantization="nf4", **kw)).allocated
    assert qlora < lora < full
    assert 14e9 < lora < 20e9 and full > 100e9  # 2 bytes/param + activations; 16+ bytes/param


def test_offload_moves_states_to_host() -> None:
    kw = {"method": "full", "deepspeed": True, "zero_stage": 3, "gpus_per_node": 8}
    on_gpu = predict_memory(LLAMA_7B, GpuStrategy(**kw))
    offloaded = predict_memory(LLAMA_7B, GpuStrategy(**kw, offload_optimizer=True, offload_params=True))
    assert offloaded.allocated < on_gpu.allocated and offloaded.host_offloaded > 0 == on_gpu.host_offloaded


def test_throughput_scales_with_gpus_and_pays_for_slow_links() -> None:
    one = predict_throughput(
        LLAMA_7B, GpuStrategy(method="full", zero_stage=3, deepspeed=True, grad_accum=8), H100
    )
    eight = predict_throughput(
        LLAMA_7B,
        GpuStrategy(method="full", zero_stage=3, deepspeed=True, gpus_per_node=8, grad_accum=8),
        H100,
    )
    # Near-linear; the sharded optimizer step (1/8 of the AdamW traffic per GPU) pushes it a little past 8x
    # (at grad_accum 1 the 1-GPU AdamW step is ~27% of the step, so 8 GPUs would be ~10x).
    assert 6 * one < eight < 9 * one
    slow_net = GpuStrategy(
        method="full", zero_stage=3, deepspeed=True, gpus_per_node=8, nodes=2, inter_node_bytes_per_s=3e9
    )
    fast_net = GpuStrategy(**{**slow_net.__dict__, "inter_node_bytes_per_s": 50e9})
    assert predict_throughput(LLAMA_7B, slow_net, H100) < predict_throughput(LLAMA_7B, fast_net, H100)
    with pytest.raises(ValueError, match="inter_node"):
        predict_throughput(LLAMA_7B, GpuStrategy(gpus_per_node=8, nodes=2), H100)


def test_full_costs_more_flops_than_lora_and_qlora_pays_dequant() -> None:
    full = predict_throughput(LLAMA_7B, GpuStrategy(method="full"), H100)
    lora = predict_throughput(LLAMA_7B, GpuStrategy(method="lora"), H100)
    qlora = predict_throughput(LLAMA_7B, GpuStrategy(method="qlora", quantization="nf4"), H100)
    assert full < lora and qlora < lora


def test_rejects_bad_strategies() -> None:
    with pytest.raises(ValueError):
        GpuStrategy(method="qlora")
    with pytest.raises(ValueError):
        GpuStrategy(zero_stage=4)
    with pytest.raises(ValueError):
        GpuStrategy(loss="nope")
