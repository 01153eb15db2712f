"""llmopt.tune._catalog: GPU profiles and published fine-tuning measurements shipped as package data."""

import re
from importlib import resources

import pytest

from llmopt.tune import ModelShape
from llmopt.tune import _catalog as catalog
from llmopt.tune._catalog import (
    CatalogError,
    GpuProfile,
    gpu_profile,
    gpu_profiles,
    parse_hardware,
    published_measurement,
    published_measurements,
)

GIB = 2**30
REQUIRED = {
    "H100": "h100-sxm-80gb",
    "H100 PCIe": "h100-pcie-80gb",
    "H200": "h200-sxm-141gb",
    "A100 40GB": "a100-sxm-40gb",
    "A100 80GB": "a100-sxm-80gb",
    "L4": "l4-24gb",
    "A10G": "a10g-24gb",
    "T4": "t4-16gb",
}


@pytest.fixture
def fresh_catalog():
    """Clear the loaders' caches around a test that swaps the data."""
    catalog._gpu_table.cache_clear()
    catalog._measurement_table.cache_clear()
    yield
    catalog._gpu_table.cache_clear()
    catalog._measurement_table.cache_clear()


# --- package data ----------------------------------------------------------------------------------------
def test_data_files_are_package_resources():
    data = resources.files("llmopt.tune").joinpath("data")
    assert data.joinpath("gpus.yaml").is_file()
    assert data.joinpath("published_finetuning.yaml").is_file()


# --- GPU profiles ---------------------------------------------------------------------------------------
def test_the_required_gpus_are_present():
    profiles = gpu_profiles()
    assert set(REQUIRED.values()) <= set(profiles)
    for name, key in REQUIRED.items():
        assert gpu_profile(name).key == key


@pytest.mark.parametrize("profile", list(gpu_profiles().values()), ids=lambda p: p.key)
def test_gpu_profile_fields_are_complete_and_consistent(profile: GpuProfile):
    assert profile.name and profile.aliases and profile.device_names and profile.architecture
    assert re.fullmatch(r"\d+\.\d", profile.compute_capability)
    # Capacity: the marketed figure read as GiB, and what the driver exposes a little below it.
    marketed = float(re.fullmatch(r"(\d+)GB", profile.memory_marketed).group(1))
    assert profile.memory_bytes == marketed * GIB
    assert 0.9 * profile.memory_bytes < profile.usable_memory_bytes <= profile.memory_bytes
    assert 1e11 <= profile.memory_bandwidth_bytes_per_s <= 1e13
    flops = profile.peak_flops
    assert flops.fp32 > 0 and flops.fp16 >= flops.fp32
    for name in ("tf32", "bf16", "fp8"):
        value = getattr(flops, name)
        assert getattr(profile, f"{name}_supported") == (value is not None)
        if value is not None:
            assert value >= flops.fp32, name
    if flops.bf16 is not None:
        assert flops.bf16 == flops.fp16
        assert flops.tf32 is not None and flops.tf32 == pytest.approx(flops.bf16 / 2, rel=0.01)
    if flops.int8 is not None:
        assert flops.int8 == pytest.approx(2 * flops.fp16, rel=0.01)
    # Machine balance of a training GPU: tens to hundreds of FLOPs per byte of memory traffic.
    assert 50 <= flops.fp16 / profile.memory_bandwidth_bytes_per_s <= 1000
    assert profile.intra_node.bandwidth_bytes_per_s >= profile.host_link.bandwidth_bytes_per_s > 0
    assert profile.intra_node.unidirectional_bytes_per_s == profile.intra_node.bandwidth_bytes_per_s / 2
    assert profile.host_link.kind == "pcie"
    assert 1 <= profile.max_gpus_per_node <= 16 and profile.tdp_watts > 0
    for field in profile.derived_fields:
        obj = profile
        for part in field.split("."):
            obj = getattr(obj, part)
        assert obj is not None, field
    assert profile.source.url.startswith("https://") and profile.source.title and profile.source.quote


def test_peak_flops_are_dense_halves_of_the_datasheets_sparse_figures():
    # NVIDIA prints tensor-core rows with sparsity (*); the catalog keeps half of them.
    h100 = gpu_profile("H100")
    assert h100.peak_flops.bf16 == 1979e12 / 2 and h100.peak_flops.fp32 == 67e12
    assert gpu_profile("H100 PCIe").peak_flops.bf16 == 1513e12 / 2
    assert gpu_profile("H200").peak_flops == h100.peak_flops
    assert gpu_profile("A100 40GB").peak_flops.bf16 == 312e12 == gpu_profile("A100 80GB").peak_flops.bf16
    assert gpu_profile("L4").peak_flops.bf16 == 242e12 / 2
    assert gpu_profile("A10G").peak_flops.bf16 == 70e12  # not the A10's 125
    assert gpu_profile("T4").peak_flops.fp16 == 65e12  # Turing: no sparsity, printed figure is dense


