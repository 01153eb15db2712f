"""The lean Llama decode step (one row, or a left-padded batch): transformers' logits, used only where it
applies."""

from __future__ import annotations

import pytest
import torch

from llmopt.config import load_config
from llmopt.models import load_tokenizer
from llmopt.serve import GenerationEngine, GenerationRequest, SamplingParams, load_serving_model
from llmopt.serve.native._kernels import GEMM_ROWS, use_native_decode
from llmopt.serve.native._lean_step import LlamaDecodeStep
from tests.unit.test_native_decode import HAS_AVX2, needs_kernel

pytestmark = needs_kernel
EXACT = {"atol": 1e-5, "rtol": 0.0}


@pytest.fixture(scope="module", params=["native", "avx2"])
def native(request):
    """The tiny preset on the native kernels: this CPU's widest build, then the AVX2 + FMA build (what CPUs
    without AVX-512 run; `LLMOPT_NATIVE_ISA=avx2`)."""
    if request.param == "avx2" and not HAS_AVX2:
        pytest.skip("this CPU has no AVX2 + FMA")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LLMOPT_NATIVE_ISA", request.param)
        model = load_serving_model(load_config(None, ["model.max_seq_len=128"]))
        assert model.decode_kernel.startswith("native")
        if request.param == "avx2":
            assert "AVX2 + FMA" in model.decode_kernel, model.decode_kernel
        yield model
    use_native_decode(torch.nn.Linear(1, 1))  # the products of later models: this CPU's widest build again


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


def _run(model, tok, requests, lean, max_batch_size=8):
    engine = GenerationEngine(model, tok, max_batch_size=max_batch_size, keep_logits=True, lean_decode=lean)
    return engine, engine.generate(requests)


def _requests(tok):
    texts = ["Hello", "Ray Serve batches requests dynamically", "Reverse: 12345"]
    sampled = SamplingParams(max_tokens=7, temperature=0.9, top_k=20, seed=3)
    return [
        GenerationRequest("greedy", tok(texts[0]).input_ids, SamplingParams(max_tokens=9)),
        GenerationRequest("sampled", tok(texts[1]).input_ids, sampled),
        GenerationRequest("short", tok(texts[2]).input_ids, SamplingParams(max_tokens=2)),
    ]


def _assert_same(got, want):
    assert [o.token_id for o in got] == [o.token_id for o in want]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.logits, w.logits, **EXACT)


def test_lean_step_gives_transformers_logits_alone(native, tok, monkeypatch):
    calls = []
    step = LlamaDecodeStep.__call__
    monkeypatch.setattr(LlamaDecodeStep, "__call__", lambda *a: calls.append(a[2]) or step(*a))
    for request in _requests(tok):
        engine, lean = _run(native, tok, [request], lean=True)
        assert engine.decode_path == "lean Llama step"
        _, plain = _run(native, tok, [request], lean=False)
        _assert_same(lean[request.request_id], plain[request.request_id])
    assert len(calls) == (9 - 1) + (7 - 1) + (2 - 1)  # every decode step after the prefill


def test_a_batch_that_shrinks_to_one_row_continues_on_the_lean_step(native, tok, monkeypatch):
    """Rows of different lengths are left-padded; once one row is left, it decodes on the lean step."""
    calls = []
    step = LlamaDecodeStep.__call__
    monkeypatch.setattr(LlamaDecodeStep, "__call__", lambda *a: calls.append(a[2]) or step(*a))
    requests = _requests(tok)
    _, batched = _run(native, tok, requests, lean=True)
    assert calls, "the last running row never used the lean step"
    for request in requests:
        _, alone = _run(native, tok, [request], lean=False)
        _assert_same(batched[request.request_id], alone[request.request_id])


def test_session_follow_up_on_the_lean_step_equals_a_full_recompute(native, tok):
    first = GenerationRequest(
        "t1", tok("A cached first turn").input_ids, SamplingParams(max_tokens=5), keep_cache=True
    )
    _, out = _run(native, tok, [first], lean=True)
    last = out["t1"][-1]
    follow_ids = [*last.cache_token_ids, last.token_id, *tok(" and a follow-up").input_ids[1:]]
    reuse = GenerationRequest("t2", follow_ids, SamplingParams(max_tokens=6), prefix_cache=last.cache)
    _, reused = _run(native, tok, [reuse], lean=True)
    full = GenerationRequest("t2", follow_ids, SamplingParams(max_tokens=6))
    _, recomputed = _run(native, tok, [full], lean=False)
    assert reused["t2"][0].cached_tokens > 0
    _assert_same(reused["t2"], recomputed["t2"])


