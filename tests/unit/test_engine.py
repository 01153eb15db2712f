"""The continuous-batching engine: batched equals alone (on logits), joins, leaves, stops, sampling."""

from __future__ import annotations

import pytest
import torch

from llmopt.models import load_model, load_tokenizer
from llmopt.serve._engine import GenerationEngine, GenerationRequest, SamplingParams

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


def _assert_same(got, want):
    assert _tokens(got) == _tokens(want)
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.logits, w.logits, **TOL)


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
