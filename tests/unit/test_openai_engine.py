"""The engine's OpenAI and vLLM sampling features: log-probabilities (checked against a direct forward pass),
penalties, logit bias, min_tokens, stop tokens, and one request's failure leaving its batch alone."""

from __future__ import annotations

import pytest
import torch

from llmopt.models import load_model, load_tokenizer
from llmopt.serve._engine import GenerationEngine, GenerationRequest, SamplingParams

PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog.", "Ray Serve batches requests"]


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


def _run(model, tok, requests, **kw):
    return GenerationEngine(model, tok, keep_logits=True, **kw).generate(requests)


def _ids(outs):
    return [o.token_id for o in outs]


def test_logprobs_match_a_direct_forward_pass(model, tok):
    request = _req(tok, "a", PROMPTS[1], max_tokens=6, logprobs=3, prompt_logprobs=2, temperature=0.8, seed=3)
    outs = _run(model, tok, [request])["a"]
    ids = request.prompt_ids + _ids(outs)
    reference = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    start = len(request.prompt_ids)
    for i, out in enumerate(outs):
        row = reference[start - 1 + i]
        assert out.logprob == pytest.approx(float(row[out.token_id]), abs=1e-4)
        top = row.topk(3)
        assert [t for t, _ in out.top_logprobs] == top.indices.tolist()
        assert [v for _, v in out.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    prompt = outs[0].prompt_logprobs
    assert prompt[0] is None and len(prompt) == start
    for i in range(1, start):
        value, alternatives = prompt[i]
        assert value == pytest.approx(float(reference[i - 1, request.prompt_ids[i]]), abs=1e-4)
        assert [t for t, _ in alternatives] == reference[i - 1].topk(2).indices.tolist()
    assert all(o.prompt_logprobs is None for o in outs[1:])


def test_processors_batched_equal_alone_on_logits(model, tok):
    """Penalties, bias and min_tokens on some rows change neither those rows' results nor their neighbours'
    when batched (greedy, compared on logits)."""
    shaped = dict(
        presence_penalty=0.5, frequency_penalty=0.7, repetition_penalty=1.3, logit_bias={5: 3.0}, min_tokens=4
    )
    requests = lambda: [  # noqa: E731
        _req(tok, "plain", PROMPTS[0], max_tokens=8),
        _req(tok, "shaped", PROMPTS[1], max_tokens=8, **shaped),
        _req(
            tok, "sampled", PROMPTS[2], max_tokens=8, temperature=0.9, seed=7, min_p=0.05, frequency_penalty=1
        ),
    ]
    together = _run(model, tok, requests())
    for request in requests():
        alone = _run(model, tok, [request])[request.request_id]
        got = together[request.request_id]
        assert _ids(got) == _ids(alone)
        for g, a in zip(got, alone, strict=True):
            torch.testing.assert_close(g.logits, a.logits, atol=1e-4, rtol=1e-4)


def test_penalties_and_bias_change_the_choice_as_defined(model, tok):
    engine = GenerationEngine(model, tok)
    base = engine.generate([_req(tok, "b", PROMPTS[1], max_tokens=12, ignore_eos=True)])["b"]
    # A bias of +100 makes one token every greedy pick; -100 on the greedy first token removes it.
    forced = engine.generate([_req(tok, "f", PROMPTS[1], max_tokens=4, logit_bias={7: 100.0})])["f"]
    assert _ids(forced) == [7, 7, 7, 7]
    banned = engine.generate(
        [_req(tok, "x", PROMPTS[1], max_tokens=1, logit_bias={base[0].token_id: -100.0})]
    )
    assert banned["x"][0].token_id != base[0].token_id
    # A large frequency penalty forbids repeating a generated token, as long as others remain.
    penalised = engine.generate(
        [
            _req(
                tok,
                "p",
                PROMPTS[1],
                max_tokens=12,
                ignore_eos=True,
                frequency_penalty=2.0,
                logit_bias=None or {},
            )
        ]
    )["p"]
    assert len(set(_ids(base))) < len(_ids(base)), "the plain greedy output repeats (else the test is moot)"
    repeated = lambda ids: sum(ids[i] in ids[:i] for i in range(len(ids)))  # noqa: E731
    assert repeated(_ids(penalised)) < repeated(_ids(base))


def test_min_tokens_stop_token_ids_and_stop_string_in_output(model, tok):
    engine = GenerationEngine(model, tok)
    base = engine.generate([_req(tok, "b", PROMPTS[0], max_tokens=10, ignore_eos=True)])["b"]
    ids = _ids(base)
    stop_id = ids[2]
    stopped = engine.generate([_req(tok, "s", PROMPTS[0], max_tokens=10, stop_token_ids=[stop_id])])["s"]
    assert stopped[-1].finish_reason == "stop" and _ids(stopped) == ids[: ids.index(stop_id) + 1]
    assert "".join(o.text for o in stopped) == tok.decode(ids[: ids.index(stop_id)], skip_special_tokens=True)
    late = engine.generate(
        [
            _req(
                tok,
                "m",
                PROMPTS[0],
                max_tokens=10,
                stop_token_ids=[stop_id],
                min_tokens=ids.index(stop_id) + 2,
            )
        ]
    )["m"]
    assert len(late) >= ids.index(stop_id) + 2  # the stop token could not end it before min_tokens
    text = tok.decode(ids, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    kept = engine.generate(
        [
            _req(
                tok,
                "k",
                PROMPTS[0],
                max_tokens=10,
                ignore_eos=True,
                stop=[stop],
                include_stop_str_in_output=True,
            )
        ]
    )["k"]
    out = "".join(o.text for o in kept)
    assert (
        kept[-1].finish_reason == "stop" and out.endswith(stop) and out == text[: text.find(stop) + len(stop)]
    )


@pytest.mark.parametrize(
    "hostile",
    [
        {"temperature": 1.0, "top_p": 1e-300},
        {"temperature": 1e-300},
        {"temperature": 1.0, "min_p": 1.0, "top_k": 1},
        {"temperature": 2.0, "seed": 2**64 + 5},
        {"temperature": 1.0, "seed": -(2**63)},
        {"temperature": 1.0, "repetition_penalty": 5e-324},
        {"temperature": 0.0, "repetition_penalty": 5e-324, "logit_bias": {3: -100.0}},
    ],
)
def test_hostile_sampling_values_sample_and_leave_the_batch_alone(model, tok, hostile):
    greedy = [_req(tok, f"g{i}", t, max_tokens=6) for i, t in enumerate(PROMPTS)]
    alone = {r.request_id: _ids(_run(model, tok, [r])[r.request_id]) for r in greedy}
    together = _run(model, tok, [*greedy, _req(tok, "h", PROMPTS[1], max_tokens=6, **hostile)])
    assert together["h"][-1].finish_reason in ("length", "eos")
    for rid, ids in alone.items():
        assert _ids(together[rid]) == ids


def test_a_failing_row_finishes_with_an_error_and_the_batch_goes_on(model, tok, monkeypatch):
    engine = GenerationEngine(model, tok, keep_logits=True)
    forward = engine._forward
    lean = engine._lean

    def poisoned(ids, mask, positions, cache, seqs):
        logits = forward(ids, mask, positions, cache, seqs)
        for row, seq in enumerate(seqs):
            if seq.request.request_id == "bad":
                logits[row] = float("nan")
        return logits

    monkeypatch.setattr(engine, "_forward", poisoned)
    engine._lean = None  # every step through `_forward`
    good = [_req(tok, f"g{i}", t, max_tokens=5) for i, t in enumerate(PROMPTS)]
    results = engine.generate([*good, _req(tok, "bad", PROMPTS[0], max_tokens=5)])
    engine._lean = lean
    assert results["bad"][-1].finish_reason == "error" and "not finite" in results["bad"][-1].error
    assert len(results["bad"]) == 1
    for request in good:
        alone = _run(model, tok, [request])[request.request_id]
        assert _ids(results[request.request_id]) == _ids(alone)
    assert not engine.has_work()


def test_vocabulary_checks(model, tok):
    engine = GenerationEngine(model, tok)
    vocab = model.config.vocab_size
    for params in ({"logit_bias": {vocab: 1.0}}, {"stop_token_ids": [-1]}):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.add(_req(tok, "v", PROMPTS[0], **params))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add(GenerationRequest("t", [1, vocab], SamplingParams()))


def test_processors_and_logprobs_with_a_session_prefix_equal_a_recompute(model, tok):
    """A session's cached prefix changes nothing: penalties over the whole prompt, bias, logprobs and a
    sampled choice are the same as with a full prefill."""
    engine = GenerationEngine(model, tok, keep_logits=True)
    first = _req(tok, "t1", PROMPTS[1], max_tokens=6, ignore_eos=True)
    first.keep_cache = True
    outs = engine.generate([first])["t1"]
    follow = first.prompt_ids + _ids(outs) + tok(" And then?", add_special_tokens=False).input_ids
    params = dict(
        max_tokens=6, repetition_penalty=1.4, presence_penalty=0.4, logit_bias={9: 2.0}, logprobs=2,
        temperature=0.7, seed=4,
    )  # fmt: skip
    reused = GenerationRequest("t2", follow, SamplingParams(**params), prefix_cache=outs[-1].cache)
    got = engine.generate([reused])["t2"]
    want = _run(model, tok, [GenerationRequest("t2", follow, SamplingParams(**params))])["t2"]
    assert got[0].cached_tokens > 0 and want[0].cached_tokens == 0
    assert _ids(got) == _ids(want)
    assert [o.logprob for o in got] == pytest.approx([o.logprob for o in want], abs=1e-4)


def test_expand_choices_seeds_ids_and_session_prefix(model, tok):
    from llmopt.serve import SessionKey, expand_choices

    engine = GenerationEngine(model, tok)
    first = _req(tok, "t1", PROMPTS[1], max_tokens=4, ignore_eos=True)
    first.keep_cache = True
    outs = engine.generate([first])["t1"]
    prefix, covered = outs[-1].cache, len(outs[-1].cache_token_ids)
    follow = [*first.prompt_ids, *_ids(outs), 5, 6, 7]
    parent = GenerationRequest(
        "r", follow, SamplingParams(max_tokens=5, temperature=1.0, seed=40, n=3, ignore_eos=True),
        prefix_cache=prefix, keep_cache=True, session=SessionKey("o", "s"),
    )  # fmt: skip
    choices = expand_choices(parent)
    assert [c.request_id for c in choices] == ["r", "r/1", "r/2"]
    assert [c.params.seed for c in choices] == [40, 41, 42] and all(c.params.n == 1 for c in choices)
    assert choices[0].keep_cache and choices[0].session is not None and choices[0].prefix_cache is prefix
    assert not any(c.keep_cache or c.session for c in choices[1:])
    assert all(c.prefix_cache is not prefix for c in choices[1:])  # a copy each: caches grow in place
    results = engine.generate(choices)
    assert all(results[c.request_id][0].cached_tokens == covered for c in choices)
    texts = [_ids(results[c.request_id]) for c in choices]
    assert len({tuple(t) for t in texts}) > 1  # distinct seeds, distinct choices
    # the same seeds alone, without the prefix cache, give the same tokens
    for choice, ids in zip(choices, texts, strict=True):
        alone = GenerationRequest("x", follow, SamplingParams(**{**vars(choice.params)}))
        assert _ids(_run(model, tok, [alone])["x"]) == ids
    assert expand_choices(first) == [first]