def test_lean_step_serves_only_what_it_reproduces(native, tok):
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    torch_kernel = load_serving_model(load_config(None, ["serving.decode_kernel=torch"]))
    engine = GenerationEngine(torch_kernel, tok)
    assert engine.decode_path.startswith("transformers (not every projection runs the native")
    with pytest.raises(ValueError, match="not every projection runs the native decode kernel"):
        LlamaDecodeStep(torch_kernel)
    moe = load_serving_model(load_config(None, ["model.name_or_path=tiny-moe"]))
    assert "is not LlamaForCausalLM" in GenerationEngine(moe, load_tokenizer("tiny-moe")).decode_path
    adapted = get_peft_model(load_serving_model(load_config(None, [])), LoraConfig(r=4))
    assert GenerationEngine(adapted, tok).decode_path.startswith("transformers")

    # A LoRA layer injected after the engine was built (in a layer, or the output head) runs its own forward
    # inside the lean step.
    request = _requests(tok)[0]
    for target in ("v_proj", "lm_head"):
        model = load_serving_model(load_config(None, []))
        engine = GenerationEngine(model, tok, keep_logits=True)
        assert engine.decode_path == "lean Llama step"
        inject_adapter_in_model(LoraConfig(r=4, target_modules=[target], init_lora_weights=False), model)
        lean = engine.generate([request])[request.request_id]
        _, plain = _run(model, tok, [request], lean=False)
        _assert_same(lean, plain[request.request_id])


