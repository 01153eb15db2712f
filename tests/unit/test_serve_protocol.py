"""Request bodies, API keys and adapter paths of the serving app (no Ray)."""

import pytest
from pydantic import ValidationError

from llmopt.serve import (
    CompletionRequest,
    GenerateRequest,
    ServingSetupError,
    error_body,
    load_api_keys,
    owner_of,
    resolve_adapter,
    stream_interval,
)


def test_bodies_reject_unknown_fields_and_bad_ranges():
    assert CompletionRequest(prompt="hi").temperature is None  # OpenAI's default (1) applies
    assert GenerateRequest(prompt="hi").stream is True and GenerateRequest(prompt="hi").temperature == 0.0
    with pytest.raises(ValidationError, match="extra"):
        CompletionRequest(prompt="hi", bogus=1)
    for bad in ({"max_tokens": 0}, {"top_p": 0}, {"temperature": 3}, {"top_k": -2}, {"session_id": ""}):
        with pytest.raises(ValidationError):
            CompletionRequest(prompt="hi", **bad)


def test_error_body_shape():
    assert error_body(404, "no", "model", "model_not_found") == {
        "error": {
            "message": "no",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert error_body(503, "busy")["error"]["type"] == "server_overloaded"
    assert error_body(500, "x")["error"]["type"] == "server_error"


def test_api_keys_from_env_and_file(tmp_path, monkeypatch):
    assert load_api_keys(None, None) is None  # auth off
    monkeypatch.setenv("LLMOPT_TEST_KEYS", "k1, k2,")
    (tmp_path / "keys").write_text("k3\nk4\n\n")
    assert load_api_keys("LLMOPT_TEST_KEYS", str(tmp_path / "keys")) == {"k1", "k2", "k3", "k4"}
    with pytest.raises(ServingSetupError, match="LLMOPT_MISSING"):
        load_api_keys("LLMOPT_MISSING", None)
    with pytest.raises(ServingSetupError, match="does not exist"):
        load_api_keys(None, str(tmp_path / "nope"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ServingSetupError, match="no key"):
        load_api_keys(None, str(tmp_path / "empty"))
    assert owner_of("k1") != owner_of("k2") and "k1" not in owner_of("k1")
    assert owner_of(None) == "anonymous"


def test_resolve_adapter_accepts_run_dirs_and_adapter_dirs(tmp_path):
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{}")
    assert resolve_adapter("a", str(tmp_path / "run")) == tmp_path / "run" / "adapter"
    assert resolve_adapter("a", str(tmp_path / "run" / "adapter")) == tmp_path / "run" / "adapter"
    with pytest.raises(ServingSetupError, match=r"serving\.adapters\.full"):
        resolve_adapter("full", str(tmp_path))


def test_stream_interval_grows_with_the_streams_of_a_replica():
    assert stream_interval(0.05, 200, 1) == 0.05  # few streams: the configured interval
    assert stream_interval(0.05, 200, 10) == 0.05
    assert stream_interval(0.05, 200, 32) == pytest.approx(0.16)  # 32 streams share 200 chunks/s
    assert stream_interval(0.0, 200, 32) == 0.0  # 0 still sends every token on its own
