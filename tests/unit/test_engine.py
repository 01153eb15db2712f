"""The continuous-batching engine: batched equals alone (on logits), joins, leaves, stops, sampling."""

from __future__ import annotations

import pytest
import torch
from tokenizers.decoders import DecodeStream

from llmopt.models import load_model, load_tokenizer
from llmopt.serve._engine import GenerationEngine, GenerationRequest, SamplingParams, _Sequence

TEXTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "Ray Serve batches requests",
    "A much longer prompt, with punctuation; it keeps going for a while so that padding matters here.",
]
TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama").eval()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _req(tok, rid, text, **params):
    return GenerationRequest(rid, tok(text).input_ids, SamplingParams(**params))


def _engine(model, tok, **kw):
    return GenerationEngine(model, tok, keep_logits=True, **kw)


def _alone(model, tok, request):
    return _engine(model, tok).generate([request])[request.request_id]


def _tokens(outs):
    return [o.token_id for o in outs]


def _assert_same(got, want, tol=TOL):
    assert _tokens(got) == _tokens(want)
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.logits, w.logits, **tol)


def test_batched_equals_alone_on_logits(model, tok):
    requests = [_req(tok, f"r{i}", t, max_tokens=8) for i, t in enumerate(TEXTS)]
    assert len({len(r.prompt_ids) for r in requests}) == 4  # really different lengths
    alone = {r.request_id: _alone(model, tok, r) for r in requests}
    together = _engine(model, tok).generate(requests)
    for rid, outs in alone.items():
        assert len(outs) == 8 or outs[-1].finish_reason == "eos"
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        ids = _tokens(outs)[:-1] if outs[-1].finish_reason == "eos" else _tokens(outs)
        assert "".join(o.text for o in outs) == tok.decode(ids, skip_special_tokens=True)
        _assert_same(together[rid], outs)