def test_attention_kernel_and_its_fallback_agree_with_grouped_heads(native):
    """The native single-query attention on a cache buffer, and SDPA on a layout the kernel does not take."""
    step = LlamaDecodeStep(native)
    attn = native.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, length, dim = 4, 2, 37, attn.head_dim
    q = torch.randn(heads, dim, generator=gen)
    buffer = torch.randn(2, 1, kv_heads, length + 11, dim, generator=gen)  # room to grow, like the engine's
    keys, values = buffer[0, :, :, :length], buffer[1, :, :, :length]
    scores = (q.view(kv_heads, 2, dim) @ keys[0].transpose(-1, -2)) * attn.scaling
    want = (scores.softmax(-1) @ values[0]).reshape(-1)
    row = q.view(1, heads, dim)  # the single-row step's call: one row, attending from position 0
    got = step._attention_rows(row, keys, values, step._no_padding, attn).view(-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    strided = keys.transpose(2, 3).contiguous().transpose(2, 3)  # same values, position stride != dim
    got = step._attention_rows(row, strided, values, step._no_padding, attn).view(-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_batched_lean_step_gives_transformers_logits_as_rows_join_and_leave(native, tok, monkeypatch):
    """Rows of many lengths (greedy and sampled) join and leave a running batch decoded by the lean step;
    each matches its run alone through transformers' forward, on logits."""
    batches = []
    step = LlamaDecodeStep.decode_batch
    monkeypatch.setattr(LlamaDecodeStep, "decode_batch", lambda *a: batches.append(len(a[1])) or step(*a))
    words = [
        "Ray",
        "Serve",
        "batches",
        "requests",
        "dynamically",
        "and",
        "keeps",
        "a",
        "KV",
        "cache",
        "for",
        "every",
        "session",
    ]
    requests = [
        GenerationRequest(
            f"r{i}",
            tok(" ".join(words[: 1 + (5 * i) % len(words)])).input_ids,
            SamplingParams(max_tokens=2 + (3 * i) % 7, temperature=0.8 * (i % 2), seed=i),
        )
        for i in range(9)
    ]
    engine = GenerationEngine(native, tok, max_batch_size=4, keep_logits=True)
    got = {r.request_id: [] for r in requests}
    for i, request in enumerate(requests):
        engine.add(request)
        if i % 2:
            for out in engine.step():
                got[out.request_id].append(out)
    while engine.has_work():
        for out in engine.step():
            got[out.request_id].append(out)
    assert max(batches) == 4 and len(set(batches)) > 1, batches
    for request in requests:
        _, alone = _run(native, tok, [request], lean=False)
        _assert_same(got[request.request_id], alone[request.request_id])


def _many_requests(count: int) -> list[GenerationRequest]:
    """Prompts of 3-19 tokens, 2-6 output tokens, every third request sampled."""
    return [
        GenerationRequest(
            f"r{i}",
            [10 + (7 * i + j) % 900 for j in range(3 + (5 * i) % 17)],
            SamplingParams(max_tokens=2 + i % 5, temperature=0.7 * (i % 3 == 0), seed=i),
        )
        for i in range(count)
    ]


@pytest.mark.parametrize("low", [GEMM_ROWS[0], 8], ids=["shipped", "from-8-rows"])
def test_a_full_batch_on_fused_native_products_gives_transformers_logits(native, tok, monkeypatch, low):
    """A batch wide enough for the native product (GEMM_ROWS) runs as one native step, a narrower one layer
    by layer on fused products (from 8 rows: both paths in one run): each row, greedy or sampled, matches its
    run alone through transformers' forward, on logits."""
    import llmopt.serve.native._lean_step as lean_step

    monkeypatch.setattr(lean_step, "GEMM_ROWS", (low, GEMM_ROWS[1]))
    native_rows, fused_rows = [], []
    whole_step, fused = LlamaDecodeStep._native_step, LlamaDecodeStep._fused_layer

    def count_native(self, x, *args):
        logits = whole_step(self, x, *args)
        if logits is not None:
            native_rows.append(len(x))
        return logits

    monkeypatch.setattr(LlamaDecodeStep, "_native_step", count_native)
    monkeypatch.setattr(LlamaDecodeStep, "_fused_layer", lambda *a: fused_rows.append(len(a[1])) or fused(*a))
    count = low + 4
    requests = _many_requests(count)
    _, got = _run(native, tok, requests, lean=True, max_batch_size=count)
    assert max(native_rows) == count and min(native_rows) >= low, sorted(set(native_rows))
    # Two rows or more run natively from the shipped bound on; one row takes the single-row step.
    assert (fused_rows and max(fused_rows) < low) or low <= 2, sorted(set(fused_rows))
    for request in requests:
        _, alone = _run(native, tok, [request], lean=False)
        _assert_same(got[request.request_id], alone[request.request_id])


def test_native_prefill_gives_transformers_logits_and_cache(native, tok, monkeypatch):
    """Fresh prompts of up to GEMM_ROWS[1] tokens in all prefill in one native call, left-padded to the
    longest: each prompt's last logits, and its keys and values at its own positions, match transformers'
    forward of that prompt alone; the padding is zeros and masked out. More tokens, or an empty prompt, are
    left to transformers. In the engine, requests prefilled that way (greedy and sampled, decoded alone and
    batched) match runs through transformers."""
    from transformers import DynamicCache

    step = LlamaDecodeStep(native)
    high = GEMM_ROWS[1]
    for lengths in ([1], [2], [40], [high], [3, 17, 40], [64, 64], [1, 5, 9, 100]):
        prompts = [[10 + (11 * j + 7 * i) % 900 for j in range(n)] for i, n in enumerate(lengths)]
        logits, cache, mask = step.prefill_many(prompts)
        width = max(lengths)
        assert logits.shape == (len(prompts), native.config.vocab_size)
        assert mask.tolist() == [[0] * (width - n) + [1] * n for n in lengths]
        for row, ids in enumerate(prompts):
            want_cache = DynamicCache()
            with torch.no_grad():
                want = native(
                    input_ids=torch.tensor([ids]), past_key_values=want_cache, use_cache=True
                ).logits
            torch.testing.assert_close(logits[row : row + 1], want[:, -1], **EXACT)
            first = width - len(ids)
            for got, expected in zip(cache.layers, want_cache.layers, strict=True):
                torch.testing.assert_close(
                    got.keys[row : row + 1, :, first:], expected.keys, atol=1e-5, rtol=1e-5
                )
                torch.testing.assert_close(
                    got.values[row : row + 1, :, first:], expected.values, atol=1e-5, rtol=1e-5
                )
                assert not got.keys[row, :, :first].any() and not got.values[row, :, :first].any()
    assert step.prefill_many([list(range(10, 10 + high // 2 + 1))] * 2) is None
    assert step.prefill_many([[11, 12], []]) is None

    prefilled = []
    original = LlamaDecodeStep.prefill_many

    def counted(self, prompts):
        done = original(self, prompts)
        if done is not None:
            prefilled.append(sorted(len(ids) for ids in prompts))
        return done

    monkeypatch.setattr(LlamaDecodeStep, "prefill_many", counted)
    requests = [
        GenerationRequest(
            f"p{i}",
            [10 + (13 * i + 5 * j) % 900 for j in range(2 + 9 * i)],
            SamplingParams(max_tokens=3 + i, temperature=0.8 * (i % 2), seed=i),
        )
        for i in range(4)
    ]
    for batch in (1, 4):
        _, got = _run(native, tok, requests, lean=True, max_batch_size=batch)
        for request in requests:
            _, alone = _run(native, tok, [request], lean=False)
            _assert_same(got[request.request_id], alone[request.request_id])
    lengths = sorted(len(r.prompt_ids) for r in requests)
    assert sorted(prefilled) == sorted([[n] for n in lengths] + [lengths])  # one by one, then one wave


def test_a_wave_wider_than_the_native_prefill_runs_one_batched_forward(native, tok, monkeypatch):
    """Fresh prompts of one step with more than GEMM_ROWS[1] tokens in all are prefilled in one batched
    forward of transformers (left-padded, different lengths), where MKL's products are faster; each request,
    greedy or sampled, then decodes on the lean step exactly as it does alone through transformers."""
    native_prefills, original = [], LlamaDecodeStep.prefill_many
    monkeypatch.setattr(
        LlamaDecodeStep,
        "prefill_many",
        lambda self, p: (native_prefills.append(len(p)), original(self, p))[1],
    )
    requests = [
        GenerationRequest(
            f"w{i}",
            [10 + (11 * i + 7 * j) % 900 for j in range(40 + 5 * i)],
            SamplingParams(max_tokens=6, temperature=0.8 * (i % 2), seed=i),
        )
        for i in range(4)
    ]
    assert sum(len(r.prompt_ids) for r in requests) > GEMM_ROWS[1]
    forwards, forward = [], GenerationEngine._forward
    monkeypatch.setattr(
        GenerationEngine,
        "_forward",
        lambda self, ids, *a: forwards.append(ids.shape) or forward(self, ids, *a),
    )
    _, got = _run(native, tok, requests, lean=True, max_batch_size=4)
    assert native_prefills == [4] and forwards == [(4, 55)]  # tried natively, then one forward of the wave
    for request in requests:
        _, alone = _run(native, tok, [request], lean=False)
        _assert_same(got[request.request_id], alone[request.request_id])


def test_fused_weights_are_views_and_a_replaced_weight_is_never_stale(tok):
    """q|k|v and gate|up are fused without copying; a projection weight replaced after the engine was built
    makes its layer fall back to the separate products (and a wide batch to the layer-by-layer step), with
    transformers' logits."""
    model = load_serving_model(load_config(None, ["model.max_seq_len=128"]))
    engine = GenerationEngine(model, tok, max_batch_size=GEMM_ROWS[0] + 2, keep_logits=True)
    layer = model.model.layers[1]
    fused = engine._lean._fused[1]
    attn = layer.self_attn
    assert fused.qkv.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()
    assert torch.equal(fused.qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert fused.intact()
    with torch.no_grad():
        attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight * 1.5)
    assert not fused.intact() and engine._lean._fused[0].intact()
    requests = _requests(tok) + _many_requests(GEMM_ROWS[0])
    got = engine.generate(requests)
    for request in requests:
        _, alone = _run(model, tok, [request], lean=False)
        _assert_same(got[request.request_id], alone[request.request_id])


def test_batched_attention_kernel_and_its_fallback_agree(native):
    """Each row of a left-padded batch attends from its own first real position."""
    step = LlamaDecodeStep(native)
    attn = native.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, width, dim = 3, 4, 2, 29, attn.head_dim
    q = torch.randn(batch, heads, dim, generator=gen)
    buffer = torch.randn(2, batch + 2, kv_heads, width + 9, dim, generator=gen)
    keys, values = buffer[0, :batch, :, :width], buffer[1, :batch, :, :width]
    starts = torch.tensor([0, 11, 28])
    want = []
    for b in range(batch):
        k, v = keys[b, :, starts[b] :], values[b, :, starts[b] :]
        scores = (q[b].view(kv_heads, 2, dim) @ k.transpose(-1, -2)) * attn.scaling
        want.append((scores.softmax(-1) @ v).reshape(-1))
    want = torch.stack(want)
    got = step._attention_rows(q, keys, values, starts, attn)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    strided = keys.transpose(2, 3).contiguous().transpose(2, 3)  # same values, position stride != dim
    torch.testing.assert_close(
        step._attention_rows(q, strided, values, starts, attn), want, atol=1e-5, rtol=1e-4
    )


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_results_do_not_depend_on_the_kernels_thread_count(native, tok, torch_threads):
    """A replica with a share of several CPUs splits the native products, the batched attention and the
    prefill over that many threads (torch's count): at odd sizes the products equal one thread's bit for
    bit, and so do an engine's logits where only the native kernels compute (one native prefill of four
    prompts of 2-35 tokens, then whole native steps, greedy and sampled). torch's own products (MKL) can round
    differently with another thread count, so paths through them are compared elsewhere, to 1e-5."""
    from llmopt.serve.native._kernels import load_kernels

    kernels, _ = load_kernels()
    gen = torch.Generator().manual_seed(5)
    products = ((29, 27, 70), (45, 1003, 64), (24, 517, 300))  # rows, n, k: tails of column blocks
    # 2.4 MiB (split by rows) and the tiny preset's head (1 MiB, one thread)
    matrices = [torch.randn(*s, generator=gen) for s in ((700, 900), (1024, 256))]
    requests = [
        GenerationRequest(
            f"r{i}",
            [10 + (7 * i + 3 * j) % 900 for j in range(GEMM_ROWS[0] + (11 * i) % 37)],
            SamplingParams(max_tokens=4, temperature=0.8 * (i % 3 == 0), seed=i),
        )
        for i in range(GEMM_ROWS[0] + 2)
    ]
    native_rows, prefilled = [], []
    whole_step, prefill = LlamaDecodeStep._native_step, LlamaDecodeStep.prefill_many

    def run_all(threads: int) -> list[torch.Tensor]:
        torch.set_num_threads(threads)
        kernels.follow_torch_threads()
        assert kernels.threads() == threads
        out = []
        for rows, n, k in products:
            g = torch.Generator().manual_seed(rows)
            x, w, b, y = (torch.randn(*s, generator=g) for s in ((rows, k), (n, k), (n,), (rows, n)))
            scratch = torch.empty(kernels.gemm_scratch(rows, n, k))
            kernels.gemm(x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), rows, n, k, 1,
                         scratch.data_ptr())  # fmt: skip
            out.append(y)
        for w in matrices:
            x, y = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(1)), torch.empty(len(w))
            kernels.gemv(w.data_ptr(), x.data_ptr(), None, y.data_ptr(), *w.shape)
            out.append(y)
        _, got = _run(native, tok, requests, lean=True, max_batch_size=len(requests))
        return out + [o.logits for r in requests for o in got[r.request_id]]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            LlamaDecodeStep, "_native_step", lambda *a: native_rows.append(len(a[1])) or whole_step(*a)
        )
        patch.setattr(
            LlamaDecodeStep, "prefill_many", lambda *a: prefilled.append(prefill(*a)) or prefilled[-1]
        )
        one = run_all(1)
        for threads in (3, 2):
            for a, b in zip(one, run_all(threads), strict=True):
                assert torch.equal(a, b)
    assert native_rows == 9 * [len(requests)]  # 3 steps after the prefills, on each of 3 runs
    assert len(prefilled) == 3 and None not in prefilled  # the wave in one call, on each of 3 runs
