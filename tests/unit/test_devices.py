"""Device choice and the hardware checks that run before any worker starts: no GPU needed."""

import pytest
import torch

from llmopt.cluster import check_resources, gpus_have_bf16, resource_errors
from llmopt.config import ConfigError, load_config
from llmopt.devices import DeviceError, assigned_device, describe_device, local_device, memory_stats

CPU_NODE = {"CPU": 2.0, "memory": 8e9}
GPU_NODE = {"CPU": 16.0, "GPU": 8.0, "accelerator_type:H100": 1.0}
T4_NODE = {"CPU": 8.0, "GPU": 1.0, "accelerator_type:T4": 1.0}


def _config(*overrides):
    return load_config(None, list(overrides))


# --- which device a replica or worker computes on ----------------------------------------------------


def test_no_gpu_assigned_is_the_cpu():
    assert assigned_device([]) == torch.device("cpu")
    assert assigned_device([0], accelerator="cpu", cuda_available=True) == torch.device("cpu")


@pytest.mark.parametrize(
    ("gpu_ids", "visible", "expected"),
    [
        ([2], "2,3", "cuda:0"),  # Ray narrowed CUDA_VISIBLE_DEVICES to this actor's GPUs
        ([3], "2,3", "cuda:1"),  # a second actor sharing the same visible list
        (["5"], "5", "cuda:0"),  # ids may come back as strings
        ([1], None, "cuda:1"),  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: torch numbers every GPU
    ],
)
def test_assigned_gpu_maps_to_torchs_numbering(gpu_ids, visible, expected):
    device = assigned_device(gpu_ids, cuda_available=True, visible_devices=visible)
    assert device == torch.device(expected)


def test_assigned_gpu_without_cuda_torch_names_the_fix():
    with pytest.raises(DeviceError, match=r"GPU \[0\].*CUDA build of torch.*gpus_per_worker=0"):
        assigned_device([0], cuda_available=False, visible_devices="0")


def test_accelerator_gpu_without_an_assigned_gpu_names_the_fix():
    with pytest.raises(DeviceError, match=r"resources\.gpus_per_worker to 1"):
        assigned_device([], accelerator="gpu")


def test_local_device_follows_the_config():
    assert local_device("auto", 0) == torch.device("cpu")
    assert local_device("cpu", 0) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="gpus_per_worker=1 but this process sees no CUDA GPU"):
            local_device("gpu", 1)


def test_cpu_memory_figures_are_the_process_rss():
    stats = memory_stats("cpu")
    assert stats["device"] == "cpu" and describe_device("cpu") == "cpu"
    assert 0 < stats["rss_bytes"] <= stats["peak_rss_bytes"]


# --- what a config asks of the cluster ---------------------------------------------------------------


def test_effective_gpus_per_worker():
    assert _config().resources.gpus == 0
    assert _config("resources.accelerator=gpu").resources.gpus == 1  # a GPU run names no count: one each
    assert _config("resources.gpus_per_worker=2").resources.gpus == 2


@pytest.mark.parametrize("role", ["training", "serving"])
def test_a_cpu_config_fits_a_cpu_cluster(role):
    assert resource_errors(_config(), [CPU_NODE], role) == []


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["resources.gpus_per_worker=1"], "resources.gpus_per_worker"),
        (["resources.accelerator=gpu"], "resources.accelerator"),
    ],
)
def test_a_gpu_config_on_a_cluster_without_gpus(overrides, field):
    (issue,) = resource_errors(_config(*overrides), [CPU_NODE, CPU_NODE], "training")
    assert issue.path == field
    assert "the Ray cluster has none" in issue.message and "resources.gpus_per_worker=0" in issue.message


def test_more_gpus_per_worker_than_a_node_has():
    (issue,) = resource_errors(_config("resources.gpus_per_worker=16"), [GPU_NODE, GPU_NODE], "serving")
    assert "needs 16 GPUs on one node, but the largest node has 8" in issue.message
    assert "at most 8" in issue.message


def test_more_cpus_per_worker_than_a_node_has():
    (issue,) = resource_errors(_config("resources.cpus_per_worker=4"), [CPU_NODE], "training")
    assert issue.path == "resources.cpus_per_worker" and "largest node has 2 CPUs" in issue.message


def test_fractional_gpus_cannot_share_one_gpu_between_nccl_ranks():
    config = _config("resources.gpus_per_worker=0.5", "parallelism.num_workers=2")
    (issue,) = resource_errors(config, [GPU_NODE], "training")
    assert "nccl needs a GPU of its own per rank" in issue.message
    assert resource_errors(config, [GPU_NODE], "serving") == []  # replicas may share a GPU


def test_bf16_on_gpus_without_bf16_units():
    (issue,) = resource_errors(
        _config("resources.gpus_per_worker=1", "precision=bf16"), [T4_NODE], "training"
    )
    assert issue.path == "precision" and "(T4) have no bf16 units" in issue.message
    serving = _config("resources.gpus_per_worker=1", "serving.precision=bf16")
    (issue,) = resource_errors(serving, [T4_NODE], "serving")
    assert issue.path == "serving.precision"
    assert (
        resource_errors(_config("resources.gpus_per_worker=1", "precision=bf16"), [GPU_NODE], "training")
        == []
    )
    assert not gpus_have_bf16([T4_NODE]) and gpus_have_bf16([GPU_NODE]) and gpus_have_bf16([{"GPU": 1.0}])


def test_check_resources_reports_every_problem_at_once():
    config = _config("resources.gpus_per_worker=1", "resources.cpus_per_worker=8")
    with pytest.raises(ConfigError) as caught:
        check_resources(config, "training", [CPU_NODE])
    assert [i.path for i in caught.value.issues] == ["resources.gpus_per_worker", "resources.cpus_per_worker"]
