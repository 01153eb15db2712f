"""``serving.layout=single``'s in-process model (``serve_apps._local``): the ingress's handle calls answered
by an ``LLMServer`` object in the same replica, with the split layout's bounds and cancellation."""

from __future__ import annotations

import asyncio

import pytest
from ray import serve
from ray.serve.exceptions import BackPressureError

from llmopt.serve import GenerationRequest, SamplingParams
from serve_apps._local import LocalServer
from tests._serve import serve_on_loopback

pytestmark = [pytest.mark.integration]

MAX_TOKENS = 1500


@serve.deployment
class LocalProbe:
    """A replica that holds a LocalModel as the single layout's ingress does (``serve.batch`` needs one).
    It uses nothing else of this module: the replica cannot import a test module."""

    MAX_TOKENS = MAX_TOKENS

    @staticmethod
    def _request(request_id: str, max_tokens: int) -> GenerationRequest:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return GenerationRequest(request_id, [1, 5, 9, 13], params)

    def __init__(self, config: dict) -> None:
        self.model = LocalServer(config).start()

    async def _idle(self) -> None:
        server = self.model.server
        for _ in range(1200):
            if not server.engine.has_work() and not server._queues:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the engine still has work")

    async def cancel_after_first_chunk(self) -> dict:
        request = self._request("gone", self.MAX_TOKENS)
        stream = self.model.options(stream=True, multiplexed_model_id="").generate.remote(request)
        first = await stream.__anext__()
        stream.cancel()
        await self._idle()
        return {
            "first": len(first.token_ids),
            "steps": self.model.server._steps,
            "prompt": request.prompt_ids,
            "prefix_cache": request.prefix_cache,
        }

    async def overload(self, holders: int) -> dict:
        held = [self.model.generate.remote(self._request(f"h{i}", self.MAX_TOKENS)) for i in range(holders)]
        for stream in held:
            await stream.__anext__()
        refused = False
        try:
            await self.model.generate.remote(self._request("over", 4)).__anext__()
        except BackPressureError:
            refused = True
        for stream in held:
            stream.cancel()
        await self._idle()
        after = [chunk async for chunk in self.model.generate.remote(self._request("after", 4))]
        stats = await self.model.stats.remote()
        return {
            "refused": refused,
            "after": sum(len(c.token_ids) for c in after),
            "finished": after[-1].finished,
            "running": stats["engine"]["running"],
        }


@pytest.fixture(scope="module")
def probe(ray_cluster, repo):
    from llmopt.config import load_config

    overrides = [
        "model.max_seq_len=2048",
        "serving.engine=native",
        "serving.stream_interval_s=0",
        "serving.max_ongoing_requests=8",
        "serving.max_queued_requests=0",
        "resources.cpus_per_worker=1",
    ]
    config = load_config(None, overrides).model_dump(mode="json")
    with serve_on_loopback(repo):
        options = {"max_ongoing_requests": 4, "ray_actor_options": {"num_cpus": 1}}
        yield serve.run(LocalProbe.options(**options).bind(config), name="local-probe", route_prefix=None)


def test_a_cancelled_stream_leaves_the_batch_and_the_callers_request_is_untouched(probe):
    """A caller that leaves after its first chunk stops its generation: the engine ran far fewer steps than
    the request's max_tokens. The request object the caller holds is not rewritten by the replica."""
    got = probe.cancel_after_first_chunk.remote().result()
    assert got["first"] >= 1
    assert got["steps"] < MAX_TOKENS // 2, got["steps"]
    assert got["prompt"] == [1, 5, 9, 13] and got["prefix_cache"] is None


def test_past_the_ongoing_and_queued_bounds_a_generation_is_backpressure(probe):
    """Eight generations hold every slot of max_ongoing_requests=8 and no queue is allowed: the ninth raises
    BackPressureError (the ingress's HTTP 503 with Retry-After); once they leave, a request runs through."""
    got = probe.overload.remote(8).result()
    assert got == {"refused": True, "after": 4, "finished": True, "running": 0}
