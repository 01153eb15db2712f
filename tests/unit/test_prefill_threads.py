"""Prefills on `serving.prefill_threads` CPU threads, decode steps on the caller's count."""

from __future__ import annotations

import pytest
import torch

from llmopt.config import load_config
from llmopt.models import load_tokenizer
from llmopt.serve import GenerationEngine, GenerationRequest, SamplingParams, load_serving_model
from llmopt.serve.native._lean_step import LlamaDecodeStep


@pytest.fixture(scope="module")
def model():
    return load_serving_model(load_config(None, ["model.max_seq_len=256"]))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _requests(lengths: list[int]) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            f"r{i}",
            [10 + (7 * i + 13 * j) % 900 for j in range(n)],
            SamplingParams(max_tokens=5, temperature=0.7 * (i % 2), seed=i),
        )
        for i, n in enumerate(lengths)
    ]


def _serve(engine: GenerationEngine, requests: list[GenerationRequest]) -> dict[str, list]:
    """The first request alone for two steps, then the rest join its running batch (prefills between
    decode steps), to the end."""
    outputs: dict[str, list] = {r.request_id: [] for r in requests}
    engine.add(requests[0])
    for _ in range(2):
        for out in engine.step():
            outputs[out.request_id].append(out)
    for request in requests[1:]:
        engine.add(request)
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return outputs


@pytest.mark.parametrize("lean", [True, False], ids=["lean-step", "transformers"])
@pytest.mark.parametrize("lengths", [[9, 12, 20], [40, 60, 70, 50]], ids=["native-wave", "wide-wave"])
def test_prefills_use_prefill_threads_and_decode_steps_keep_the_callers(
    model, monkeypatch, one_thread, lean, lengths
):
    """Every prefill (the native call of a narrow wave, transformers' forward of a wide one) runs on 2
    threads while every decode step runs on the caller's 1, the count is back to 1 after each step, and
    the outputs are those of an engine that prefills on 1 thread."""
    tok = load_tokenizer("tiny-llama")
    seen: dict[str, set[int]] = {"prefill": set(), "decode": set()}

    def spy(kind, original):
        def wrapped(self, *args, **kwargs):
            name = kind(args) if callable(kind) else kind
            seen[name].add(torch.get_num_threads())
            return original(self, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(LlamaDecodeStep, "prefill_many", spy("prefill", LlamaDecodeStep.prefill_many))
    monkeypatch.setattr(LlamaDecodeStep, "decode_batch", spy("decode", LlamaDecodeStep.decode_batch))
    monkeypatch.setattr(LlamaDecodeStep, "__call__", spy("decode", LlamaDecodeStep.__call__))
    # transformers' forward: one new token per row is a decode step (every prompt here is longer).
    forward = spy(lambda a: "decode" if a[0].shape[1] == 1 else "prefill", GenerationEngine._forward)
    monkeypatch.setattr(GenerationEngine, "_forward", forward)

    base = GenerationEngine(model, tok, keep_logits=True, lean_decode=lean)
    want = _serve(base, _requests(lengths))
    assert seen == {"prefill": {1}, "decode": {1}}
    seen["prefill"].clear(), seen["decode"].clear()

    engine = GenerationEngine(model, tok, keep_logits=True, lean_decode=lean, prefill_threads=2)
    got = _serve(engine, _requests(lengths))
    assert seen == {"prefill": {2}, "decode": {1}}
    assert torch.get_num_threads() == 1
    for request_id, outs in want.items():
        assert [o.token_id for o in got[request_id]] == [o.token_id for o in outs]
        for g, w in zip(got[request_id], outs, strict=True):
            torch.testing.assert_close(g.logits, w.logits, atol=1e-5, rtol=1e-5)


def test_a_failed_prefill_leaves_the_decode_thread_count(model, monkeypatch, one_thread):
    tok = load_tokenizer("tiny-llama")
    engine = GenerationEngine(model, tok, prefill_threads=2)

    def broken(self, *args):
        assert torch.get_num_threads() == 2
        raise RuntimeError("prefill failed")

    monkeypatch.setattr(GenerationEngine, "_prefill_native", broken)
    engine.add(_requests([8])[0])
    with pytest.raises(RuntimeError, match="prefill failed"):
        engine.step()
    assert torch.get_num_threads() == 1


def test_prefill_threads_must_be_positive(model):
    with pytest.raises(ValueError, match="prefill_threads"):
        GenerationEngine(model, load_tokenizer("tiny-llama"), prefill_threads=0)


@pytest.mark.parametrize(
    ("overrides", "decode", "cpus", "want"),
    [
        ([], 1, 2, 2),  # auto, one replica: every CPU
        ([], 2, 1, 2),  # never fewer than the decode steps
        (["serving.autoscaling.max_replicas=2"], 1, 16, 1),  # replicas would share the node's CPUs
        (["serving.prefill_threads=null"], 1, 16, 1),
        (["serving.prefill_threads=3"], 1, 16, 3),
    ],
)
def test_prefill_thread_count(overrides, decode, cpus, want):
    assert load_config(None, overrides).serving.prefill_thread_count(decode, cpus) == want


@pytest.mark.parametrize("value", ["0", "many", "257"])
def test_a_bad_prefill_threads_names_the_field(value):
    from llmopt.config import ConfigError

    with pytest.raises(ConfigError, match=r"serving\.prefill_threads"):
        load_config(None, [f"serving.prefill_threads={value}"])
