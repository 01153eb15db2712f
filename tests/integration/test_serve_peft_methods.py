"""Adapters of every peft method the native engine mixes, in one app and one batch: LoRA through peft's
mixed-batch forward, prompt and prefix tuning as KV prefixes of the base model. Each answer is checked
against peft's own forward pass, token by token (vLLM serves plain LoRA only). DoRA, IA3, LoHa and LoKr
adapters are refused before any replica starts, with the merged model as the fix."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests._serve import llm_app

pytestmark = [pytest.mark.integration]

OVERRIDES = [
    "model.max_seq_len=128",
    "serving.engine=native",
    "serving.batching.max_batch_size=8",
    "serving.max_new_tokens=16",
    "resources.cpus_per_worker=0.5",  # two model deployments (the main model, `dora`) on 2 CPUs
]
PROMPTS = ["Hello world", "The quick brown fox", "reverse: abc"]
METHODS = ("lora", "prompt", "prefix")


def _save(kind: str, path) -> None:
    """A real peft adapter of `kind` for tiny-llama with large random weights, so it changes the outputs."""
    import peft
    import torch

    from llmopt.models import load_model

    torch.manual_seed({"lora": 1, "dora": 1, "ia3": 1, "prompt": 2, "prefix": 3}[kind])
    targets = ["q_proj", "v_proj", "down_proj"]
    config = {
        "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets),
        "dora": peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets),
        "ia3": peft.IA3Config(
            target_modules=targets, feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
        ),
        "prompt": peft.PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
        "prefix": peft.PrefixTuningConfig(num_virtual_tokens=7, task_type="CAUSAL_LM"),
    }[kind]
    model = peft.get_peft_model(load_model("tiny-llama"), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.5 if kind in ("lora", "dora", "ia3") else 1.0)
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    for kind in (*METHODS, "dora"):
        _save(kind, root / kind)
    return {kind: root / kind for kind in (*METHODS, "dora")}


@pytest.fixture(scope="module")
def merged_dora(adapters, tmp_path_factory):
    """The DoRA adapter merged into its base (`llmopt merge`): a model served beside the main one."""
    from llmopt.models import merge_adapter

    return merge_adapter(adapters["dora"], tmp_path_factory.mktemp("merged") / "dora")


@pytest.fixture(scope="module")
def server(ray_cluster, repo, adapters, merged_dora):
    overrides = [
        *OVERRIDES,
        *(f"serving.adapters.{k}={adapters[k]}" for k in METHODS),
        f"serving.models.dora={merged_dora}",
        # A split between the main model and another model (the merged DoRA fine-tune), per user.
        "serving.routes.mix.arms.base.model=tiny-llama",
        "serving.routes.mix.arms.base.weight=50",
        "serving.routes.mix.arms.new.model=dora",
        "serving.routes.mix.arms.new.weight=50",
    ]
    with llm_app(repo, overrides, name="peft") as url:
        yield url


@pytest.fixture(scope="module")
def truth(adapters):
    """Greedy tokens and prompt log-probabilities from peft's forward over the whole sequence (no cache)."""
    import torch
    from peft import PeftModel

    from llmopt.config import load_config
    from llmopt.data import encode_prompt
    from llmopt.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(load_config(None, OVERRIDES).model)
    models = {None: load_model("tiny-llama").eval()}
    for kind, path in adapters.items():
        models[kind] = PeftModel.from_pretrained(load_model("tiny-llama"), str(path)).eval()

    def logits(kind, ids):
        t = torch.tensor([ids])
        with torch.no_grad():
            out = models[kind](input_ids=t, attention_mask=torch.ones_like(t)).logits[0].float()
        return out[-len(ids) :]  # prompt tuning puts its virtual positions first

    def greedy(kind, prompt: str, max_tokens: int = 8) -> list[int]:
        ids = encode_prompt(prompt, tokenizer)
        new = []
        for _ in range(max_tokens):
            token = int(logits(kind, ids + new)[-1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
        return new

    def prompt_logprobs(kind, prompt: str) -> list[float]:
        ids = encode_prompt(prompt, tokenizer)
        scores = logits(kind, ids)[:-1].log_softmax(-1)
        return [float(scores[i, ids[i + 1]]) for i in range(len(ids) - 1)]

    return greedy, prompt_logprobs, tokenizer


def _complete(url: str, prompt: str, model: str, **extra) -> dict:
    body = {"prompt": prompt, "model": model, "max_tokens": 8, "temperature": 0, **extra}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_every_method_in_one_mixed_batch_matches_peft(server, truth):
    greedy, _, tokenizer = truth
    models = ["tiny-llama", *(f"tiny-llama:{k}" for k in METHODS)]
    jobs = [(p, m) for p in PROMPTS for m in models]
    with ThreadPoolExecutor(len(jobs)) as pool:  # 12 requests on a batch of 8: adapters share steps
        answers = list(pool.map(lambda job: _complete(server, job[0], job[1]), jobs))
    texts, usage = {}, {}
    for (prompt, model), answer in zip(jobs, answers, strict=True):
        kind = model.split(":")[1] if ":" in model else None
        want = tokenizer.decode(greedy(kind, prompt), skip_special_tokens=True)
        assert answer["choices"][0]["text"] == want, (prompt, model)
        texts[(prompt, kind)] = want
        usage[(prompt, kind)] = answer["usage"]
    for kind in METHODS:  # each adapter really changes the output
        assert any(texts[(p, kind)] != texts[(p, None)] for p in PROMPTS), kind
        # The virtual tokens are the adapter's, not the caller's: usage counts the prompt as sent.
        for p in PROMPTS:
            assert usage[(p, kind)]["prompt_tokens"] == usage[(p, None)]["prompt_tokens"], kind
            assert usage[(p, kind)]["prompt_tokens_details"]["cached_tokens"] == 0


def test_prompt_logprobs_of_a_prompt_tuning_adapter_follow_its_virtual_tokens(server, truth):
    _, prompt_logprobs, _ = truth
    for kind in ("prompt", "prefix"):
        answer = _complete(server, PROMPTS[1], f"tiny-llama:{kind}", echo=True, logprobs=0, max_tokens=1)
        served = answer["choices"][0]["logprobs"]["token_logprobs"]
        want = prompt_logprobs(kind, PROMPTS[1])
        assert served[0] is None and len(served) == len(want) + 2  # first prompt token, then one generated
        assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(served[1:-1], want, strict=True)), kind


def test_a_session_keeps_its_adapters_virtual_tokens_and_not_another_models_cache(server, truth):
    greedy, _, tokenizer = truth
    first = _complete(server, PROMPTS[0], "tiny-llama:prefix", session_id="s1")
    follow = PROMPTS[0] + first["choices"][0]["text"] + " and more"
    again = _complete(server, follow, "tiny-llama:prefix", session_id="s1")
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the earlier turn's tokens
    assert again["choices"][0]["text"] == tokenizer.decode(greedy("prefix", follow), skip_special_tokens=True)
    # The same session id on another model starts from that model's own state.
    other = _complete(server, follow, "tiny-llama:prompt", session_id="s1")
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert other["choices"][0]["text"] == tokenizer.decode(greedy("prompt", follow), skip_special_tokens=True)


def test_adapters_peft_cannot_mix_are_refused_before_any_replica_with_the_merge_fix(repo, adapters, tmp_path):
    import sys

    from llmopt.serve import ServingSetupError

    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from serve_apps.llm import app

    for kind in ("dora", "ia3"):
        _save(kind, tmp_path / kind)
    overrides = [
        *OVERRIDES,
        f"serving.adapters.d={tmp_path / 'dora'}",
        f"serving.adapters.i={tmp_path / 'ia3'}",
    ]
    with pytest.raises(ServingSetupError) as info:
        app({"overrides": [*overrides, f"serving.adapters.ok={adapters['prompt']}"]})
    text = str(info.value)
    assert "serving.adapters.d is DoRA" in text and "serving.adapters.i is IA3" in text
    assert "llmopt merge RUN" in text and "serving.adapters.ok" not in text
    with pytest.raises(ServingSetupError, match=r"serving\.kv_cache\.enabled=true"):
        app(
            {
                "overrides": [
                    *OVERRIDES,
                    "serving.kv_cache.enabled=false",
                    f"serving.adapters.p={adapters['prefix']}",
                ]
            }
        )


def test_a_merged_model_is_served_beside_the_main_one_and_in_a_split(server, truth):
    """DoRA cannot share a batch, so its merged model is served as a model of its own (`serving.models`):
    it answers as peft's DoRA model does, and a route splits users between it and the main model."""
    greedy, _, tokenizer = truth
    models = {m["id"] for m in httpx.get(f"{server}/v1/models", timeout=30).json()["data"]}
    assert {"tiny-llama", "dora", "mix"} <= models
    for prompt in PROMPTS:
        answer = _complete(server, prompt, "dora")["choices"][0]["text"]
        assert answer == tokenizer.decode(greedy("dora", prompt), skip_special_tokens=True), prompt
    arms = {}
    for i in range(40):
        body = {"prompt": PROMPTS[0], "model": "mix", "max_tokens": 8, "temperature": 0, "user": f"u{i}"}
        response = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        arm = response.headers["x-route-arm"]
        kind = "dora" if arm == "new" else None
        assert response.json()["choices"][0]["text"] == tokenizer.decode(
            greedy(kind, PROMPTS[0]), skip_special_tokens=True
        )
        arms[arm] = arms.get(arm, 0) + 1
    assert set(arms) == {"base", "new"}, arms
