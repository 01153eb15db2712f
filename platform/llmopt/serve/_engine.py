"""Iteration-level ("continuous") batching generation engine for one serving replica.

Requests join the running batch between decode steps and leave it as soon as they finish. The running batch
shares one left-padded :class:`transformers.DynamicCache`; a 2-D attention mask over the cached positions and
per-row position ids (count of real tokens before each position) keep padding out of every row's maths, so a
request produces the same logits alone or batched.

Each :meth:`GenerationEngine.step` decodes one token for every running request (the pending token sampled at
the previous step is fed in), prefills newly admitted requests (their first token comes from the prefill),
merges the newcomers' cache into the running one and drops the rows that finished. The cache therefore holds
every token of a row except its last sampled one.

Example::

    engine = GenerationEngine(model, tokenizer, max_batch_size=8)
    request = GenerationRequest("a", tokenizer("Hi").input_ids, SamplingParams(max_tokens=8))
    results = engine.generate([request])
    text = "".join(out.text for out in results["a"])
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from llmopt.serve._protocol import SessionKey
from llmopt.serve._sessions import crop_cache
from llmopt.serve.native import LlamaDecodeStep, unsupported_reason

logger = logging.getLogger(__name__)

# Temperatures below this sample greedily (vLLM's threshold): dividing scores by 1e-300, which is 0 in
# float32, would leave no distribution to sample from.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    Attributes:
        max_tokens: Most tokens to generate (>= 1).
        temperature: Softmax temperature; 0 means greedy argmax.
        top_p: Nucleus sampling: keep the smallest set of tokens whose probability sums to at least this.
        top_k: Keep only the k most likely tokens; 0 turns it off.
        seed: Seed of the request's own random generator (same seed, same tokens, alone or batched).
        stop: Strings that end the completion; the returned text stops before the first one.
        ignore_eos: Keep generating past end-of-sequence tokens until ``max_tokens`` (benchmarks).
        min_p: Drop tokens less likely than ``min_p`` times the most likely one (after temperature).
        presence_penalty: Subtracted from the logit of every token generated so far (OpenAI's).
        frequency_penalty: Subtracted from a token's logit once per time it was generated (OpenAI's).
        repetition_penalty: Divides positive (multiplies negative) logits of every token of the prompt and the
            output so far (Hugging Face's and vLLM's); 1 turns it off.
        logit_bias: Token id -> value added to its logit before sampling (greedy included).
        min_tokens: End-of-sequence, stop tokens and stop strings do not end the completion before this many
            tokens.
        stop_token_ids: Token ids that end the completion (their text excluded).
        logprobs: Report each generated token's log-probability under the model and this many most likely
            alternatives (0: the token's only); None reports nothing.
        prompt_logprobs: The same for every prompt token but the first, on the request's first output.
        skip_special_tokens: Leave special tokens out of the text.
        include_stop_str_in_output: Keep the stop string (or stop token's text) that ended the completion.
        n: Choices of the request. The engine runs one sequence per request: a serving replica turns a
            request of n choices into n engine requests with :func:`expand_choices`.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    n: int = 1

    def shapes_logits(self) -> bool:
        """Whether a logits processor (penalties, bias) changes this request's scores at every step."""
        return bool(
            self.logit_bias
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
        )


