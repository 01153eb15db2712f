"""serving.decode_kernel: the native batch-1 GEMV matches torch, falls back where it must, errors clearly."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from llmopt.config import load_config
from llmopt.models import load_model, load_tokenizer
from llmopt.serve import GenerationEngine, GenerationRequest, SamplingParams, load_serving_model
from llmopt.serve._loading import ServingPrecisionError
from llmopt.serve.native._kernels import (
    GEMM_ROWS,
    HUGE_PAGE,
    DecodeLinear,
    _compiler,
    _cpu_flags,
    _load_kernels,
    huge_page_empty,
    huge_pages_available,
    load_gemv,
    load_kernels,
    use_native_decode,
)

TOL = {"atol": 1e-4, "rtol": 1e-4}
BUILDABLE = platform.machine().lower() in ("x86_64", "amd64") and _compiler() is not None
needs_kernel = pytest.mark.skipif(not BUILDABLE, reason="the native kernel needs x86-64 and a C compiler")
HAS_AVX2 = BUILDABLE and {"avx2", "fma"} <= set(_cpu_flags().split())


def _config(*overrides):
    return load_config(None, ["model.max_seq_len=128", *overrides])


@pytest.fixture
def fresh_kernel_cache(tmp_path, monkeypatch):
    """An empty llmopt cache and a cleared in-process kernel, so the kernel is really rebuilt."""
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path))
    _load_kernels.cache_clear()
    yield tmp_path
    _load_kernels.cache_clear()


@needs_kernel
def test_kernel_builds_into_the_cache_and_matches_f_linear(fresh_kernel_cache):
    gemv, description = load_gemv()
    assert gemv is not None, description
    assert "AVX" in description and list((fresh_kernel_cache / "kernels").glob("gemv-*.so"))
    gen = torch.Generator().manual_seed(1)
    for out_f, in_f, bias in (
        (1, 1, False),
        (5, 15, True),
        (33, 100, True),
        (768, 3072, False),
        (7, 1025, True),
    ):
        layer = torch.nn.Linear(in_f, out_f, bias=bias)
        torch.nn.init.normal_(layer.weight, generator=gen)
        x = torch.randn(1, 1, in_f, generator=gen)
        want = layer(x).detach()
        use_native_decode(layer)
        assert type(layer) is DecodeLinear
        with torch.no_grad():
            got = layer(x)
        assert got.shape == want.shape == (1, 1, out_f)
        torch.testing.assert_close(got, want, **TOL)


@needs_kernel
def test_only_single_row_inference_uses_the_kernel(monkeypatch):
    layer = torch.nn.Linear(64, 32)
    use_native_decode(layer)
    calls = []
    kernel = DecodeLinear._gemv
    monkeypatch.setattr(DecodeLinear, "_gemv", staticmethod(lambda *a: calls.append(a) or kernel(*a)))
    x = torch.randn(1, 64)
    with torch.no_grad():
        layer(x)
        assert len(calls) == 1
        layer(torch.randn(3, 64))  # a batch: torch's GEMM
        layer(torch.randn(64, 2).t()[:1])  # not contiguous
        layer(x.double().float()[:, :64])  # contiguous copy: kernel again
    assert len(calls) == 2
    out = layer(x.requires_grad_())  # autograd keeps torch's kernel, and gradients flow
    out.sum().backward()
    assert len(calls) == 2 and layer.weight.grad is not None


@needs_kernel
def test_a_few_rows_use_the_native_product_where_it_builds(monkeypatch):
    """Prefill-sized inputs (GEMM_ROWS) run the native product and match F.linear; more rows keep torch's."""
    kernels, description = load_kernels()
    assert kernels is not None, description
    gen = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(100, 45)
    torch.nn.init.normal_(layer.weight, generator=gen)
    use_native_decode(layer)
    calls = []
    gemm = DecodeLinear._gemm
    monkeypatch.setattr(DecodeLinear, "_gemm", staticmethod(lambda *a: calls.append(a[4]) or gemm(*a)))
    low, high = GEMM_ROWS
    with torch.no_grad():
        for shape in ((low - 1, 100), (1, low, 100), (2, 33, 100), (high, 100), (high + 1, 100)):
            x = torch.randn(*shape, generator=gen)
            torch.testing.assert_close(
                layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), **TOL
            )
    assert calls == [low, 66, high]


@needs_kernel
def test_served_model_decodes_like_torch_alone_and_in_a_batch():
    """Greedy logits of the native path equal torch's, alone and against a batch (which stays on GEMM)."""
    tok = load_tokenizer("tiny-llama")
    native = load_serving_model(_config())
    plain = load_serving_model(_config("serving.decode_kernel=torch"))
    assert native.decode_kernel.startswith("native") and plain.decode_kernel == "torch"
    switched = [m for m in native.modules() if type(m) is DecodeLinear]
    assert len(switched) == 4 * 7 + 1  # q k v o gate up down per layer, and the output head
    assert native.state_dict().keys() == plain.state_dict().keys()
    texts = ["Hello", "Ray Serve batches requests", "Reverse the digits: 12345"]
    requests = [
        GenerationRequest(f"r{i}", tok(t).input_ids, SamplingParams(max_tokens=6))
        for i, t in enumerate(texts)
    ]

    def run(model, reqs):
        with torch.no_grad():
            return GenerationEngine(model, tok, keep_logits=True).generate(reqs)

    batched = run(plain, requests)
    for request in requests:
        alone_native = run(native, [request])[request.request_id]
        alone_torch = run(plain, [request])[request.request_id]
        for want in (alone_torch, batched[request.request_id]):
            assert [o.token_id for o in alone_native] == [o.token_id for o in want]
            for got, ref in zip(alone_native, want, strict=True):
                torch.testing.assert_close(got.logits, ref.logits, **TOL)