def test_memory_and_links_of_known_parts():
    assert gpu_profile("H100").memory_bytes == 80 * GIB
    assert gpu_profile("H100").usable_memory_bytes == 81559 * 2**20
    assert gpu_profile("A100 80GB").usable_memory_bytes == 80 * GIB
    assert gpu_profile("H200").memory_bandwidth_bytes_per_s == 4.8e12
    assert gpu_profile("A100 40GB").memory_bandwidth_bytes_per_s == 1.555e12
    assert gpu_profile("H100").intra_node.kind == "nvlink"
    assert gpu_profile("H100").intra_node.bandwidth_bytes_per_s == 900e9
    assert gpu_profile("A100 80GB").intra_node.bandwidth_bytes_per_s == 600e9
    assert gpu_profile("H100 PCIe").intra_node.kind == "pcie"
    assert gpu_profile("H100 PCIe").nvlink_bridge_bytes_per_s == 600e9
    for name in ("L4", "A10G", "T4"):
        assert (
            gpu_profile(name).intra_node.kind == "pcie"
            and gpu_profile(name).nvlink_bridge_bytes_per_s is None
        )


def test_t4_has_no_bf16():
    t4 = gpu_profile("T4")
    assert not t4.bf16_supported and t4.peak_flops.bf16 is None and t4.peak_flops.tf32 is None
    with pytest.raises(ValueError, match="no bf16 support"):
        t4.peak_flops_for("bfloat16")
    assert t4.peak_flops_for("float16") == 65e12
    assert gpu_profile("H100").peak_flops_for("torch.bfloat16") == 989.5e12
    with pytest.raises(ValueError, match="unknown precision 'fp64'"):
        t4.peak_flops_for("fp64")


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("h100", "h100-sxm-80gb"),
        ("H100_SXM", "h100-sxm-80gb"),
        ("NVIDIA H100 80GB HBM3", "h100-sxm-80gb"),  # torch.cuda.get_device_name()
        ("nvidia h100 pcie", "h100-pcie-80gb"),
        ("NVIDIA H200", "h200-sxm-141gb"),
        ("a100-80gb", "a100-sxm-80gb"),
        ("A100_40GB", "a100-sxm-40gb"),
        ("NVIDIA A100-SXM4-40GB", "a100-sxm-40gb"),
        ("nvidia-l4", "l4-24gb"),
        ("NVIDIA A10G", "a10g-24gb"),
        ("tesla t4", "t4-16gb"),
        ("Tesla T4", "t4-16gb"),
        ("l4-24gb", "l4-24gb"),
    ],
)
def test_gpu_lookup_by_alias_key_and_device_name(name, key):
    assert gpu_profile(name).key == key


def test_names_are_unique_across_gpus():
    owners: dict[str, str] = {}
    for profile in gpu_profiles().values():
        for name in profile.names:
            norm = re.sub(r"[^a-z0-9]", "", name.lower())
            assert owners.setdefault(norm, profile.key) == profile.key, name


def test_unknown_or_ambiguous_gpu_errors_name_the_candidates():
    with pytest.raises(KeyError, match=r"did you mean a100-sxm-40gb or a100-sxm-80gb\?"):
        gpu_profile("A100")
    with pytest.raises(KeyError, match=r"unknown GPU 'MI300X'.*Known GPUs: h100-sxm-80gb .*t4-16gb"):
        gpu_profile("MI300X")
    try:
        gpu_profile("MI300X")
    except KeyError as error:
        assert str(error).startswith("unknown GPU 'MI300X'")  # a readable message, not a repr


@pytest.mark.parametrize(
    ("text", "count", "key"),
    [
        ("8xH100", 8, "h100-sxm-80gb"),
        ("4xL4", 4, "l4-24gb"),
        ("H200", 1, "h200-sxm-141gb"),
        ("2x a100-80gb", 2, "a100-sxm-80gb"),
        ("8 x H100 PCIe", 8, "h100-pcie-80gb"),
        (" 16X A10G ", 16, "a10g-24gb"),
        ("1*T4", 1, "t4-16gb"),
        ("8 A100 40GB", 8, "a100-sxm-40gb"),
        ("NVIDIA A100-SXM4-80GB", 1, "a100-sxm-80gb"),
    ],
)
def test_parse_hardware(text, count, key):
    parsed_count, profile = parse_hardware(text)
    assert (parsed_count, profile.key) == (count, key)


