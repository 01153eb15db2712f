"""`python -m jobs.benchmark train --quick`: JSON and PNG written, Ray run and plain loop agree."""

import json

import pytest

from benchmarks.serve import SERVE_PROXY

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quick_train_benchmark(ray_cluster, tmp_path):
    from jobs.benchmark import main

    report = main(["train", "--quick", "--steps", "3", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "train.json").read_text())
    assert saved["figures"] == pytest.approx(report["figures"])
    assert (tmp_path / "train.png").read_bytes()[:4] == b"\x89PNG"
    ray_case, plain = saved["cases"]
    assert (ray_case["label"], plain["label"]) == ("LoRA", "plain torch, LoRA")
    for case in (ray_case, plain):
        assert case["tokens_per_s"] > 0 and case["peak_memory_bytes"] > 0
    # Same model, data order, optimizer and schedule: the two loops compute the same training.
    assert ray_case["final_loss"] == pytest.approx(plain["final_loss"], abs=1e-4)
    assert ray_case["trainable_parameters"] == plain["trainable_parameters"]
    assert report["figures"]["lora_trainable_fraction"] < 0.02
    assert "ray_deepspeed_1_worker_vs_plain_torch" in report["figures"]


def test_quick_peft_benchmark(ray_cluster, repo, tmp_path):
    from jobs.benchmark import main

    config = str(repo / "jobs" / "configs" / "tiny-llama-reverse.yaml")
    report = main(["peft", "--quick", "--config", config, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "peft.json").read_text())
    assert (tmp_path / "peft.png").read_bytes()[:4] == b"\x89PNG"
    rows = {r["method"]: r for r in saved["methods"]}
    assert set(rows) == {"lora", "prompt_tuning"} and saved == json.loads(json.dumps(report))
    for row in rows.values():
        # The cost model counts what peft built; the shipped config also trains the output head.
        assert row["predicted_trainable_parameters"] == row["trainable_parameters"]
        assert 0 < row["adapter_parameters"] < row["trainable_parameters"] and row["steps"] == 6
        assert row["tokens_per_s"] > 0 and row["eval_loss"] > 0
    # 20 virtual token embeddings of 256 against LoRA's rank-8 attention adapters in 4 layers.
    assert rows["prompt_tuning"]["adapter_parameters"] == 20 * 256 < rows["lora"]["adapter_parameters"]


def test_quick_compress_benchmark(ray_cluster, repo, tmp_path):
    from jobs.benchmark import main

    config = str(repo / "jobs" / "configs" / "tiny-llama-reverse.yaml")
    report = main(["compress", "--quick", "--config", config, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "compress.json").read_text())
    assert (tmp_path / "compress.png").read_bytes()[:4] == b"\x89PNG" and saved == json.loads(
        json.dumps(report)
    )
    rows = {r["variant"]: r for r in saved["variants"]}
    assert set(rows) == {"original", "lora-merged", "int8-dynamic", "nf4", "pruned50", "pruned50-recovered"}
    fp32 = rows["lora-merged"]
    # Quantized weights are smaller on disk and in memory; pruned ones are zeros stored dense.
    assert rows["int8-dynamic"]["memory_bytes"] < 0.5 * fp32["memory_bytes"]
    assert (
        rows["nf4"]["memory_bytes"] < 0.5 * fp32["memory_bytes"]
        and rows["nf4"]["disk_bytes"] < fp32["disk_bytes"]
    )
    assert rows["pruned50"]["memory_bytes"] == fp32["memory_bytes"]
    assert saved["recovery"]["steps"] == 4
    for row in rows.values():
        assert set(row["prefill"]) == {"64", "128"} and row["decode"]["tokens_per_s"] > 0
        assert 0.0 <= row["eval_exact_match"] <= 1.0 and row["eval_loss"] > 0