@dataclass
class GenerationRequest:
    """One completion request.

    Attributes:
        request_id: Unique among the engine's live requests.
        prompt_ids: The prompt's token ids.
        params: Sampling and stopping.
        prefix_cache: Optional batch-1 ``DynamicCache`` holding the keys and values of
            ``prompt_ids[:prefix_cache.get_seq_length()]`` (a session's earlier turns); only the rest of the
            prompt is prefilled. The engine takes ownership: the cache grows in place.
        keep_cache: Return the request's own cache on its final :class:`StepOutput` (to store a session).
        adapter: Name of a LoRA adapter loaded in the engine's ``PeftModel`` (None: the base model). Rows
            with different adapters share a batch through peft's mixed-batch ``adapter_names``.
        session: The session whose cache a serving replica looks up for ``prefix_cache`` and stores the
            grown cache back to (the engine itself does not read it).
        virtual_tokens: The first ``virtual_tokens`` prompt ids are placeholders for a prompt or prefix
            tuning adapter's virtual tokens, whose keys and values ``prefix_cache`` starts with. They take
            positions like real tokens but are never recomputed: prompt log-probabilities start after them
            and they do not count as cached prompt tokens.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    prefix_cache: DynamicCache | None = None
    keep_cache: bool = False
    adapter: str | None = None
    session: SessionKey | None = None
    virtual_tokens: int = 0


@dataclass
class StepOutput:
    """What one request produced in one engine step.

    Attributes:
        request_id: The request's id.
        token_id: The token sampled at this step.
        text: Newly decoded text (a delta; stop strings and held-back partial characters excluded).
        finished: Whether the request is done (it has left the batch).
        finish_reason: "stop", "length" or "eos" when finished, "error" when this request failed (the
            others of its batch go on), else None.
        logits: The last-position logits row that produced ``token_id`` (only with ``keep_logits=True``).
        cache: On the final output of a ``keep_cache`` request: a batch-1 ``DynamicCache`` over
            ``cache_token_ids`` (no padding), ready to be a later request's ``prefix_cache``.
        cache_token_ids: The tokens ``cache`` covers: the prompt and every generated token but the last.
        cached_tokens: Prompt tokens that came from the request's ``prefix_cache`` (not prefilled).
        logprob: ``token_id``'s log-probability under the model (with ``params.logprobs`` set).
        top_logprobs: The ``params.logprobs`` most likely tokens and their log-probabilities.
        prompt_logprobs: On a request's first output with ``params.prompt_logprobs`` set: for each prompt
            token, None for the first, else (its log-probability, the most likely alternatives).
        error: Why the request failed (with ``finish_reason="error"``).
    """

    request_id: str
    token_id: int | None
    text: str
    finished: bool
    finish_reason: str | None = None
    logits: torch.Tensor | None = None
    cache: DynamicCache | None = None
    cache_token_ids: list[int] | None = None
    cached_tokens: int = 0
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    error: str | None = None


@dataclass
class _Sequence:
    request: GenerationRequest
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)
    emitted: str = ""
    cached_tokens: int = 0
    stream: DecodeStream | None = None  # the generated tokens' text, decoded as they come
    text: str = ""  # what `stream` has decoded so far
    prompt_logprobs: list | None = None  # computed at admission, sent with the first output
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (ids, values) on the device
    error: str | None = None  # set at admission when the request cannot run


class GenerationEngine:
    """Continuous-batching generation over a Hugging Face causal LM with a shared left-padded KV cache.

    Args:
        model: A causal LM (e.g. ``LlamaForCausalLM``) whose forward accepts ``attention_mask``,
            ``position_ids`` and a ``DynamicCache`` as ``past_key_values``. Put it in eval mode.
        tokenizer: Its tokenizer (used for detokenization and the EOS id).
        max_batch_size: Most requests decoded together; the rest wait in a FIFO queue.
        keep_logits: Attach each step's logits row to its :class:`StepOutput` (for tests).
        continuous: Admit waiting requests between decode steps of a running batch (iteration-level
            batching). False gives static batching: a batch runs until its last request finishes before the
            next is admitted (finished requests still return at once).
        use_cache: Keep KV caches while decoding. False recomputes every running sequence in full at each
            step (the no-cache baseline of the benchmark; sessions are not reused then).
        lean_decode: Decode Llama models with the lean native step where it applies.
        max_prefill_tokens: With ``continuous``, the most prompt tokens (not cached yet) prefilled in one
            step, at least one whole prompt; None prefills every newcomer that fits the batch at once.
        prefill_threads: CPU threads for the newcomers' prefills of a step (torch's products and the native
            kernels); None keeps the caller's thread count, which decode steps use.
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_batch_size: int = 8,
        keep_logits: bool = False,
        continuous: bool = True,
        use_cache: bool = True,
        lean_decode: bool = True,
        max_prefill_tokens: int | None = None,
        prefill_threads: int | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(
                f"max_batch_size must be >= 1, got {max_batch_size}; pass a positive batch size."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        if prefill_threads is not None and prefill_threads < 1:
            raise ValueError(f"prefill_threads must be >= 1 or None, got {prefill_threads}.")
        self.prefill_threads = prefill_threads
        self.keep_logits = keep_logits
        self.continuous = continuous
        self.use_cache = use_cache
        # A PeftModel would apply its active adapter to rows that asked for the base model.
        self._peft = hasattr(model, "peft_config")
        # Only the last position's logits are used: `logits_to_keep=1` skips the output head over every
        # other prompt position (with a 150k vocabulary, a 2,000-token prefill would otherwise compute and
        # hold a 2000 x 150k logits tensor). Models whose forward lacks it get the full logits.
        forward = getattr(model, "get_base_model", lambda: model)().forward
        self._last_logits = (
            {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(forward).parameters else {}
        )
        self.device = next(model.parameters()).device
        self.vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        # Decode steps of a Llama model with the native kernel run the lean step (the same logits to 1e-5,
        # without transformers' per-module Python); prefills and everything else go through transformers.
        reason = unsupported_reason(model) if lean_decode else "turned off"
        self._lean = LlamaDecodeStep(model) if reason is None and use_cache else None
        self.decode_path = "lean Llama step" if self._lean else f"transformers ({reason})"
        generation_config = getattr(model, "generation_config", None)
        eos = {tokenizer.eos_token_id, *_as_list(getattr(generation_config, "eos_token_id", None))}
        self.eos_token_ids = {e for e in eos if e is not None}
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        # Text is decoded incrementally with tokenizers' DecodeStream (a few tokens per step: decoding a
        # row's whole output every step cost ~0.4 ms per row and step at 2,000 tokens), where it gives what
        # `tokenizer.decode` gives: a fast tokenizer without transformers' space clean-up. A request's last
        # step decodes its whole output once, so its final text is always exactly `tokenizer.decode`'s.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        clean_up = getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._backend = backend if isinstance(backend, Tokenizer) and not clean_up else None
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [batch, cached positions], 1 = real token

    @property
    def num_running(self) -> int:
        """Number of requests in the running batch."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Number of requests queued for admission."""
        return len(self._waiting)

    def has_work(self) -> bool:
        """Whether any request is still waiting or running."""
        return bool(self._waiting or self._running)

    def add(self, request: GenerationRequest) -> None:
        """Queue a request; it is admitted (prefilled) at the next :meth:`step` with room in the batch.

        A ``prefix_cache`` covering the whole prompt is cropped by one token (the last prompt token must be
        fed to get the first output's logits); with ``use_cache=False`` it is ignored.

        Raises:
            ValueError: On an empty prompt, ``max_tokens < 1``, a negative temperature, ``top_p`` outside
                (0, 1], a negative ``top_k``, an id already live in this engine, or a ``prefix_cache`` that is
                not a batch-1 full-attention cache.
        """
        p = request.params
        if not request.prompt_ids:
            raise ValueError(
                f"Request {request.request_id!r} has an empty prompt; pass at least one token id."
            )
        if (
            p.max_tokens < 1
            or not p.temperature >= 0
            or not 0 < p.top_p <= 1
            or p.top_k < 0
            or not 0 <= p.min_p <= 1
            or not p.repetition_penalty > 0
            or p.min_tokens < 0
            or (p.logprobs is not None and p.logprobs < 0)
            or (p.prompt_logprobs is not None and p.prompt_logprobs < 0)
        ):
            raise ValueError(
                f"Request {request.request_id!r} has invalid sampling params {p}; need max_tokens >= 1, "
                "temperature >= 0, 0 < top_p <= 1, top_k >= 0, 0 <= min_p <= 1, repetition_penalty > 0, "
                "min_tokens >= 0 and logprobs >= 0."
            )
        vocab = self.vocab_size
        for name, ids in (
            ("prompt_ids", request.prompt_ids),
            ("logit_bias", p.logit_bias),
            ("stop_token_ids", p.stop_token_ids),
        ):
            if vocab is not None and any(not 0 <= int(i) < vocab for i in ids):
                raise ValueError(
                    f"Request {request.request_id!r} has {name} outside the vocabulary [0, {vocab})."
                )
        if any(s.request.request_id == request.request_id for s in (*self._waiting, *self._running)):
            raise ValueError(
                f"Request id {request.request_id!r} is already live; use a unique id per request."
            )
        prefix = request.prefix_cache
        if request.virtual_tokens and (
            not self.use_cache
            or prefix is None
            or prefix.get_seq_length() < request.virtual_tokens
            or len(request.prompt_ids) <= request.virtual_tokens
        ):
            raise ValueError(
                f"Request {request.request_id!r} has {request.virtual_tokens} virtual tokens; they need the "
                "KV cache on, a prefix_cache that holds them and at least one real prompt token after them."
            )
        if prefix is not None:
            if not self.use_cache:
                request.prefix_cache = None
            else:
                _check_layers(prefix)
                if prefix.layers[0].keys.shape[0] != 1:
                    raise ValueError(
                        f"Request {request.request_id!r} has a prefix cache of batch "
                        f"{prefix.layers[0].keys.shape[0]}; pass one request's own (batch-1) cache."
                    )
                if prefix.get_seq_length() >= len(request.prompt_ids):
                    crop_cache(prefix, len(request.prompt_ids) - 1)
                if prefix.get_seq_length() == 0:
                    request.prefix_cache = None
        generator = None
        if p.temperature > 0:
            generator = torch.Generator(device=self.device)
            if p.seed is None:
                generator.seed()
            else:
                generator.manual_seed(p.seed % 2**64)  # any integer seeds; torch takes 64 bits
        stream = (
            DecodeStream(skip_special_tokens=p.skip_special_tokens) if self._backend is not None else None
        )
        seq = _Sequence(request, generator, stream=stream)
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=self.device)
            values = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=self.device)
            seq.bias = (ids, values)
        self._waiting.append(seq)

    def cancel(self, request_id: str) -> bool:
        """Drop a waiting or running request (e.g. its client went away); True if it was live."""
        for seq in self._waiting:
            if seq.request.request_id == request_id:
                self._waiting.remove(seq)
                return True
        rows = [i for i, s in enumerate(self._running) if s.request.request_id != request_id]
        if len(rows) == len(self._running):
            return False
        self._keep(rows)
        return True

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """Decode one token for every running request and admit waiting ones.

        Returns:
            One output per request that ran this step (running rows first, then newcomers); finished
            requests have already left the batch when this returns.
        """
        outputs: list[StepOutput] = []
        admit = self.continuous or not self._running
        if self._running:
            if self.use_cache:
                ones = torch.ones(len(self._running), 1, dtype=self._mask.dtype, device=self.device)
                mask = torch.cat([self._mask, ones], dim=1)
                positions = self._mask.sum(dim=1)
                # Every row's padding is a prefix of it (prefills are left-padded, decode steps append real
                # tokens): the lean step attends from each row's first real position.
                starts = mask.shape[1] - 1 - positions
                if self._lean is not None and len(self._running) == 1:
                    # `_keep` drops leading padding, so a lone row's mask is all ones.
                    position = self._mask.shape[1]
                    logits = self._lean(self._running[0].token_ids[-1], position, self._cache).float()
                elif self._lean is not None and torch.equal(mask.argmax(dim=1), starts):
                    last = torch.tensor([s.token_ids[-1] for s in self._running], device=self.device)
                    logits = self._lean.decode_batch(last, positions, starts, self._cache).float()
                else:
                    last = torch.tensor([[s.token_ids[-1]] for s in self._running], device=self.device)
                    position_ids = positions.unsqueeze(1)
                    logits = self._forward(last, mask, position_ids, self._cache, self._running)
                self._mask = mask
            else:
                logits = self._recompute(self._running)
            outputs += self._advance_rows(self._running, logits)

        room = self.max_batch_size - len(self._running) if admit else 0
        newcomers = self._take_waiting(room)
        with self._threads_for_prefill(bool(newcomers)):
            for seq in [s for s in newcomers if s.request.params.prompt_logprobs is not None]:
                try:
                    seq.prompt_logprobs = self._prompt_logprobs(seq)
                except Exception as exc:  # this request fails; the rest of the batch goes on
                    logger.exception("llmopt engine: prompt logprobs of %s failed", seq.request.request_id)
                    newcomers.remove(seq)
                    outputs.append(_failed(seq, exc))
            if newcomers and not self.use_cache:
                logits = self._recompute(newcomers)
                outputs += self._advance_rows(newcomers, logits)
                self._running += newcomers
            elif newcomers:
                fresh = [s for s in newcomers if s.request.prefix_cache is None]
                fresh = self._prefill_native(fresh, outputs)
                if fresh:
                    ids, mask = self._left_padded([s.request.prompt_ids for s in fresh])
                    cache = DynamicCache()
                    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
                    logits = self._forward(ids, mask, positions, cache, fresh)
                    outputs += self._advance_rows(fresh, logits)
                    self._merge(fresh, cache, mask)
                for seq in newcomers:
                    if seq.request.prefix_cache is not None:
                        logits, cache, mask = self._prefill_prefix(seq)
                        outputs += self._advance_rows([seq], logits)
                        self._merge([seq], cache, mask)

        finished = {o.request_id for o in outputs if o.finished}
        if finished:
            if self.use_cache:
                for out in outputs:
                    if out.finished:
                        self._export(out)
            self._keep([i for i, s in enumerate(self._running) if s.request.request_id not in finished])
        return outputs

    @contextlib.contextmanager
    def _threads_for_prefill(self, needed: bool) -> Iterator[None]:
        """Run the block on `prefill_threads` threads, then go back to the decode steps' count.

        A prefill's products have a row per prompt token and scale with threads (one 64-token prompt of
        base-100m: 154 ms on one thread, 94 ms on two), while a decode step's products have a row per
        request and share the replica's cores with its HTTP path. torch's count is per thread under
        OpenMP: this changes the engine thread's own, which the native kernels follow.
        """
        threads = torch.get_num_threads() if needed and self.prefill_threads is not None else None
        if threads is None or self.prefill_threads == threads:
            yield
            return
        torch.set_num_threads(self.prefill_threads)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def _take_waiting(self, room: int) -> list[_Sequence]:
        """Up to ``room`` waiting requests for this step, in order, whose prompts (the part not cached yet)
        fit ``max_prefill_tokens`` together; always at least one, so a prompt above the budget still runs.

        Prefills run inside the step, before its outputs go out: 26 newcomers' prefills in one step (the
        tiny preset, 64-token prompts) held every running stream and every newcomer's first token for 240 ms.
        A budget spreads them over steps with decode steps between them, as vLLM's token budget per step
        (``max_num_batched_tokens``) does with chunked prefill; a prompt here is never split.
        """
        newcomers: list[_Sequence] = []
        budget = self.max_prefill_tokens if self.continuous else None  # a static batch is admitted whole
        while self._waiting and len(newcomers) < room:
            seq = self._waiting[0]
            cached = seq.request.prefix_cache.get_seq_length() if seq.request.prefix_cache is not None else 0
            tokens = max(1, len(seq.request.prompt_ids) - cached)
            if budget is not None and newcomers and tokens > budget:
                break
            newcomers.append(self._waiting.popleft())
            if budget is not None:
                budget -= tokens
        return newcomers

    def generate(self, requests: list[GenerationRequest]) -> dict[str, list[StepOutput]]:
        """Add every request, step until all are done and return each request's outputs in order."""
        results: dict[str, list[StepOutput]] = {r.request_id: [] for r in requests}
        for request in requests:
            self.add(request)
        while self.has_work():
            for out in self.step():
                results.setdefault(out.request_id, []).append(out)
        return results

    def _left_padded(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of ``sequences``, left-padded to the longest."""
        width = max(len(ids) for ids in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(sequences), width, dtype=torch.long, device=self.device)
        for i, seq in enumerate(sequences):
            ids[i, width - len(seq) :] = torch.tensor(seq, device=self.device)
            mask[i, width - len(seq) :] = 1
        return ids, mask

    def _prefill_native(self, fresh: list[_Sequence], outputs: list[StepOutput]) -> list[_Sequence]:
        """Prefill fresh prompts together on the lean step (`LlamaDecodeStep.prefill_many`) and admit them
        (their first outputs appended to ``outputs``); returns the ones left to transformers' forward (all of
        them where the lean step does not apply)."""
        prompts = [s.request.prompt_ids for s in fresh]
        done = self._lean.prefill_many(prompts) if self._lean is not None and fresh else None
        if done is None:
            return fresh
        logits, cache, mask = done
        outputs += self._advance_rows(fresh, logits)
        self._merge(fresh, cache, mask)
        return []

    def _prompt_logprobs(self, seq: _Sequence) -> list:
        """Log-probabilities of each prompt token given the ones before it (one forward pass of the whole
        prompt with every position's logits, outside the batch: echo with logprobs is rare)."""
        virtual = seq.request.virtual_tokens
        prompt = seq.request.prompt_ids[virtual:]
        ids = torch.tensor([prompt], device=self.device)
        extra: dict = {"use_cache": False}
        if virtual:  # the real tokens after the adapter's virtual ones, from a copy of their keys and values
            prefix = copy_cache(seq.request.prefix_cache)
            crop_cache(prefix, virtual)
            extra = {"use_cache": True, "past_key_values": prefix}
        out = self.model(input_ids=ids, **extra, **_adapter_kwargs([seq], self._peft))
        scores = out.logits[0, :-1].float().log_softmax(dim=-1)
        chosen = scores.gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1).tolist()
        k = seq.request.params.prompt_logprobs
        top = scores.topk(k, dim=-1) if k else None
        result: list = [None] * (virtual + 1)
        for i, value in enumerate(chosen):
            alternatives = (
                list(zip(top.indices[i].tolist(), top.values[i].tolist(), strict=True))
                if top is not None
                else []
            )
            result.append((value, alternatives))
        return result

    def _prefill_prefix(self, seq: _Sequence) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """Prefill the part of a prompt its ``prefix_cache`` does not cover; the cache grows in place."""
        cache, seq.request.prefix_cache = seq.request.prefix_cache, None
        prompt = seq.request.prompt_ids
        cached = cache.get_seq_length()
        ids = torch.tensor([prompt[cached:]], device=self.device)
        mask = torch.ones(1, len(prompt), dtype=torch.long, device=self.device)
        positions = torch.arange(cached, len(prompt), device=self.device).unsqueeze(0)
        seq.cached_tokens = max(0, cached - seq.request.virtual_tokens)
        return self._forward(ids, mask, positions, cache, [seq]), cache, mask

    def _recompute(self, seqs: list[_Sequence]) -> torch.Tensor:
        """Last-position logits of every sequence (prompt + generated), computed in full without a cache."""
        ids, mask = self._left_padded([s.request.prompt_ids + s.token_ids for s in seqs])
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=False,
            **self._last_logits,
            **_adapter_kwargs(seqs, self._peft),
        )
        return out.logits[:, -1, :].float()

    def _export(self, out: StepOutput) -> None:
        """Attach a finished ``keep_cache`` request's own cache (its row, padding removed) to ``out``."""
        if out.finish_reason == "error":
            return
        row = next(i for i, s in enumerate(self._running) if s.request.request_id == out.request_id)
        seq = self._running[row]
        if not seq.request.keep_cache:
            return
        real = self._mask[row].bool()
        cache = DynamicCache()
        for index, layer in enumerate(self._cache.layers):
            cache.update(
                layer.keys[row : row + 1, :, real].clone(),
                layer.values[row : row + 1, :, real].clone(),
                index,
            )
        out.cache = cache
        out.cache_token_ids = seq.request.prompt_ids + seq.token_ids[:-1]

    def _forward(self, input_ids, attention_mask, position_ids, cache, seqs: list[_Sequence]) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            **self._last_logits,
            **_adapter_kwargs(seqs, self._peft),
        )
        return out.logits[:, -1, :].float()

    def _merge(self, newcomers: list[_Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append the newcomers' rows (cache + mask) to the running batch, left-padding the shorter side."""
        _check_layers(cache)
        if not self._running:
            for layer in cache.layers:  # the running batch's cache: in buffers with room from now on
                keys, values = layer.keys, layer.values
                layer.__class__ = _BatchLayer
                layer.adopt(keys, values, self.max_batch_size)
            self._running, self._cache, self._mask = list(newcomers), cache, mask
            return
        _check_layers(self._cache)
        width, length = self._mask.shape[1], mask.shape[1]
        if length > width:
            for layer in self._cache.layers:
                layer.extend_left(length - width)
            self._mask, width = _left_pad(self._mask, length, 1), length
        for layer, new in zip(self._cache.layers, cache.layers, strict=True):
            layer.append_rows(new.keys, new.values)
        self._mask = torch.cat([self._mask, _left_pad(mask, width, 1)])
        self._running += newcomers

    def _keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` of the batch, then drop leading positions that are padding in every kept row.

        Each dropped slot below ``len(rows)`` takes a kept row from the end, so only moved rows are copied
        (the order of the running rows changes; outputs carry their request id).
        """
        if not rows or not self.use_cache:
            self._running = [self._running[i] for i in rows]
            self._cache = self._mask = None
            return
        count, kept = len(rows), set(rows)
        holes = [i for i in range(count) if i not in kept]
        movers = [i for i in rows if i >= count]
        for target, source in zip(holes, movers, strict=True):
            for layer in self._cache.layers:
                layer.move_row(source, target)
            self._running[target] = self._running[source]
        if holes:
            self._mask[holes] = self._mask[movers]
        self._running = self._running[:count]
        mask = self._mask[:count]
        skip = int((mask.sum(dim=0) > 0).long().argmax())  # first position holding a real token
        self._mask = mask[:, skip:]
        for layer in self._cache.layers:
            layer.truncate(count, skip)

    def _advance_rows(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[StepOutput]:
        """`_advance` each sequence with its row of ``logits`` [rows, vocab]; the greedy picks of all rows
        come from one argmax (one per row cost ~4 us each: at 32 rows, a few percent of a tiny step)."""
        greedy = logits.argmax(dim=1).tolist()
        # A row whose logits are not finite (a numerical failure of the model on that row) cannot be
        # sampled: it alone finishes with an error. One check for the batch keeps the common case cheap.
        finite = torch.isfinite(logits).all(dim=1).tolist()
        outputs = []
        for seq, row, pick, ok in zip(seqs, logits, greedy, finite, strict=True):
            try:
                if not ok:
                    raise FloatingPointError("the model's logits for this request are not finite")
                outputs.append(self._advance(seq, row, pick))
            except Exception as exc:  # one request's failure never fails the others of its batch
                logger.exception("llmopt engine: request %s failed", seq.request.request_id)
                outputs.append(_failed(seq, exc))
        return outputs

    def _advance(self, seq: _Sequence, logits: torch.Tensor, greedy: int) -> StepOutput:
        """Pick the next token of ``seq`` (``greedy``, its row's argmax, at temperature 0 when no processor
        shapes its scores; else from its processed logits row), update its text, decide if it stops."""
        params = seq.request.params
        generated = len(seq.token_ids)
        early = generated < params.min_tokens
        scores = logits
        if params.shapes_logits() or early:
            scores = self._process(seq, logits, early)
            greedy = int(scores.argmax())
        token = greedy if params.temperature < GREEDY_BELOW else _sample(scores, params, seq.generator)
        logprob = top = None
        if params.logprobs is not None:
            logprob, top = _logprobs(logits, token, params.logprobs)
        seq.token_ids.append(token)
        reason = None
        ends = not early and (
            (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids
        )
        if ends:
            reason = "eos" if token in self.eos_token_ids and not params.ignore_eos else "stop"
        elif len(seq.token_ids) >= params.max_tokens:
            reason = "length"
        text = self._decode(seq, reason, drop_last=ends and not params.include_stop_str_in_output)
        stops = [] if early else [(i, s) for i, s in ((text.find(s), s) for s in params.stop if s) if i >= 0]
        if stops:
            at, stop = min(stops)
            text, reason = text[: at + len(stop) if params.include_stop_str_in_output else at], "stop"
        elif reason is None:
            text = _hold_back(text, params.stop)
        delta = text[len(seq.emitted) :] if text.startswith(seq.emitted) else ""
        seq.emitted += delta
        prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
        return StepOutput(
            request_id=seq.request.request_id,
            token_id=token,
            text=delta,
            finished=reason is not None,
            finish_reason=reason,
            logits=logits.clone() if self.keep_logits else None,
            cached_tokens=seq.cached_tokens,
            logprob=logprob,
            top_logprobs=top,
            prompt_logprobs=prompt_logprobs,
        )

    def _process(self, seq: _Sequence, logits: torch.Tensor, early: bool) -> torch.Tensor:
        """``logits`` with the request's processors applied: min_tokens, logit bias, then the repetition,
        frequency and presence penalties (vLLM's order)."""
        params = seq.request.params
        scores = logits.clone()
        if early:
            ends = [*self.eos_token_ids, *params.stop_token_ids] if not params.ignore_eos else []
            ends = [t for t in ends if t < scores.numel()]
            if ends:
                scores[ends] = float("-inf")
        if seq.bias is not None:
            ids, values = seq.bias
            scores.index_add_(0, ids, values)
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(seq.request.prompt_ids + seq.token_ids, device=scores.device).unique()
            picked = scores[seen]
            penalty = params.repetition_penalty
            scores[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
        if (params.presence_penalty or params.frequency_penalty) and seq.token_ids:
            generated = torch.tensor(seq.token_ids, device=scores.device)
            counts = torch.bincount(generated, minlength=scores.numel())[: scores.numel()].to(scores.dtype)
            scores -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(
                scores.dtype
            )
        # A repetition penalty of 5e-324 divides a logit into infinity: keep every score finite (or -inf,
        # ruled out), so the most likely tokens stay comparable and sampleable.
        return scores.nan_to_num(
            nan=float("-inf"), posinf=torch.finfo(scores.dtype).max, neginf=float("-inf")
        )

    def _decode(self, seq: _Sequence, reason: str | None, drop_last: bool = False) -> str:
        """The text of ``seq``'s generated tokens, its newest one included (unless ``drop_last``: an EOS or
        stop token ending it)."""
        params = seq.request.params
        if reason is None and seq.stream is not None:
            seq.text += seq.stream.step(self._backend, seq.token_ids[-1]) or ""  # None: a character is split
            return seq.text
        ids = seq.token_ids[:-1] if drop_last or reason == "eos" else seq.token_ids
        return self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)


def expand_choices(request: GenerationRequest) -> list[GenerationRequest]:
    """The engine requests of a request's ``params.n`` choices, choice 0 first.

    Choice i samples with ``seed + i`` (a fresh random seed each without a seed), so the choices differ and
    the same seed repeats them all. Choice 0 keeps the request's id, session and prefix cache (and stores the
    session back), and alone computes the prompt's log-probabilities; the others, ids ``<id>/<i>``, start
    from a copy of the prefix cache, so a session's history is prefilled once for all of them.
    """
    n = request.params.n
    if n <= 1:
        return [request]
    choices = []
    for i in range(n):
        seed = None if request.params.seed is None else request.params.seed + i
        # The prompt's log-probabilities are the same for every choice: choice 0 computes them.
        prompt_logprobs = request.params.prompt_logprobs if i == 0 else None
        params = replace(request.params, n=1, seed=seed, prompt_logprobs=prompt_logprobs)
        if i == 0:
            choices.append(replace(request, params=params))
            continue
        prefix = request.prefix_cache
        choices.append(
            replace(
                request,
                request_id=f"{request.request_id}/{i}",
                params=params,
                prefix_cache=copy_cache(prefix) if prefix is not None else None,
                keep_cache=False,
                session=None,
            )
        )
    return choices


def copy_cache(cache: DynamicCache) -> DynamicCache:
    copy = DynamicCache()
    for index, layer in enumerate(cache.layers):
        copy.update(layer.keys.clone(), layer.values.clone(), index)
    return copy


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick one token id from a logits row: argmax, or temperature / top-k / top-p / min-p sampling.

    Every filter keeps the most likely token, and the scores are shifted so that the best is 0 before the
    temperature divides them, so no top_p or min_p however small or large, and no temperature, leaves a
    distribution of NaNs (``top_p=1e-300`` is 0 in float32 and keeps the most likely token alone).
    """
    if params.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    best = logits.max()
    if not torch.isfinite(best):
        raise FloatingPointError("no token has a finite score")
    scores = (logits - best) / params.temperature
    scores = scores.nan_to_num(nan=float("-inf"), neginf=float("-inf"))
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort(descending=True)
        probs = sorted_scores.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= params.top_p  # the token that crosses top_p is kept
        drop[0] = False
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = scores.softmax(dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


def _logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """``token``'s log-probability under the model's distribution (the raw logits: no temperature or
    penalty) and the ``k`` most likely tokens with theirs."""
    scores = logits.float().log_softmax(dim=-1)
    top = scores.topk(k) if k else None
    alternatives = (
        list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
    )
    return float(scores[token]), alternatives


def _failed(seq: _Sequence, exc: BaseException) -> StepOutput:
    """The last output of a request that failed: finished with an error, no token."""
    return StepOutput(
        request_id=seq.request.request_id,
        token_id=None,
        text="",
        finished=True,
        finish_reason="error",
        cached_tokens=seq.cached_tokens,
        error=f"{type(exc).__name__}: {exc}",
    )


def _hold_back(text: str, stop: list[str]) -> str:
    """Cut a trailing partial UTF-8 character and any suffix that may be the start of a stop string."""
    text = text.rstrip("\ufffd")
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return text[: len(text) - longest]


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad ``t`` on the left of ``dim`` up to ``length`` (no-op when already that long)."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class _BatchLayer(DynamicLayer):
    """The running batch's cache layer: its rows and positions live in buffers with room to grow.

    `keys`/`values` are the views ``buffer[:rows, :, start:end]`` of zero-initialised buffers
    ``[row capacity, kv heads, position capacity, head dim]``, and every change copies only what changes:

    - a decode step writes its position in place (`DynamicLayer.update` concatenates, copying the whole
      cache every step: O(n^2) bytes over a generation; batch-1 decode of the ~100M preset at a 1.5k-token
      context took 39.6 ms per token with it and 34-36 ms in place);
    - newcomers' rows are written right-aligned after the running rows (`append_rows`);
    - a finished row's slot takes the last row (`move_row`, then `truncate`);
    - positions that became padding in every row are dropped by moving `start` (`truncate`).

    With 32 staggered requests on the tiny preset, merging and dropping rows by concatenation and
    `index_select` (then copying the result into a buffer with room) took about a fifth of the engine's
    time. Only a buffer that runs out of room is copied, into one 1.5x larger. Positions a row does not use
    hold zeros or another row's earlier keys (finite either way, and masked).
    """

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, max_rows: int) -> None:
        """Start from a prefill's keys and values ``[rows, kv heads, positions, head dim]``."""
        self._max_rows = max_rows
        self._buffers = tuple(t.new_zeros((0, t.shape[1], 0, t.shape[3])) for t in (keys, values))
        self._rows, self._start, self._end = 0, 0, 0
        self._reserve(keys.shape[0], keys.shape[2])
        self._end = keys.shape[2]
        self.append_rows(keys, values)

    def _view(self) -> None:
        self.keys, self.values = (b[: self._rows, :, self._start : self._end] for b in self._buffers)

    def _reserve(self, rows: int, width: int, left: int = 0) -> None:
        """Room for ``rows`` rows and ``width`` positions, ``left`` of them before the current ones."""
        buf = self._buffers[0]
        if rows <= buf.shape[0] and left <= self._start and self._start - left + width <= buf.shape[2]:
            return
        row_capacity = max(rows, min(2 * buf.shape[0], self._max_rows))
        capacity = width + max(64, width // 2)
        length = self._end - self._start
        fresh = tuple(b.new_zeros((row_capacity, b.shape[1], capacity, b.shape[3])) for b in self._buffers)
        for new, old in zip(fresh, self._buffers, strict=True):
            new[: self._rows, :, left : left + length] = old[: self._rows, :, self._start : self._end]
        self._buffers, self._start, self._end = fresh, left, left + length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[2]
        self._reserve(self._rows, self._end - self._start + new)
        for buf, states in zip(self._buffers, (key_states, value_states), strict=True):
            buf[: self._rows, :, self._end : self._end + new] = states
        self._end += new
        self._view()
        return self.keys, self.values

    def grow(self) -> int:
        """Add one position for every row, for the caller to write in the buffers (the lean batched step
        writes each row's new keys and values there itself); returns its index in `keys`/`values`."""
        self._reserve(self._rows, self._end - self._start + 1)
        self._end += 1
        self._view()
        return self._end - 1 - self._start

    def extend_left(self, positions: int) -> None:
        """Add ``positions`` padding positions (zeros) before the current ones, in every row."""
        self._reserve(self._rows, self._end - self._start + positions, left=positions)
        self._start -= positions
        for buf in self._buffers:
            buf[: self._rows, :, self._start : self._start + positions] = 0
        self._view()

    def append_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add rows after the running ones, their positions right-aligned (at most the current width)."""
        rows, length = keys.shape[0], keys.shape[2]
        self._reserve(self._rows + rows, self._end - self._start)
        for buf, states in zip(self._buffers, (keys, values), strict=True):
            buf[self._rows : self._rows + rows, :, self._end - length : self._end] = states
        self._rows += rows
        self._view()

    def move_row(self, source: int, target: int) -> None:
        for buf in self._buffers:
            buf[target, :, self._start : self._end] = buf[source, :, self._start : self._end]

    def truncate(self, rows: int, skip: int) -> None:
        """Keep the first ``rows`` rows and drop the first ``skip`` positions."""
        self._rows, self._start = rows, self._start + skip
        self._view()


def _check_layers(cache: DynamicCache) -> None:
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, _BatchLayer) or not layer.is_initialized:
            raise NotImplementedError(
                "GenerationEngine supports full-attention DynamicLayer caches only, got "
                f"{type(layer).__name__} (initialized={layer.is_initialized}); sliding-window or "
                "linear-attention models need another engine."
            )


def _adapter_kwargs(seqs: list[_Sequence], peft: bool) -> dict:
    """peft's mixed-batch argument for a ``PeftModel`` ("__base__" marks base-model rows)."""
    names = [s.request.adapter for s in seqs]
    if not peft and not any(names):
        return {}
    return {"adapter_names": [name or "__base__" for name in names]}


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
