"""Quantized and reduced-precision serving: what each setting loads, and how close it stays to fp32."""

import pytest
import torch

from llmopt.config import load_config
from llmopt.data import load_rows, response_loss
from llmopt.models import load_tokenizer
from llmopt.serve import GenerationEngine, GenerationRequest, SamplingParams, load_serving_model
from llmopt.serve._loading import ServingPrecisionError, serving_dtype

TEMPLATE = "### Instruction:\n{prompt}\n### Response:\n"


def _config(*overrides):
    return load_config(None, ["model.max_seq_len=64", *overrides])


def test_dtype_resolution():
    assert serving_dtype(_config(), "cpu") == "fp32"
    assert serving_dtype(_config("serving.precision=bf16"), "cpu") == "bf16"
    with pytest.raises(ServingPrecisionError, match=r"serving\.precision=fp32"):
        serving_dtype(_config("serving.quantization=int8", "serving.precision=bf16"), "cpu")


def test_int8_on_cpu_quantizes_linear_layers_and_stays_close_to_fp32():
    fp32 = load_serving_model(_config())
    int8 = load_serving_model(_config("serving.quantization=int8"))
    assert not fp32.training and not int8.training
    kinds = {type(m).__module__ for m in int8.modules() if "Linear" in type(m).__name__}
    assert any("quantized" in k for k in kinds)
    tokenizer = load_tokenizer("tiny-llama")
    rows = load_rows("reverse", "test", limit=16)
    with torch.no_grad():
        base = response_loss(fp32, tokenizer, rows, TEMPLATE, 64)
        quant = response_loss(int8, tokenizer, rows, TEMPLATE, 64)
    assert abs(quant - base) < 0.05 * base  # held-out loss moves by under 5%


def test_bf16_weights_and_the_engine_runs_on_quantized_models():
    bf16 = load_serving_model(_config("serving.precision=bf16"))
    assert next(bf16.parameters()).dtype == torch.bfloat16
    tokenizer = load_tokenizer("tiny-llama")
    int8 = load_serving_model(_config("serving.quantization=int8"))
    engine = GenerationEngine(int8, tokenizer, max_batch_size=2)
    prompt = tokenizer.encode("Reverse the digits: 123", add_special_tokens=False)
    out = engine.generate([GenerationRequest("a", prompt, SamplingParams(max_tokens=4))])["a"]
    assert len(out) == 4 and out[-1].finished


def test_nf4_serves_on_cpu_whatever_its_vector_units():
    # bitsandbytes' AVX512-BF16 repack asserts on the tiny preset's shapes; the loader keeps its plain kernel.
    nf4 = load_serving_model(_config("serving.quantization=nf4"))
    assert any(type(m).__name__ == "Linear4bit" for m in nf4.modules())
    tokenizer = load_tokenizer("tiny-llama")
    rows = load_rows("reverse", "test", limit=16)
    with torch.no_grad():
        base = response_loss(load_serving_model(_config()), tokenizer, rows, TEMPLATE, 64)
        quant = response_loss(nf4, tokenizer, rows, TEMPLATE, 64)
    assert abs(quant - base) < 0.1 * base
    engine = GenerationEngine(nf4, tokenizer, max_batch_size=2)
    prompt = tokenizer.encode("Reverse the digits: 123", add_special_tokens=False)
    out = engine.generate([GenerationRequest("a", prompt, SamplingParams(max_tokens=4))])["a"]
    assert len(out) == 4 and out[-1].finished


def test_serving_dtype_on_cpu_for_every_precision():
    assert serving_dtype(_config("serving.precision=fp16"), "cpu") == "fp16"  # runs on CPU, slowly
    assert serving_dtype(_config("serving.precision=auto"), "cpu") == "fp32"  # CPUs are measured, not told