@pytest.mark.parametrize("text", ["", "8x", "8", "  ", "-2xH100", "8x 4"])
def test_parse_hardware_rejects_malformed_text(text):
    with pytest.raises(ValueError, match=r"is not understood; write COUNTxGPU or GPU, e\.g\. 8xH100"):
        parse_hardware(text)


def test_parse_hardware_errors():
    with pytest.raises(ValueError, match="count must be at least 1, got 0"):
        parse_hardware("0xH100")
    with pytest.raises(KeyError, match="unknown GPU 'V100'"):
        parse_hardware("8xV100")
    with pytest.raises(KeyError, match="did you mean"):
        parse_hardware("4xA100")


def test_schema_errors_name_the_file_entry_and_field(monkeypatch, fresh_catalog):
    real = catalog._read("data/gpus.yaml")
    broken = {"gpus": [dict(real["gpus"][0])]}
    del broken["gpus"][0]["memory_bytes"]
    monkeypatch.setattr(catalog, "_read", lambda filename: broken)
    with pytest.raises(CatalogError, match=r"gpus\.yaml: gpu 'h100-sxm-80gb': missing field 'memory_bytes'"):
        gpu_profiles()

    catalog._gpu_table.cache_clear()
    broken["gpus"][0] = dict(real["gpus"][0], bf16_supported=False)
    with pytest.raises(CatalogError, match=r"bf16_supported disagrees with peak_flops\.bf16"):
        gpu_profiles()

    catalog._gpu_table.cache_clear()
    broken["gpus"] = [real["gpus"][0], dict(real["gpus"][1], aliases=["H100"])]
    with pytest.raises(CatalogError, match="name 'H100' matches both 'h100-sxm-80gb' and 'h100-pcie-80gb'"):
        gpu_profiles()


# --- published measurements -----------------------------------------------------------------------------
ROWS = published_measurements()