def test_matches_hugging_face_generate(model, tok):
    request = _req(tok, "hf", TEXTS[1], max_tokens=8)
    ours = _tokens(_alone(model, tok, request))
    ids = torch.tensor([request.prompt_ids])
    ref = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=8,
        pad_token_id=tok.pad_token_id,
    )
    assert ours == ref[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize(
    ("a_text", "b_text"), [(TEXTS[3], TEXTS[0]), (TEXTS[0], TEXTS[3])], ids=["short-joins", "long-joins"]
)
def test_continuous_join(model, tok, a_text, b_text):
    # Both ways round: the newcomer's cache is left-padded, then the running cache is.
    a = _req(tok, "a", a_text, max_tokens=10)
    b = _req(tok, "b", b_text, max_tokens=4)
    engine = _engine(model, tok)
    engine.add(a)
    got: dict[str, list] = {"a": [], "b": []}
    step = 0
    first_b = finish_a = None
    while engine.has_work():
        if step == 3:
            engine.add(b)
        for out in engine.step():
            got[out.request_id].append(out)
            if out.request_id == "b" and first_b is None:
                first_b = step
            if out.request_id == "a" and out.finished:
                finish_a = step
        step += 1
    assert first_b is not None and finish_a is not None and first_b < finish_a
    _assert_same(got["a"], _alone(model, tok, a))
    _assert_same(got["b"], _alone(model, tok, b))


def test_early_finish_leaves_batch(model, tok):
    # r3 has the longest prompt: when it leaves, the columns only it used are trimmed from the cache.
    requests = [_req(tok, f"r{i}", t, max_tokens=2 if i == 3 else 6) for i, t in enumerate(TEXTS)]
    engine = _engine(model, tok)
    for r in requests:
        engine.add(r)
    got: dict[str, list] = {r.request_id: [] for r in requests}
    sizes, widths = [], []
    while engine.has_work():
        for out in engine.step():
            got[out.request_id].append(out)
        sizes.append(engine.num_running)
        widths.append(engine._mask.shape[1] if engine._mask is not None else 0)
    assert sizes[:2] == [4, 3]  # r3 left right after its 2nd output
    assert len(got["r3"]) == 2 and got["r3"][-1].finish_reason == "length"
    longest_left = max(len(r.prompt_ids) for r in requests[:3])
    assert widths[:2] == [len(requests[3].prompt_ids), longest_left + 1]
    for r in requests:
        _assert_same(got[r.request_id], _alone(model, tok, r))


def test_stop_string_truncates(model, tok):
    base = _alone(model, tok, _req(tok, "x", TEXTS[2], max_tokens=16))
    full = "".join(o.text for o in base)
    assert full == tok.decode(_tokens(base), skip_special_tokens=True)
    # The first clean 3-character piece after the start whose first occurrence is where we took it from.
    at = next(
        i
        for i in range(1, len(full) - 3)
        if "\ufffd" not in full[i : i + 3] and full.find(full[i : i + 3]) == i
    )
    stop = full[at : at + 3]
    outs = _alone(model, tok, _req(tok, "x", TEXTS[2], max_tokens=16, stop=[stop]))
    assert "".join(o.text for o in outs) == full[:at]
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    assert stop not in "".join(o.text for o in outs)


@pytest.mark.parametrize("clean_up", [False, True])
def test_streamed_text_is_the_decoded_text(model, tok, clean_up):
    # Sampled at a high temperature, a random model emits byte-fallback pieces that split characters across
    # tokens: at every step the text so far is the decode of the tokens so far (an incomplete character held
    # back), and the whole is exactly `decode` of them. With transformers' space clean-up on, the engine
    # decodes the whole output each step instead of streaming it through tokenizers' DecodeStream.
    tokenizer = load_tokenizer("tiny-llama")
    tokenizer.clean_up_tokenization_spaces = clean_up
    engine = _engine(model, tokenizer)
    assert (engine._backend is None) == clean_up
    params = {"max_tokens": 48, "temperature": 3.0}
    requests = [_req(tokenizer, f"s{i}", TEXTS[i % 4], seed=i, **params) for i in range(6)]
    for r in requests:
        engine.add(r)
    texts, tokens = {r.request_id: "" for r in requests}, {r.request_id: [] for r in requests}
    split = False
    while engine.has_work():
        for out in engine.step():
            texts[out.request_id] += out.text
            tokens[out.request_id].append(out.token_id)
            decoded = tokenizer.decode(tokens[out.request_id], skip_special_tokens=True)
            split |= decoded.endswith("\ufffd") and not out.finished
            assert decoded.startswith(texts[out.request_id]), (decoded, texts[out.request_id])
            if out.finished:
                assert texts[out.request_id] == decoded
            else:
                assert texts[out.request_id] == decoded.rstrip("\ufffd")
    assert split  # some step did end inside a character


def test_incremental_decode_joins_split_characters(model, tok):
    # The tiny tokenizer spells these characters in byte pieces, several tokens each: every step's text is
    # the decode of the tokens so far with the incomplete character held back, never a replacement mark.
    engine = _engine(model, tok)
    text = "naïve café, 日本語のテキスト, ёлка, emoji 🚀🎉 and plain ASCII."
    ids = tok(text, add_special_tokens=False).input_ids
    seq = _Sequence(GenerationRequest("x", [1]), None, stream=DecodeStream(skip_special_tokens=True))
    held = 0
    for token in ids:
        seq.token_ids.append(token)
        got = engine._decode(seq, None)
        decoded = tok.decode(seq.token_ids, skip_special_tokens=True)
        assert "\ufffd" not in got and got == decoded.rstrip("\ufffd")
        held += decoded.endswith("\ufffd")
    assert held > 5 and got == tok.decode(ids) == text
    assert engine._decode(seq, "length") == text


def test_sampling_with_seed(model, tok):
    def sampled(rid, seed, **kw):
        return _req(tok, rid, TEXTS[1], max_tokens=12, temperature=1.5, seed=seed, **kw)

    alone = _tokens(_alone(model, tok, sampled("s", 7)))
    others = [_req(tok, f"o{i}", t, max_tokens=5, temperature=1.0, seed=i) for i, t in enumerate(TEXTS)]
    batched = _engine(model, tok).generate([others[0], sampled("s", 7), *others[1:]])
    assert _tokens(batched["s"]) == alone
    assert _tokens(_alone(model, tok, sampled("s", 8))) != alone
    assert _tokens(_alone(model, tok, sampled("s", 9, top_p=0.5))) != alone
    greedy = _tokens(_alone(model, tok, _req(tok, "g", TEXTS[1], max_tokens=12)))
    assert _tokens(_alone(model, tok, sampled("k", 3, top_k=1))) == greedy
    assert _tokens(_alone(model, tok, sampled("p", 3, top_p=1e-6))) == greedy


def test_max_batch_size(model, tok):
    requests = [
        _req(tok, f"r{i}", t, max_tokens=n) for i, (t, n) in enumerate(zip(TEXTS, [3, 5, 4], strict=False))
    ]
    engine = _engine(model, tok, max_batch_size=2)
    for r in requests:
        engine.add(r)
    steps = []
    while engine.has_work():
        steps.append({o.request_id: o.finished for o in engine.step()})
        assert engine.num_running <= 2
    assert all(len(s) <= 2 for s in steps)
    assert steps[0].keys() == {"r0", "r1"}
    assert steps[2] == {"r0": True, "r1": False}
    assert steps[3].keys() == {"r1", "r2"}  # admitted the step after r0 left
    outs = {r.request_id: [] for r in requests}
    for s in steps:
        for rid in s:
            outs[rid].append(rid)
    assert [len(outs[r.request_id]) for r in requests] == [3, 5, 4]


def test_rejects_bad_requests(model, tok):
    engine = GenerationEngine(model, tok)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add(GenerationRequest("e", [], SamplingParams()))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add(GenerationRequest("m", [5], SamplingParams(max_tokens=0)))
    engine.add(GenerationRequest("d", [5], SamplingParams()))
    with pytest.raises(ValueError, match="already live"):
        engine.add(GenerationRequest("d", [6], SamplingParams()))
    assert engine.num_waiting == 1 and engine.step()[0].logits is None


def test_engine_does_not_import_ray():
    import subprocess
    import sys

    code = (
        "import sys, llmopt.serve._engine; "
        "bad = [m for m in sys.modules if m.split('.')[0] == 'ray' "
        "or m.startswith(('llmopt.train', 'llmopt.tune'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _two_turns(model, tok, engine, first_text, follow_text, max_tokens=6):
    """Run turn 1 keeping its cache; return turn 2's prompt (turn 1's tokens + new text) and that cache."""
    first = _req(tok, "t1", first_text, max_tokens=max_tokens, ignore_eos=True)
    first.keep_cache = True
    outs = engine.generate([first])["t1"]
    final = outs[-1]
    assert final.cache is not None and final.cache.get_seq_length() == len(final.cache_token_ids)
    history = first.prompt_ids + [o.token_id for o in outs]
    assert final.cache_token_ids == history[:-1]
    follow_ids = history + tok(follow_text, add_special_tokens=False).input_ids
    return follow_ids, final.cache


def test_session_reuse_equals_recompute(model, tok):
    engine = _engine(model, tok)
    follow_ids, cache = _two_turns(model, tok, engine, TEXTS[1], " And then?")
    reused = GenerationRequest("t2", follow_ids, SamplingParams(max_tokens=8), prefix_cache=cache)
    got = engine.generate([reused])["t2"]
    want = _alone(model, tok, GenerationRequest("t2", follow_ids, SamplingParams(max_tokens=8)))
    _assert_same(got, want)
    assert (
        got[0].cached_tokens
        == len(follow_ids) - len(tok(" And then?", add_special_tokens=False).input_ids) - 1
    )
    assert want[0].cached_tokens == 0


def test_sessions_with_different_cache_lengths_batch_together(model, tok):
    engine = _engine(model, tok)
    follow_a, cache_a = _two_turns(model, tok, engine, TEXTS[0], " more", max_tokens=3)
    follow_b, cache_b = _two_turns(model, tok, engine, TEXTS[3], " and more text", max_tokens=9)
    assert cache_a.get_seq_length() != cache_b.get_seq_length()
    requests = [
        GenerationRequest("a", follow_a, SamplingParams(max_tokens=6), prefix_cache=cache_a),
        GenerationRequest("b", follow_b, SamplingParams(max_tokens=6), prefix_cache=cache_b),
        _req(tok, "c", TEXTS[2], max_tokens=6),  # a fresh request in the same admission
    ]
    together = _engine(model, tok, max_batch_size=3).generate(requests)
    for rid, ids in (("a", follow_a), ("b", follow_b), ("c", tok(TEXTS[2]).input_ids)):
        _assert_same(
            together[rid], _alone(model, tok, GenerationRequest(rid, ids, SamplingParams(max_tokens=6)))
        )


def test_prefix_cache_covering_whole_prompt_is_cropped(model, tok):
    engine = _engine(model, tok)
    follow_ids, cache = _two_turns(model, tok, engine, TEXTS[1], "")
    prompt = follow_ids[:-1]  # the cache covers every token of this prompt
    assert cache.get_seq_length() == len(prompt)
    got = engine.generate([GenerationRequest("x", prompt, SamplingParams(max_tokens=4), prefix_cache=cache)])
    _assert_same(got["x"], _alone(model, tok, GenerationRequest("x", prompt, SamplingParams(max_tokens=4))))


def test_no_cache_mode_matches_cached(model, tok):
    requests = [_req(tok, f"r{i}", t, max_tokens=6) for i, t in enumerate(TEXTS)]
    cached = _engine(model, tok).generate(requests)
    requests = [_req(tok, f"r{i}", t, max_tokens=6) for i, t in enumerate(TEXTS)]
    recomputed = _engine(model, tok, use_cache=False).generate(requests)
    for rid, outs in cached.items():
        _assert_same(recomputed[rid], outs)


def test_static_mode_admits_only_between_batches(model, tok):
    engine = _engine(model, tok, max_batch_size=4, continuous=False)
    engine.add(_req(tok, "a", TEXTS[0], max_tokens=4, ignore_eos=True))
    engine.step()
    engine.add(_req(tok, "b", TEXTS[1], max_tokens=2, ignore_eos=True))
    seen = []
    while engine.has_work():
        seen.append({o.request_id for o in engine.step()})
    assert seen[:3] == [{"a"}, {"a"}, {"a"}]  # b waits for a's batch to finish
    assert "b" in seen[3]
    continuous = _engine(model, tok, max_batch_size=4)
    continuous.add(_req(tok, "a", TEXTS[0], max_tokens=4, ignore_eos=True))
    continuous.step()
    continuous.add(_req(tok, "b", TEXTS[1], max_tokens=2, ignore_eos=True))
    assert {o.request_id for o in continuous.step()} == {"a", "b"}  # b joins at once


def test_ignore_eos_and_cancel(model, tok):
    engine = _engine(model, tok)
    outs = engine.generate([_req(tok, "a", TEXTS[0], max_tokens=12, ignore_eos=True)])["a"]
    assert len(outs) == 12 and outs[-1].finish_reason == "length"
    engine.add(_req(tok, "b", TEXTS[1], max_tokens=50))
    engine.add(_req(tok, "c", TEXTS[2], max_tokens=50))
    engine.step()
    assert engine.cancel("b") and not engine.cancel("b")
    assert engine.num_running == 1
    engine.add(_req(tok, "d", TEXTS[3], max_tokens=50))
    assert engine.cancel("d") and engine.num_waiting == 0
    rest = []
    while engine.has_work():
        rest += engine.step()
    assert {o.request_id for o in rest} == {"c"}  # c keeps decoding after its neighbour left


def test_mixed_adapter_batch_equals_each_alone(model, tok, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from llmopt.models import load_model as load

    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])
        peft = get_peft_model(load("tiny-llama"), config)
        for param_name, param in peft.named_parameters():
            if "lora_" in param_name:
                param.data.normal_(0.0, 0.5)
        peft.save_pretrained(tmp_path / name)
    served = PeftModel.from_pretrained(load("tiny-llama"), str(tmp_path / "a"), adapter_name="a")
    served.load_adapter(str(tmp_path / "b"), adapter_name="b")
    served.eval()

    def request(rid, text, adapter):
        return GenerationRequest(rid, tok(text).input_ids, SamplingParams(max_tokens=5), adapter=adapter)

    jobs = [("x", TEXTS[1], "a"), ("y", TEXTS[1], "b"), ("z", TEXTS[1], None), ("w", TEXTS[3], "a")]
    together = _engine(served, tok).generate([request(*job) for job in jobs])
    loose = {"atol": 1e-3, "rtol": 1e-4}  # logits of these large random adapters reach ~70
    for rid, text, adapter in jobs:
        alone = _engine(served, tok).generate([request(rid, text, adapter)])[rid]
        _assert_same(together[rid], alone, loose)
    # Base rows of the PeftModel equal the plain model; adapter rows really differ from it.
    _assert_same(together["z"], _alone(model, tok, request("z", TEXTS[1], None)))
    assert not torch.allclose(together["x"][0].logits, together["z"][0].logits)
    assert not torch.allclose(together["x"][0].logits, together["y"][0].logits)


def test_prefill_runs_the_output_head_on_the_last_position_only(model, tok):
    """`logits_to_keep=1`: a long prompt's prefill (and a recompute without cache) runs the head once per
    row, not once per prompt token."""
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
    try:
        for use_cache in (True, False):
            shapes.clear()
            engine = _engine(model, tok, use_cache=use_cache)
            engine.generate([_req(tok, "a", "1 2 3 4 5 6 7 8 9 10 11 12", max_tokens=2)])
            assert shapes and all(shape[1] == 1 for shape in shapes), shapes
    finally:
        hook.remove()


def test_running_cache_appends_in_place_and_matches_a_plain_cache(model, tok):
    """Decode steps write into the running cache's spare capacity instead of copying it (torch.cat)."""
    request = _req(tok, "g", TEXTS[3], max_tokens=12)
    engine = _engine(model, tok)
    engine.add(request)
    outs = engine.step()
    layer = engine._cache.layers[0]
    assert type(layer).__name__ == "_BatchLayer"
    storages = []
    while engine.has_work():
        outs += engine.step()
        if engine._cache is not None:
            storages.append(engine._cache.layers[0].keys.untyped_storage().data_ptr())
    # the prefill's keys moved into a buffer with room; every decode step appends to it
    assert len(storages) == 10 and len(set(storages)) == 1
    plain = model(torch.tensor([request.prompt_ids + [o.token_id for o in outs[:-1]]])).logits[0, -1]
    torch.testing.assert_close(outs[-1].logits, plain, **TOL)


def test_churn_of_joins_and_leaves_equals_each_alone(model, tok):
    """Requests of many lengths join while others leave from the middle of the batch (their slot takes the
    last row), newcomers longer than the batch widen it on the left, and the buffers outgrow their room:
    every request still matches its run alone, on logits."""
    words = TEXTS[3].split()
    jobs = [(f"j{i}", " ".join(words[: 1 + (7 * i) % len(words)]), 2 + (5 * i) % 9) for i in range(14)]
    requests = {rid: _req(tok, rid, text, max_tokens=n, ignore_eos=True) for rid, text, n in jobs}
    engine = _engine(model, tok, max_batch_size=5)
    got: dict[str, list] = {rid: [] for rid in requests}
    arrivals = iter(requests.values())
    engine.add(next(arrivals))
    moved = widened = 0
    while engine.has_work():
        order = [s.request.request_id for s in engine._running]
        width = engine._mask.shape[1] if engine._mask is not None else 0
        for _ in range(2):  # two arrivals per step: the queue builds up, so rows leave and join each step
            if (request := next(arrivals, None)) is not None:
                engine.add(request)
        for out in engine.step():
            got[out.request_id].append(out)
        now = [s.request.request_id for s in engine._running]
        kept = [rid for rid in order if rid in now]
        moved += kept != now[: len(kept)]
        widened += engine._mask is not None and engine._mask.shape[1] > width + 1
        if engine._cache is not None:
            layer = engine._cache.layers[0]
            assert layer.keys.shape[:3] == (len(now), 2, engine._mask.shape[1])
    assert moved and widened  # both a middle-row exit and a left-widening join happened
    for rid, request in requests.items():
        _assert_same(got[rid], _alone(model, tok, request))


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
def test_virtual_tokens_of_prompt_learning_match_peft_in_a_mixed_batch(model, tok, tmp_path, kind):
    """A prompt / prefix tuning adapter served as a KV prefix gives peft's forward (recomputed in full at
    every token) in a batch with base-model rows, and its prompt log-probabilities follow the prefix."""
    import peft

    from llmopt.serve import copy_cache, load_virtual_prefixes

    config = (peft.PromptTuningConfig if kind == "prompt_tuning" else peft.PrefixTuningConfig)(
        num_virtual_tokens=6, task_type="CAUSAL_LM"
    )
    torch.manual_seed(0)
    tuned = peft.get_peft_model(load_model("tiny-llama"), config)
    for param in tuned.prompt_encoder.parameters():
        param.normal_(0.0, 1.0)
    tuned.save_pretrained(tmp_path / "a")
    tuned.eval()
    prefix = load_virtual_prefixes(model, {"a": str(tmp_path / "a")}, "cpu")["a"]
    assert prefix.get_seq_length() == 6 and not hasattr(model, "peft_config")  # the base stays plain
    ids = tok(TEXTS[2]).input_ids
    truth, seq = [], list(ids)
    for _ in range(6):
        truth.append(int(tuned(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        seq.append(truth[-1])
    engine = GenerationEngine(model, tok, max_batch_size=4)
    virtual = GenerationRequest(
        "v",
        [0] * 6 + ids,
        SamplingParams(max_tokens=6, prompt_logprobs=0),
        copy_cache(prefix),
        virtual_tokens=6,
    )
    outs = engine.generate([virtual, _req(tok, "b", TEXTS[1], max_tokens=6)])
    assert [o.token_id for o in outs["v"]] == truth
    assert outs["v"][0].cached_tokens == 0  # virtual tokens are not the caller's cached prompt
    scores = tuned(input_ids=torch.tensor([ids])).logits[0, -len(ids) :].log_softmax(-1)
    served = outs["v"][0].prompt_logprobs
    assert served[:7] == [None] * 7 and len(served) == 6 + len(ids)
    want = [float(scores[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert [v for v, _ in served[7:]] == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="virtual tokens"):
        engine.add(GenerationRequest("x", [0] * 6, SamplingParams(), copy_cache(prefix), virtual_tokens=6))


def test_prefill_token_budget_spreads_newcomers_over_steps_and_changes_no_output(model, tok):
    prompts = [TEXTS[1], TEXTS[2], TEXTS[3], TEXTS[0]]
    lengths = [len(tok(t).input_ids) for t in prompts]
    budget = lengths[0] + lengths[1]  # the first two fit; the third (the longest) waits for the next step
    outs = {}
    for limit in (None, budget):
        engine = _engine(model, tok, max_batch_size=8, max_prefill_tokens=limit)
        for i, text in enumerate(prompts):
            engine.add(_req(tok, f"r{i}", text, max_tokens=4))
        steps = []
        while engine.has_work():
            steps.append(engine.step())
        outs[limit] = steps
    unlimited, budgeted = outs[None], outs[budget]
    assert {o.request_id for o in unlimited[0]} == {"r0", "r1", "r2", "r3"}
    assert {o.request_id for o in budgeted[0]} == {"r0", "r1"}
    # The next step decodes r0 and r1 and admits r2 alone: it is longer than the budget, and runs anyway.
    assert {o.request_id for o in budgeted[1]} == {"r0", "r1", "r2"}
    assert {o.request_id for o in budgeted[2]} == {"r0", "r1", "r2", "r3"}

    def by_request(steps):
        got = {}
        for step in steps:
            for out in step:
                got.setdefault(out.request_id, []).append(out)
        return got

    got, want = by_request(budgeted), by_request(unlimited)
    assert got.keys() == want.keys()
    for rid in want:
        _assert_same(got[rid], want[rid])


def test_prefill_token_budget_leaves_static_batches_whole(model, tok):
    engine = _engine(model, tok, max_batch_size=4, continuous=False, max_prefill_tokens=1)
    for i, text in enumerate(TEXTS):
        engine.add(_req(tok, f"r{i}", text, max_tokens=2))
    assert len(engine.step()) == 4
