"""Evaluate a run config's model on its held-out split, as a Ray task sized from the config.

Run it on the embedded local cluster, or submit it to a running one:

    python -m jobs.evaluate --config jobs/configs/tiny-llama-reverse.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.evaluate --config jobs/configs/tiny-llama-reverse.yaml

CPU smoke run (a few seconds): python -m jobs.evaluate data.max_eval_samples=20

Prints exact match and response loss, and writes them as JSON (default outputs/eval/<name>.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jobs._args import parse_job_args
from llmopt.config import RunConfig


def evaluate_on_ray(config: RunConfig, split: str | None = None) -> dict[str, Any]:
    """Run `llmopt.evaluation.evaluate_config` in a Ray task with the config's CPU share."""
    import ray

    from llmopt.cluster import init_ray

    init_ray()

    from llmopt.cluster import check_resources

    check_resources(config, "training")

    @ray.remote(num_cpus=config.resources.cpus_per_worker, num_gpus=config.resources.gpus)
    def _evaluate(config: RunConfig, split: str | None) -> dict[str, Any]:
        from transformers.utils import logging as hf_logging

        from llmopt.devices import describe_device, ray_assigned_device
        from llmopt.evaluation import evaluate_config
        from llmopt.runtime import set_torch_threads

        hf_logging.disable_progress_bar()
        threads = set_torch_threads(config.resources.cpus_per_worker)
        device = ray_assigned_device(config.resources.accelerator)
        result, seconds = evaluate_config(config, split, device=device)
        return {
            **result.to_dict(),
            "seconds": seconds,
            "torch_threads": threads,
            "device": describe_device(device),
            "node": ray.util.get_node_ip_address(),
        }

    return ray.get(_evaluate.remote(config, split))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, args = parse_job_args(
        "Evaluate a model on the held-out split as a Ray task.",
        argv,
        split={"default": None, "help": "Split to evaluate (default: data.eval_split)."},
        output={"default": None, "help": "JSON output path (default: outputs/eval/<name>.json)."},
    )
    result = evaluate_on_ray(config, args.split)
    split = args.split or config.data.eval_split
    print(
        f"{config.model.name_or_path} on {config.data.dataset}/{split}: "
        f"exact match {result['exact_match']:.1%} "
        f"({result['num_correct']}/{result['num_examples']}), response loss {result['loss']:.4f}, "
        f"{result['seconds']:.1f} s on {result['device']} ({result['torch_threads']} thread(s))"
    )
    output = Path(args.output or f"outputs/eval/{config.name}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps({"config": config.model_dump(mode="json"), "split": split, **result}, indent=2)
    )
    print(f"written: {output}")
    return result


if __name__ == "__main__":
    main()