def _numbers(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*\.?\d*", text)]


def test_measurement_table_coverage():
    assert len(ROWS) >= 8
    assert len({row.id for row in ROWS}) == len(ROWS)
    assert {row.method for row in ROWS} == {"full", "lora", "qlora"}
    assert sum(row.peak_memory is not None for row in ROWS) >= 8
    assert sum(row.tokens_per_s_all_gpus is not None for row in ROWS) >= 8
    assert len({row.source.url for row in ROWS}) >= 5
    sizes = [ModelShape.from_hf_config(row.model.hf_config()).params for row in ROWS]
    assert min(sizes) > 6e9 and max(sizes) < 80e9
    assert any(size > 60e9 for size in sizes)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_measurement_row_schema(row):
    source = row.source
    assert source.url.startswith("https://") and source.title and source.locator and source.quote
    model = row.model
    assert model.hidden_size % model.num_attention_heads == 0
    assert model.num_attention_heads % model.num_key_value_heads == 0
    assert model.intermediate_size > model.hidden_size and model.vocab_size > 1000
    assert model.num_hidden_layers >= 24
    shape = ModelShape.from_hf_config(model.hf_config(), name=model.name)
    assert shape.head_dim == model.hidden_size // model.num_attention_heads
    assert (row.lora is None) == (row.method == "full")
    assert row.gpu_count >= 1 and row.gpu_count % row.gpus_per_node == 0
    if row.zero_stage is not None:
        assert row.parallelism == "deepspeed"
    if row.method == "qlora":
        assert row.quantization
    assert row.peak_memory is not None or row.throughput is not None
    if row.gpu_profile is not None:
        assert gpu_profile(row.gpu_profile).key == row.gpu_profile
    else:
        assert not row.gpu_profile_inferred


@pytest.mark.parametrize("row", [r for r in ROWS if r.peak_memory is not None], ids=lambda r: r.id)
def test_published_memory_is_quoted_and_fits_the_gpu(row):
    memory = row.peak_memory
    assert memory.value in _numbers(row.source.quote), "the figure must appear in the quoted passage"
    per_gpu = row.peak_memory_bytes_per_gpu
    assert per_gpu > 1e9
    if memory.per == "all_gpus":
        assert per_gpu == pytest.approx(memory.bytes / row.gpu_count)
        assert row.gpu_count > 1
    if row.gpu_profile is not None:
        assert per_gpu <= gpu_profile(row.gpu_profile).memory_bytes


@pytest.mark.parametrize("row", [r for r in ROWS if r.throughput is not None], ids=lambda r: r.id)
def test_published_throughput_is_quoted_and_physically_plausible(row):
    tp = row.throughput
    quote = " ".join(row.source.quote.split())
    assert " ".join(tp.published.split()) in quote, "published must be a substring of the quote"
    if tp.tokens_per_s is not None:
        assert tp.tokens_per_s in _numbers(row.source.quote)
    tokens_per_s = row.tokens_per_s_all_gpus
    if tokens_per_s is None or row.gpu_profile is None:
        return
    # Model FLOPs utilisation implied by the figure (6N per token for full fine-tuning, 4N for adapters,
    # no recompute or attention): well below the GPU's dense peak, and not absurdly low.
    shape = ModelShape.from_hf_config(row.model.hf_config())
    flops_per_token = (6 if row.method == "full" else 4) * shape.params
    dtype = "fp16" if (row.precision or "").startswith("fp16") else "bf16"
    peak = gpu_profile(row.gpu_profile).peak_flops_for(dtype)
    mfu = tokens_per_s / row.gpu_count * flops_per_token / peak
    assert 0.02 < mfu < 0.7, f"implied MFU {mfu:.2f}"


def test_derived_throughput():
    qwen = published_measurement("qwen-7b-lora-seq2048-1xa100-80gb")
    assert qwen.throughput.tokens_per_step == 8 * 2048
    assert qwen.tokens_per_s_all_gpus == pytest.approx(16384 / 5.2)
    ray = published_measurement("ray-template-llama2-7b-full-zero3-offload-16xa10g")
    assert ray.tokens_per_s_all_gpus == pytest.approx(3.5e6 / (14 * 60))
    assert ray.peak_memory is None and ray.peak_memory_bytes_per_gpu is None
    tune = published_measurement("torchtune-llama31-70b-lora-8xa100")
    assert tune.tokens_per_s_all_gpus == 3497
    assert tune.peak_memory_bytes_per_gpu == pytest.approx(27.6 * GIB)
    litgpt = published_measurement("litgpt-llama2-7b-lora-1xa100-40gb")
    assert litgpt.tokens_per_s_all_gpus is None and litgpt.throughput.seconds_per_step == pytest.approx(
        0.1416
    )


def test_total_memory_over_gpus_is_split_per_gpu():
    full = published_measurement("qwen-7b-full-zero2-seq1024-2xa100-80gb")
    assert full.peak_memory.per == "all_gpus" and full.gpu_count == 2
    assert full.peak_memory_bytes_per_gpu == pytest.approx(81.0e9)


def test_lora_trainable_counts_match_the_model_shape():
    # LitGPT publishes its exact trainable-parameter counts; llmopt's LoRA arithmetic must reproduce them.
    checked = 0
    for row in ROWS:
        lora = row.lora
        if lora is None or lora.trainable_params is None or row.model.model_type != "llama":
            continue
        shape = ModelShape.from_hf_config(row.model.hf_config())
        count = shape.lora_count({"target_modules": list(lora.targets)}, lora.rank)
        assert count.adapter_params == lora.trainable_params, row.id
        checked += 1
    assert checked >= 4


def test_measurement_lookup_errors():
    with pytest.raises(KeyError, match="unknown published measurement 'nope'; known: litgpt-llama2-7b"):
        published_measurement("nope")


def test_measurement_schema_errors(monkeypatch, fresh_catalog):
    real_read = catalog._read
    real = real_read("data/published_finetuning.yaml")
    row = dict(real["measurements"][0])

    def fake(rows):
        def read(filename):
            return (
                {"measurements": rows}
                if filename.endswith("published_finetuning.yaml")
                else real_read(filename)
            )

        return read

    monkeypatch.setattr(catalog, "_read", fake([dict(row, gpu_profile="v100-32gb")]))
    with pytest.raises(CatalogError, match=r"gpu_profile 'v100-32gb' is not a key of data/gpus\.yaml"):
        published_measurements()

    catalog._measurement_table.cache_clear()
    monkeypatch.setattr(catalog, "_read", fake([dict(row, method="prefix")]))
    with pytest.raises(CatalogError, match=r"'method' must be one of \['full', 'lora', 'qlora'\]"):
        published_measurements()

    catalog._measurement_table.cache_clear()
    monkeypatch.setattr(catalog, "_read", fake([dict(row, lora=None)]))
    with pytest.raises(CatalogError, match="a lora run needs a 'lora' mapping"):
        published_measurements()

    catalog._measurement_table.cache_clear()
    monkeypatch.setattr(catalog, "_read", fake([row, row]))
    with pytest.raises(CatalogError, match="duplicate measurement id 'litgpt-llama2-7b-lora-1xa100-40gb'"):
        published_measurements()
