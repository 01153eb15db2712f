"""The model zoo: deterministic presets, cached by content hash, always loaded via from_pretrained."""

import json

import pytest
import torch

from llmopt.models import (
    PRESETS,
    ModelLoadError,
    build_preset,
    build_tokenizer,
    load_model,
    load_tokenizer,
    model_info,
)


def _state(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    """tiny-llama built from scratch into two separate caches."""
    mp = pytest.MonkeyPatch()
    paths = []
    for i in range(2):
        mp.setenv("LLMOPT_CACHE_DIR", str(tmp_path_factory.mktemp(f"cache{i}")))
        paths.append(build_preset("tiny-llama"))
    mp.undo()
    return paths


def test_zoo_is_deterministic(two_builds):
    a, b = two_builds
    assert a.name == b.name  # same content hash
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (a / name).read_text() == (b / name).read_text(), name


def test_second_build_is_a_cache_hit(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path))
    first = build_preset("tiny-moe")

    def must_not_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached preset")

    monkeypatch.setattr("llmopt.models._zoo.train_tokenizer", must_not_build)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_config", must_not_build)
    assert build_preset("tiny-moe") == first
    assert build_tokenizer().parent == tmp_path / "tokenizers"
    meta = json.loads((first / "llmopt.json").read_text())
    assert meta["preset"] == "tiny-moe"


def test_presets_have_the_promised_shapes():
    dense, moe, big = (model_info(n) for n in ("tiny-llama", "tiny-moe", "base-100m"))
    assert 1_000_000 <= dense.num_parameters <= 10_000_000
    assert moe.num_experts >= 4 and moe.experts_per_token == 2
    assert 80_000_000 <= big.num_parameters <= 150_000_000
    assert (big.hidden_size, big.num_layers) == (768, 12)
    assert not PRESETS["base-100m"].default_test
    assert dense.weight_bytes["fp32"] == 4 * dense.num_parameters
    assert dense.weight_bytes["nf4"] < dense.weight_bytes["int8"] < dense.weight_bytes["bf16"]


def test_loaded_models_match_info_and_tokenizer():
    for name in ("tiny-llama", "tiny-moe"):
        model = load_model(name)
        assert sum(p.numel() for p in model.parameters()) == model_info(name).num_parameters
        tokenizer = load_tokenizer(name)
        assert len(tokenizer) <= model.config.vocab_size
        assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
        assert model.config.eos_token_id == tokenizer.eos_token_id
        assert type(tokenizer).__name__ == "TokenizersBackend" or "Fast" in type(tokenizer).__name__
    assert [t for t in tokenizer.tokenize("12345")] == ["1", "2", "3", "4", "5"]


def test_local_directory_loads_through_the_same_path(tmp_path):
    model = load_model("tiny-llama")
    model.save_pretrained(tmp_path)
    load_tokenizer("tiny-llama").save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    for (name, p), (_, q) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert model_info(str(tmp_path)).num_parameters == model_info("tiny-llama").num_parameters


def test_unresolvable_model_says_what_was_tried(tmp_path):
    with pytest.raises(ModelLoadError, match=r"not a preset .* nor a local directory"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="unknown preset"):
        build_preset("huge-llama")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="local path exists but could not be loaded"):
        load_model(str(tmp_path / "empty"))


def test_moe_top_k_reroutes_a_native_moe_model(tmp_path):
    """`moe.top_k` on `finetune` changes the experts each token goes to (routers, MoE blocks, aux loss,
    saved config); unset, the model's own top-k stays."""
    from llmopt.config import load_config
    from llmopt.models import apply_strategy
    from llmopt.models._strategy import StrategyError, set_experts_per_token
    from llmopt.train import expert_token_counts

    base = ["model.name_or_path=tiny-moe", "moe.mode=finetune", "lora.enabled=false"]
    ids = torch.arange(1, 33).unsqueeze(0)
    logits = []
    for top_k, expected in ((None, 2), (1, 1)):
        extra = [] if top_k is None else [f"moe.top_k={top_k}"]
        model, _ = apply_strategy(load_model("tiny-moe"), load_config(None, [*base, *extra]))
        assert model.config.num_experts_per_tok == expected
        out = model(input_ids=ids, output_router_logits=True)
        logits.append(out.logits)
        counts = expert_token_counts(out.router_logits, expected, None)
        # Every token of every layer is routed to `expected` experts.
        assert int(counts.sum()) == ids.numel() * expected * model.config.num_hidden_layers
        routers = [m for m in model.modules() if type(m).__name__.endswith("Router")]
        assert routers and all(r.top_k == expected for r in routers)
        model.save_pretrained(tmp_path / str(top_k))
        assert (
            json.loads((tmp_path / str(top_k) / "config.json").read_text())["num_experts_per_tok"] == expected
        )
    assert not torch.allclose(logits[0], logits[1])  # top-1 routing really computes something else
    with pytest.raises(StrategyError, match="has no experts"):
        set_experts_per_token(load_model("tiny-llama"), 1)
    with pytest.raises(StrategyError, match="4 experts"):
        set_experts_per_token(load_model("tiny-moe"), 5)
