"""The replica's engine thread, through a deployment handle: outputs reach their streams, a caller that
leaves frees its batch slot, and a step that raises fails the live requests while the replica keeps serving.
"""

from __future__ import annotations

import time

import pytest
from ray import serve

from llmopt.serve import GenerationRequest, SamplingParams
from serve_apps._server import LLMServer
from tests._serve import serve_on_loopback

pytestmark = [pytest.mark.integration]


@serve.deployment
class ProbedServer(LLMServer.func_or_class):
    """LLMServer plus two test probes: break the current engine's next step, and report the engine."""

    def break_next_step(self) -> int:
        def fail():
            raise RuntimeError("injected step failure")

        self.engine.step = fail
        return id(self.engine)

    def engine_state(self) -> dict:
        return {"engine": id(self.engine), "has_work": self.engine.has_work()}

    def set_stream_interval(self, seconds: float) -> None:
        # model_copy skips validation: the test sets an interval beyond the configurable 5 s.
        serving = self.config.serving.model_copy(update={"stream_interval_s": seconds})
        self.config = self.config.model_copy(update={"serving": serving})


@pytest.fixture(scope="module")
def handle(ray_cluster, repo):
    from llmopt.config import load_config

    config = load_config(None, ["model.max_seq_len=128", "resources.cpus_per_worker=1"])
    with serve_on_loopback(repo):
        options = {"max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 1}}
        yield serve.run(ProbedServer.options(**options).bind(config.model_dump(mode="json")), name="probe")


def _payload(rid: str, prompt_ids: list[int], max_tokens: int) -> GenerationRequest:
    """The typed request the ingress sends a replica over the deployment handle."""
    return GenerationRequest(rid, prompt_ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def _tokens(handle, request) -> list[int]:
    return [t for chunk in handle.options(stream=True).generate.remote(request) for t in chunk.token_ids]


def _reference(prompt_ids: list[int], max_tokens: int) -> list[int]:
    from llmopt.config import load_config
    from llmopt.models import load_tokenizer
    from llmopt.serve import GenerationEngine, GenerationRequest, SamplingParams, load_serving_model

    config = load_config(None, ["model.max_seq_len=128"])
    engine = GenerationEngine(load_serving_model(config), load_tokenizer(config.model))
    request = GenerationRequest("ref", prompt_ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return [o.token_id for o in engine.generate([request])["ref"]]


def _idle(handle) -> bool:
    for _ in range(300):
        if not handle.engine_state.remote().result()["has_work"]:
            return True
        time.sleep(0.02)
    return False


def test_engine_thread_streams_frees_slots_and_survives_a_broken_step(handle):
    prompts = [[1, 5, 9, 13], [1, 7, 7, 7, 7, 7, 2, 8], [1, 300, 20]]
    streams = [
        handle.options(stream=True).generate.remote(_payload(f"a{i}", p, 6)) for i, p in enumerate(prompts)
    ]
    got = [[t for item in stream for t in item.token_ids] for stream in streams]
    assert got == [_reference(p, 6) for p in prompts]

    # A caller that leaves after its first chunk frees its batch slot at the engine's next step.
    stream = handle.options(stream=True).generate.remote(_payload("gone", prompts[0], 120))
    next(stream)
    stream.cancel()
    assert _idle(handle)

    # A step that raises ends the live request with an error chunk naming it (no traceback); a fresh engine
    # serves the next one.
    broken = handle.break_next_step.remote().result()
    doomed = list(handle.options(stream=True).generate.remote(_payload("doomed", prompts[1], 4)))
    assert doomed[-1].finished and doomed[-1].finish_reason == "error"
    assert "injected step failure" in doomed[-1].error and "Traceback" not in doomed[-1].error
    assert handle.engine_state.remote().result()["engine"] != broken
    assert _tokens(handle, _payload("after", prompts[2], 5)) == _reference(prompts[2], 5)


def test_a_finished_request_is_not_held_back_by_the_stream_interval(handle):
    """With a 60 s stream interval, a request's chunks after the first would wait out the interval; the last
    one goes out as soon as the request finishes (a liveness bound, far below the interval)."""
    import concurrent.futures

    handle.set_stream_interval.remote(60.0).result()
    try:
        prompt = [1, 5, 9, 13]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            chunks = pool.submit(
                lambda: list(handle.options(stream=True).generate.remote(_payload("x", prompt, 6)))
            )
            got = chunks.result(
                timeout=20
            )  # raises TimeoutError if the finished request waited for the interval
    finally:
        handle.set_stream_interval.remote(0.05).result()
    assert len(got) == 2  # the first token at once, then everything else in one chunk when it finished
    assert [t for item in got for t in item.token_ids] == _reference(prompt, 6)
