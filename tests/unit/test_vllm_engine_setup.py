"""The vLLM engine's set-up without vLLM: which engine a replica runs, the engine arguments a config implies,
which adapters vLLM can serve, and the records its outputs become (vLLM's output objects stood in for by
their fields)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from llmopt.config import load_config
from llmopt.serve import SamplingParams, ServingSetupError, TokenChunk, merge_chunks, resolve_engine
from llmopt.serve._vllm import (
    check_adapters,
    check_engine_kwargs,
    config_errors,
    engine_arguments,
    greedy_copies,
    to_chunks,
)


def test_resolve_engine():
    assert resolve_engine("native", "cuda:0", importable=True)[0] == "native"
    assert resolve_engine("vllm", "cpu", importable=True)[0] == "vllm"
    assert resolve_engine("auto", "cuda:0", importable=True) == (
        "vllm",
        "serving.engine=auto: the replica has a GPU and vLLM imports",
    )
    assert resolve_engine("auto", "cuda:0", importable=False)[0] == "native"
    assert resolve_engine("auto", "cpu", importable=True)[0] == "native"
    with pytest.raises(ServingSetupError, match=r"llmopt\[vllm\].*serving.engine=native"):
        resolve_engine("vllm", "cpu", importable=False)
    # auto keeps the native engine for a config vLLM refuses, and says why
    engine, why = resolve_engine(
        "auto", "cuda:0", importable=True, blockers=["serving.quantization='int8' ..."]
    )
    assert engine == "native" and "int8" in why


def test_the_app_builder_refuses_what_vllm_does_not_do_before_any_replica():
    from llmopt.serve import check_vllm_setup, vllm_setup_problems

    config = load_config(
        None, ["serving.engine=vllm", "serving.quantization=int8", "serving.batching.mode=static"]
    )
    with pytest.raises(ServingSetupError) as refused:
        check_vllm_setup(config)
    assert "serving.quantization='int8'" in str(refused.value) and "batching.mode" in str(refused.value)
    check_vllm_setup(load_config(None, ["serving.quantization=int8"]))  # native or auto: not vLLM's business
    assert len(vllm_setup_problems(load_config(None, ["serving.quantization=int8"]))) == 1


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["serving.quantization=int8"], "serving.quantization='int8'"),
        (["serving.decode_kernel=native"], "serving.decode_kernel=auto"),
        (["serving.batching.mode=static"], "serving.batching.mode=continuous"),
        (["serving.kv_cache.enabled=false"], "serving.kv_cache.enabled=false"),
        (["monitor.adaptive_batching=true"], "monitor.adaptive_batching=false"),
        (
            [
                "parallelism.tensor_parallel_size=2",
                "parallelism.num_workers=2",
                "resources.gpus_per_worker=1",
            ],
            "resources.gpus_per_worker=2",
        ),
    ],
)
def test_what_vllm_does_not_do_is_named_with_the_fix(overrides, words):
    errors = config_errors(load_config(None, overrides))
    assert len(errors) == 1 and words in errors[0]
    assert config_errors(load_config(None, [])) == []


def test_engine_arguments_on_cpu_size_the_kv_space_for_a_full_batch():
    config = load_config(
        None, ["model.max_seq_len=128", "serving.batching.max_batch_size=8", "serving.kv_cache.budget_mb=16"]
    )
    model = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    args = engine_arguments(config, "cpu", model_config=model)
    assert args["dtype"] == "float32" and args["max_model_len"] == 128 and args["max_num_seqs"] == 8
    assert args["served_model_name"] == "tiny-llama" and args["enable_prefix_caching"] is True
    per_token = 2 * 2 * 2 * 16 * 4  # keys and values, layers, kv heads, head dim, fp32
    assert args["kv_cache_memory_bytes"] == 8 * 128 * per_token + 16 * 2**20
    assert "gpu_memory_utilization" not in args and "enable_lora" not in args
    single = engine_arguments(load_config(None, ["serving.batching.mode=none"]), "cpu", model_config=model)
    assert single["max_num_seqs"] == 1


def test_engine_arguments_on_gpus():
    config = load_config(
        None,
        [
            "serving.precision=fp16",
            "resources.gpus_per_worker=0.5",
            "serving.quantization=nf4",
        ],
    )
    args = engine_arguments(config, "cuda:0")
    assert args["dtype"] == "float16" and args["quantization"] == "bitsandbytes"
    assert args["gpu_memory_utilization"] == pytest.approx(0.45)  # half a GPU: half its memory
    assert "kv_cache_memory_bytes" not in args and "distributed_executor_backend" not in args
    tp = load_config(
        None,
        [
            "serving.precision=fp16",
            "parallelism.tensor_parallel_size=4",
            "parallelism.num_workers=4",
            "resources.gpus_per_worker=4",
        ],
    )
    args = engine_arguments(tp, "cuda:0")
    assert args["tensor_parallel_size"] == 4 and args["distributed_executor_backend"] == "mp"
    assert args["gpu_memory_utilization"] == pytest.approx(0.9)


def _peft_adapter(path, **kwargs) -> None:
    from peft import get_peft_model

    from llmopt.models import load_model

    get_peft_model(load_model("tiny-llama"), **kwargs).save_pretrained(path)


def test_adapters_vllm_serves_and_those_it_cannot(tmp_path):
    from peft import IA3Config, LoraConfig

    _peft_adapter(tmp_path / "lora" / "adapter", peft_config=LoraConfig(r=12, target_modules=["q_proj"]))
    found = check_adapters({"a": str(tmp_path / "lora")})  # a run directory: its adapter/ folder
    assert [(a.name, a.rank, a.lora_int_id) for a in found] == [("a", 12, 1)]
    config = load_config(None, [f"serving.adapters.a={tmp_path / 'lora'}"])
    model = SimpleNamespace(num_hidden_layers=1, num_attention_heads=1, hidden_size=8)
    cpu = engine_arguments(config, "cpu", found, model_config=model)
    # One LoRA slot more than adapters on CPU (see engine_arguments), ranks rounded up to vLLM's kernels'.
    assert cpu["enable_lora"] is True and cpu["max_loras"] == 2 and cpu["max_lora_rank"] == 16
    gpu = engine_arguments(load_config(None, ["serving.precision=fp32"]), "cuda:0", found)
    assert gpu["max_loras"] == 1

    _peft_adapter(tmp_path / "dora", peft_config=LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    _peft_adapter(
        tmp_path / "saves",
        peft_config=LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    )
    _peft_adapter(tmp_path / "ia3", peft_config=IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    _peft_adapter(tmp_path / "bias", peft_config=LoraConfig(r=4, target_modules=["q_proj"], bias="lora_only"))
    with pytest.raises(ServingSetupError) as refused:
        check_adapters(
            {
                key: str(tmp_path / folder)
                for key, folder in zip("dsib", ("dora", "saves", "ia3", "bias"), strict=True)
            }
        )
    lines = str(refused.value).splitlines()
    assert len(lines) == 4 and all("merge" in line and "serving.engine=native" in line for line in lines)
    assert "DoRA" in lines[0] and "modules_to_save" in lines[1] and "IA3" in lines[2] and "bias" in lines[3]
    _peft_adapter(
        tmp_path / "pattern",
        peft_config=LoraConfig(r=8, target_modules=["q_proj"], rank_pattern={"q_proj": 40}),
    )
    assert check_adapters({"p": str(tmp_path / "pattern")})[0].rank == 40  # the largest rank sizes the slots


def test_unknown_engine_kwargs_are_named_with_the_close_ones():
    with pytest.raises(ServingSetupError, match=r"'gpu_memory_util' \(did you mean 'gpu_memory_utilization'"):
        check_engine_kwargs(
            {"gpu_memory_util": 0.5, "enforce_eager": True}, ["gpu_memory_utilization", "enforce_eager"]
        )
    check_engine_kwargs({"enforce_eager": True}, ["enforce_eager"])


def _logprob(value: float, rank: int):
    return SimpleNamespace(logprob=value, rank=rank)


def test_vllm_outputs_become_llmopt_records():
    params = SamplingParams(max_tokens=4, logprobs=1, prompt_logprobs=1, n=2, temperature=1.0)
    output = SimpleNamespace(
        prompt_token_ids=[5, 6],
        prompt_logprobs=[None, {6: _logprob(-2.0, 3), 9: _logprob(-0.5, 1)}],
        num_cached_tokens=32,
        outputs=[
            SimpleNamespace(
                index=0,
                token_ids=[7],
                text="a",
                logprobs=[{7: _logprob(-0.1, 1)}],
                finish_reason=None,
                stop_reason=None,
            ),
            SimpleNamespace(
                index=1,
                token_ids=[2],
                text="",
                logprobs=[{2: _logprob(-3.0, 4), 8: _logprob(-0.2, 1)}],
                finish_reason="stop",
                stop_reason=None,  # an end-of-sequence token
            ),
        ],
    )
    first, second = to_chunks(output, params, first=True)
    assert first == TokenChunk(
        [7], "a", False, None, 32, logprobs=[(-0.1, [(7, -0.1)])], prompt_logprobs=[None, (-2.0, [(9, -0.5)])]
    )
    assert second.finish_reason == "eos" and second.finished and second.index == 1
    assert second.logprobs == [(-3.0, [(8, -0.2)])] and second.prompt_logprobs is None
    stopped = SimpleNamespace(**{**vars(output.outputs[1]), "stop_reason": "###"})
    aborted = SimpleNamespace(**{**vars(output.outputs[1]), "finish_reason": "abort"})
    later = SimpleNamespace(**{**vars(output), "outputs": [stopped, aborted]})
    stop, abort = to_chunks(later, params, first=False)
    assert stop.finish_reason == "stop" and stop.prompt_logprobs is None
    assert abort.finish_reason == "error" and abort.error


def test_records_of_a_choice_merge_and_greedy_choices_run_once():
    chunks = [
        TokenChunk([1], "a", False, None, 0, logprobs=[(-1.0, [])], index=0),
        TokenChunk([2], "b", False, None, 0, index=1),
        TokenChunk([3], "c", True, "length", 0, logprobs=[(-2.0, [])], index=0),
    ]
    merged = merge_chunks(chunks)
    assert [(c.index, c.token_ids, c.text, c.finished) for c in merged] == [
        (0, [1, 3], "ac", True),
        (1, [2], "b", False),
    ]
    assert merged[0].logprobs == [(-1.0, []), (-2.0, [])] and merged[0].finish_reason == "length"
    assert greedy_copies(SamplingParams(n=3, temperature=0.0)) == 3
    assert greedy_copies(SamplingParams(n=3, temperature=0.7)) == 1
    assert greedy_copies(SamplingParams(n=1)) == 1
