"""The worker loop's one collective helper, on a real two-rank gloo group (what nccl does on GPUs)."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmopt.train import all_reduce_values
from tests._serve import free_port as _free_port


def _rank(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # The loop's figures: loss, token counts, a 0/1 flag; large counts stay exact in float64.
        summed = all_reduce_values([rank + 0.5, 3, float(rank == 0), 2**40 + rank], torch.device("cpu"))
        results[rank] = summed
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_every_rank_on_a_gloo_group():
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(_free_port(), results), nprocs=2, join=True)
    assert results[0] == results[1] == [2.0, 6.0, 1.0, 2.0**41 + 1]


def test_without_a_process_group_the_values_come_back_as_floats():
    assert not dist.is_initialized()
    assert all_reduce_values([1, 2.5], "cpu") == [1.0, 2.5]
    assert all_reduce_values([], "cpu") == []


def test_the_training_package_runs_collectives_only_through_the_helper(repo):
    # A collective on a tensor built elsewhere would be a CPU tensor, which nccl refuses on GPUs.
    train = repo / "platform" / "llmopt" / "train"
    calls = ("all_reduce(", "all_gather(", "broadcast(", "reduce_scatter(")
    for path in train.glob("*.py"):
        if path.name == "_collectives.py":
            continue
        source = path.read_text()
        assert not [c for c in calls if f"distributed.{c}" in source or f"dist.{c}" in source], path.name
