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
