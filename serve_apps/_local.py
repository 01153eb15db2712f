"""The model replica inside the HTTP replica, for ``serving.layout=single``.

``LLMIngress`` talks to its model through the calls a ``DeploymentHandle`` of ``LLMServer`` offers
(``options(...)``, ``generate.remote(request)``, ``stats.remote()``). :class:`LocalModel` answers the same
calls from an ``LLMServer`` object living in the ingress's own process, on the replica's event loop, so the
ingress's code is one for both layouts. A handle is deliberately not used here: a handle to oneself would
still send each stream chunk through Ray's object transfer, which is the cost this layout removes.

Overload: in the split layout Serve bounds the model replica's requests (``max_ongoing_requests``) and its
queue (``max_queued_requests``), and the handle raises ``BackPressureError``, which the ingress answers with
HTTP 503 and ``Retry-After``. Here nothing sits between the two, so :class:`LocalModel` applies the same two
bounds itself and raises the same error.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from typing import Any

from ray.serve.exceptions import BackPressureError

from llmopt.config import RunConfig
from llmopt.serve import GenerationRequest, TokenChunk

__all__ = ["LocalModel", "LocalServer"]

_CLOSING: set[asyncio.Task] = set()


class _Method:
    def __init__(self, call) -> None:
        self._call = call

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)


class _LocalStream:
    """One generation's async iterator, with the ``cancel()`` of a streaming deployment response."""

    def __init__(self, stream: AsyncIterator[TokenChunk]) -> None:
        self._stream = stream

    def __aiter__(self) -> _LocalStream:
        return self

    async def __anext__(self) -> TokenChunk:
        return await self._stream.__anext__()

    def cancel(self) -> None:
        # Closing the generator runs LLMServer.generate's `finally`: its rows leave the batch next step.
        task = asyncio.get_running_loop().create_task(self._stream.aclose())
        _CLOSING.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(_CLOSING.discard)


class LocalModel:
    """An in-process ``LLMServer`` behind the calls the ingress makes on its deployment handle.

    Args:
        server: The model replica object (``LLMServer.func_or_class(config)``).
        max_ongoing: Generations running at once (the split layout's ``max_ongoing_requests``).
        max_queued: Generations waiting for a slot before HTTP 503; -1 for no bound.
    """

    def __init__(self, server: Any, max_ongoing: int, max_queued: int) -> None:
        self.server = server
        self.max_queued = max_queued
        self._slots = asyncio.Semaphore(max_ongoing)
        self._waiting = 0

    def options(self, **_: Any) -> LocalModel:
        # Stream and multiplexed-model-id options route among replicas; there is one model here.
        return self

    @property
    def generate(self) -> _Method:
        return _Method(lambda request: _LocalStream(self._generate(request)))

    @property
    def stats(self) -> _Method:
        return _Method(self.server.stats)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        if self._slots.locked():
            if 0 <= self.max_queued <= self._waiting:
                raise BackPressureError(
                    num_queued_requests=self._waiting, max_queued_requests=self.max_queued
                )
            self._waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
        else:
            await self._slots.acquire()
        # A copy, as the split layout's replica gets one: the replica rewrites some of its fields (a
        # virtual-token adapter's prompt, the cache it continues from), which the ingress reads after.
        stream = self.server.generate(copy.copy(request))
        try:
            async for chunk in stream:
                yield chunk
        finally:
            try:  # at once, not when the generator is collected: its rows leave the batch at the next step
                await stream.aclose()
            finally:
                self._slots.release()


class LocalServer:
    """What the application builder binds in place of the ``LLMServer`` handle for ``serving.layout=single``:
    the model replica's constructor argument, started in the ingress replica's process by :meth:`start`.

    Args:
        config: The ``LLMServer``'s constructor argument (a :class:`RunConfig` as data).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def start(self) -> LocalModel:
        from serve_apps._server import LLMServer

        serving = RunConfig.model_validate(self.config).serving
        return LocalModel(
            LLMServer.func_or_class(self.config), serving.ongoing_requests, serving.max_queued_requests
        )
