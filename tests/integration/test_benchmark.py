"""`python -m jobs.benchmark train --quick`: JSON and PNG written, Ray run and plain loop agree."""

import json

import pytest

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
