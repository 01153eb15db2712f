"""jobs.evaluate runs the evaluation as a Ray task on the local cluster and writes its JSON."""

import json
import math

import pytest

pytestmark = pytest.mark.integration


def test_evaluate_job_on_ray(ray_cluster, repo, tmp_path):
    from jobs.evaluate import main

    out = tmp_path / "eval.json"
    result = main(
        [
            "--config",
            str(repo / "jobs/configs/tiny-llama-reverse.yaml"),
            "data.max_eval_samples=40",
            "resources.cpus_per_worker=1",
            "--output",
            str(out),
        ]
    )
    assert result["num_examples"] == 40
    assert result["exact_match"] == 0.0  # the untrained base: the figure fine-tuning must beat
    assert abs(result["loss"] - math.log(1024)) < 0.5
    assert result["torch_threads"] == 1
    saved = json.loads(out.read_text())
    assert saved["config"]["name"] == "tiny-llama-reverse" and saved["split"] == "test"
    assert saved["exact_match"] == result["exact_match"]


def test_job_rejects_a_broken_config_before_touching_ray(repo, capsys):
    from jobs.evaluate import main

    with pytest.raises(SystemExit) as info:
        main(["training.lr=-1", "modle.name_or_path=x"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "2 config error(s)" in err and "did you mean 'model'" in err and "training.lr" in err