def test_quick_serve_benchmark(ray_cluster, tmp_path):
    """`serve --quick`: every load point, both session cases and the precision rows have positive figures.

    Only counts, token numbers and positivity are checked: never speed.
    """
    from jobs.benchmark import main

    report = main(["serve", "--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "serve.json").read_text())
    assert (tmp_path / "serve.png").read_bytes()[:4] == b"\x89PNG"
    assert saved["benchmark"] == "serve" and saved["quick"] is True
    assert saved["transport"] == SERVE_PROXY  # the session cluster runs Serve's default HTTP path
    assert saved["figures"].keys() == report["figures"].keys()
    settings = saved["settings"]
    for key in ("copy_bytes_per_s", "sum_bytes_per_s", "gemv_bytes_per_s"):
        assert saved["bandwidth"][key] > 0
    if saved["bandwidth"]["transparent_huge_pages"] in ("always", "madvise"):  # the served weights' pages too
        assert saved["bandwidth"]["sum_huge_pages_bytes_per_s"] > 0
    loads = [c for c in saved["cases"] if c["kind"] == "load"]
    assert [(c["label"], [p["concurrency"] for p in c["points"]]) for c in loads] == [
        ("none", [1]),
        ("continuous", [1, 4]),
    ]
    # The ceiling of the bandwidth figure comes from measurements right before and after its batch-1 point.
    adjacent = loads[1]["points"][0]["bandwidth_adjacent"]
    assert len(adjacent) == 2 and all(b["sum_bytes_per_s"] > 0 for b in adjacent)
    assert "bandwidth_adjacent" not in loads[1]["points"][1]
    assert "before and after" in saved["figures"]["bandwidth_fraction"]["bandwidth_used"]
    # (a)'s ceiling: the tiny preset's matrix products alone at the top concurrency.
    matmul = saved["matmul_ceiling"]
    assert matmul["batch"] == 4 and matmul["decode_step_s"] > 0 and matmul["prefill_s"] > 0
    speedup = saved["figures"]["batching_speedup"]
    assert speedup["matmul_ceiling_tokens_per_s"] == matmul["ceiling_tokens_per_s"] > 0
    assert speedup["fraction_of_matmul_ceiling"] > 0
    for case in loads:
        assert "error" not in case
        for point in case["points"]:
            assert point["errors"] == 0, point["first_error"]
            for key in (
                "requests_per_s",
                "output_tokens_per_s",
                "ttft_p50_s",
                "ttft_p99_s",
                "latency_p50_s",
                "latency_p99_s",
                "decode_tokens_per_s_p50",
                "batch_size_mean",
            ):
                assert point[key] > 0, key
            # ignore_eos: every request generates exactly max_tokens (counted from the stream's usage).
            assert point["completion_tokens_mean"] == settings["output_tokens"]
            assert 1 <= point["stream_events_mean"] <= settings["output_tokens"]

    sessions = {c["label"]: c for c in saved["cases"] if c["kind"] == "session"}
    assert set(sessions) == {"session reuse", "recompute"}
    for case in sessions.values():
        assert "error" not in case, case["error"]
        s = case["session"]
        assert s["sessions"] == settings["session_repeats"]
        assert s["turn2_ttft_p50_s"] > 0 and s["turn1_latency_p50_s"] > 0
        # Turn 2 re-sends history + reply + follow-up.
        assert s["turn2_prompt_tokens"] >= settings["session_history"] + settings["session_followup"]
    # The follow-up reuses the session's cache: all of the history but a few tokens where the re-sent
    # conversation may tokenize differently at the reply's edges. Without reuse nothing is cached.
    assert sessions["session reuse"]["session"]["turn2_cached_tokens"] >= 0.9 * settings["session_history"]
    assert sessions["recompute"]["session"]["turn2_cached_tokens"] == 0

    precision = saved["precision"]
    assert saved["precision_error"] is None
    assert [(r["preset"], r["format"]) for r in precision] == [
        ("tiny-llama", "fp32"),
        ("tiny-llama", "fp32, transformers forward"),
        ("tiny-llama", "fp32, torch GEMV"),
        ("tiny-llama", "int8"),
        ("tiny-llama", "bf16"),
    ]
    kernels = [row["decode_kernel"] for row in precision]
    assert kernels[2] == kernels[4] == "torch"  # serving.decode_kernel=torch, and bf16 (native is fp32 only)
    paths = [row["decode_path"] for row in precision]
    native = kernels[0].startswith("native")  # no C compiler here: torch's kernel, and no lean step
    assert paths[0] == ("lean Llama step" if native else "transformers (not every projection runs "
                        "the native decode kernel)")  # fmt: skip
    assert paths[1] == "transformers (turned off)" and paths[2].startswith("transformers (not every")
    for row in precision:
        keys = ("weight_bytes", "heldout_loss", "decode_tokens_per_s_batch1", "decode_tokens_per_s_batch8")
        for key in keys:
            assert row[key] > 0, (row["format"], key)

    assert {"batching_speedup", "bandwidth_fraction", "session_ttft_speedup"} <= set(saved["figures"])
    assert saved["figures"]["batching_speedup"]["ratio"] > 0
    for figure in saved["figures"].values():
        # Quick-run conditions differ from the targets' (tiny preset, concurrency 4): no verdict.
        assert figure["value"] > 0 and figure["passed"] is None


def test_serve_benchmark_refuses_the_throughput_mode_on_a_joined_cluster(ray_cluster, tmp_path):
    """Serve's mode is fixed when a cluster starts: asked of a joined one, the benchmark says how instead."""
    from jobs.benchmark import main

    with pytest.raises(ValueError, match="RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1"):
        main(["serve", "--quick", "--throughput-optimized", "--out", str(tmp_path)])
    assert not (tmp_path / "serve.json").exists()