@needs_kernel
def test_lora_adapters_wrap_the_native_layers():
    from peft import LoraConfig, get_peft_model

    model = load_model("tiny-llama").eval()
    ids = torch.tensor([[5, 17, 99]])
    peft = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft.eval()
    with torch.no_grad():
        want = [peft(ids[:, : i + 1]).logits[:, -1] for i in range(3)]
        use_native_decode(peft)
        assert type(peft.base_model.model.model.layers[0].self_attn.q_proj.base_layer) is DecodeLinear
        got = [peft(ids[:, : i + 1]).logits[:, -1] for i in range(3)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


def test_torch_setting_and_non_fp32_keep_torch_kernels():
    for overrides in (["serving.decode_kernel=torch"], ["serving.precision=bf16"]):
        model = load_serving_model(_config(*overrides))
        assert model.decode_kernel == "torch"
        assert not any(type(m) is DecodeLinear for m in model.modules())
    int8 = load_serving_model(_config("serving.quantization=int8"))
    assert int8.decode_kernel == "torch"
    assert not any(type(m) is DecodeLinear for m in int8.modules())


@pytest.mark.skipif(not HAS_AVX2, reason="this CPU has no AVX2 + FMA")
def test_the_avx2_build_is_its_own_build_and_passes_the_self_check(fresh_kernel_cache, monkeypatch):
    """LLMOPT_NATIVE_ISA=avx2 builds the 8-wide variant beside the native one (on an AVX-512 CPU, a second
    library) and loads it only after it matched torch on every kernel; an unknown value is refused by name."""
    native, native_description = load_kernels()
    assert native is not None, native_description
    monkeypatch.setenv("LLMOPT_NATIVE_ISA", "avx2")
    avx2, description = load_kernels()
    assert avx2 is not None, description
    assert description.startswith("native AVX2 + FMA GEMV")
    builds = list((fresh_kernel_cache / "kernels").glob("gemv-*.so"))
    assert len(builds) == (2 if native_description.startswith("native AVX-512") else 1)
    monkeypatch.setenv("LLMOPT_NATIVE_ISA", "avx1024")
    kernels, reason = load_kernels()
    assert kernels is None and "LLMOPT_NATIVE_ISA='avx1024'" in reason and "avx2" in reason
    with pytest.raises(ServingPrecisionError, match="LLMOPT_NATIVE_ISA"):
        load_serving_model(_config("serving.decode_kernel=native"))


def test_native_where_it_cannot_run_is_a_config_error_and_auto_falls_back(fresh_kernel_cache, monkeypatch):
    with pytest.raises(ServingPrecisionError, match=r"serving\.decode_kernel=auto"):
        load_serving_model(_config("serving.decode_kernel=native", "serving.precision=bf16"))
    with pytest.raises(ServingPrecisionError, match=r"quantization='int8'.*serving\.decode_kernel=auto"):
        load_serving_model(_config("serving.decode_kernel=native", "serving.quantization=int8"))
    monkeypatch.setenv("CC", str(fresh_kernel_cache / "no-such-compiler"))
    gemv, reason = load_gemv()
    assert gemv is None and "could not build" in reason
    with pytest.raises(ServingPrecisionError, match=r"serving\.decode_kernel='native' cannot be used here"):
        load_serving_model(_config("serving.decode_kernel=native"))
    model = load_serving_model(_config())  # auto: torch's kernel, and the model still serves
    assert model.decode_kernel == "torch"
    with pytest.raises(ValueError, match="decode_kernel"):
        _config("serving.decode_kernel=fast")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds `address` in this process (`hg`: advised to use huge pages)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            start, end = (int(x, 16) for x in first.split("-"))
            inside = start <= address < end
        elif inside and first == "VmFlags:":
            return line.split()[1:]
    return []


THP = huge_pages_available()


@pytest.mark.skipif(not THP, reason="transparent huge pages are off on this machine")
def test_huge_page_buffers_are_aligned_and_advised():
    t = huge_page_empty(3 * HUGE_PAGE // 4 + 5)
    assert t.dtype is torch.float32 and t.numel() == 3 * HUGE_PAGE // 4 + 5
    assert t.data_ptr() % HUGE_PAGE == 0
    t.fill_(1.5)
    assert float(t.sum()) == 1.5 * t.numel()
    assert "hg" in _vm_flags(t.data_ptr())


@needs_kernel
@pytest.mark.skipif(not THP, reason="transparent huge pages are off on this machine")
def test_served_weights_move_to_huge_pages_with_the_same_values():
    plain = load_serving_model(_config("serving.decode_kernel=torch"))
    native = load_serving_model(_config())
    assert "MiB of weights on 2 MiB pages" in native.decode_kernel
    switched = [m for m in native.modules() if type(m) is DecodeLinear]
    for module in switched:
        assert "hg" in _vm_flags(module.weight.data_ptr()), module
    for (name, a), (_, b) in zip(native.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # Layers are laid out in the order decoding reads them: consecutive projections share a buffer.
    attn = native.model.layers[0].self_attn
    q, k = attn.q_proj.weight, attn.k_proj.weight
    assert k.data_ptr() == q.data_ptr() + q.numel() * 4
    kept, _ = use_native_decode(load_model("tiny-llama").eval(), huge_pages=False)
    assert kept == len(switched)
