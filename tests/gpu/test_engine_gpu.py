"""The generation engine on a GPU: the same logits as on the CPU (fp32 tightly, bf16 within its precision),
the same greedy text alone and batched, and every serving precision and quantization loading and running."""

from __future__ import annotations

import pytest
import torch

from llmopt.config import load_config
from llmopt.data import load_rows, response_loss
from llmopt.models import load_tokenizer
from llmopt.serve import GenerationEngine, GenerationRequest, SamplingParams, load_serving_model
from llmopt.serve._loading import ServingPrecisionError

GPU = torch.device("cuda", 0)
TEMPLATE = "### Instruction:\n{prompt}\n### Response:\n"
PROMPTS = ["Reverse the digits: 123", "Hello world", "a b c d e f", "Once upon a time"]


def _config(*overrides):
    return load_config(None, ["model.max_seq_len=64", *overrides])


def _first_logits(model, tokenizer, prompts, max_tokens=6):
    engine = GenerationEngine(model, tokenizer, max_batch_size=len(prompts), keep_logits=True)
    requests = [
        GenerationRequest(
            str(i), tokenizer.encode(p, add_special_tokens=False), SamplingParams(max_tokens=max_tokens)
        )
        for i, p in enumerate(prompts)
    ]
    out = engine.generate(requests)
    logits = torch.stack([out[str(i)][0].logits.float().cpu() for i in range(len(prompts))])
    tokens = [[o.token_id for o in out[str(i)]] for i in range(len(prompts))]
    return logits, tokens


def test_engine_logits_on_the_gpu_equal_the_cpus():
    tokenizer = load_tokenizer("tiny-llama")
    cpu = load_serving_model(_config("serving.decode_kernel=torch"), "cpu")
    cpu_logits, cpu_tokens = _first_logits(cpu, tokenizer, PROMPTS)
    fp32 = load_serving_model(_config("serving.precision=fp32"), GPU)
    assert next(fp32.parameters()).device == GPU and fp32.decode_kernel == "torch"
    gpu_logits, gpu_tokens = _first_logits(fp32, tokenizer, PROMPTS)
    assert torch.allclose(gpu_logits, cpu_logits, atol=1e-3, rtol=1e-3)
    assert gpu_tokens == cpu_tokens
    if torch.cuda.is_bf16_supported(including_emulation=False):
        bf16 = load_serving_model(_config(), GPU)  # auto: bf16 on this GPU
        assert next(bf16.parameters()).dtype == torch.bfloat16
        bf16_logits, _ = _first_logits(bf16, tokenizer, PROMPTS)
        scale = cpu_logits.abs().max()
        assert (bf16_logits - cpu_logits).abs().max() < 0.05 * scale  # bf16 keeps 8 bits of mantissa
        assert (bf16_logits.argmax(-1) == cpu_logits.argmax(-1)).float().mean() >= 0.75


def test_greedy_output_is_the_same_alone_and_batched_on_the_gpu():
    tokenizer = load_tokenizer("tiny-llama")
    model = load_serving_model(_config("serving.precision=fp32"), GPU)
    _, batched = _first_logits(model, tokenizer, PROMPTS, max_tokens=12)
    alone = [_first_logits(model, tokenizer, [p], max_tokens=12)[1][0] for p in PROMPTS]
    assert batched == alone


@pytest.mark.parametrize(
    "overrides",
    [
        ["serving.precision=fp32"],
        ["serving.precision=bf16"],
        ["serving.precision=fp16"],
        ["serving.quantization=int8", "serving.precision=fp16"],
        ["serving.quantization=nf4"],
    ],
    ids=["fp32", "bf16", "fp16", "int8", "nf4"],
)
def test_precision_and_quantization_matrix_on_the_gpu(overrides):
    config = _config(*overrides)
    if config.serving.precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        with pytest.raises(ServingPrecisionError, match="no bf16 units"):
            load_serving_model(config, GPU)
        return
    tokenizer = load_tokenizer("tiny-llama")
    model = load_serving_model(config, GPU)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    rows = load_rows("reverse", "test", limit=16)
    reference = load_serving_model(_config("serving.precision=fp32"), GPU)
    with torch.no_grad():
        base = response_loss(reference, tokenizer, rows, TEMPLATE, 64)
        loss = response_loss(model, tokenizer, rows, TEMPLATE, 64)
    print(f"\n{'/'.join(overrides)}: held-out loss {loss:.4f} (fp32 {base:.4f})")
    assert abs(loss - base) < 0.1 * base
    engine = GenerationEngine(model, tokenizer, max_batch_size=2)
    prompt = tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    params = SamplingParams(max_tokens=4, temperature=0.8, seed=7)
    out = engine.generate([GenerationRequest("a", prompt, params), GenerationRequest("b", prompt, params)])
    assert [o.token_id for o in out["a"]] == [o.token_id for o in out["b"]]  # seeded on the GPU's generator
    assert len(out["a"]) == 4 and out["a"][-1].finished
