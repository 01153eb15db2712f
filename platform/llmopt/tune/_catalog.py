"""GPU hardware profiles and published fine-tuning measurements, shipped as package data.

Two YAML files under `llmopt/tune/data/` (read through `importlib.resources`, so they work from a wheel):

* `gpus.yaml`: one profile per common training GPU (H100 SXM/PCIe, H200, A100 40/80GB, L4, A10G, T4) with
  memory, memory bandwidth, dense peak FLOP/s per precision, interconnect and vendor source. Look one up
  with `gpu_profile("h100")`, or parse a hardware string with `parse_hardware("8xH100")`.
* `published_finetuning.yaml`: public measurements of fine-tuning runs (peak GPU memory, throughput) with
  the full setup and a verbatim quote of the source, for holding the cost model to published numbers.

The conventions of both files (dense vs sparse FLOP/s, GB vs GiB, per-GPU vs total memory) are written at
the top of each file; the dataclasses below carry the values unchanged and add the conversions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from types import SimpleNamespace
from typing import Any, Literal

import yaml

_PACKAGE = "llmopt.tune"
_GPUS_FILE = "data/gpus.yaml"
_MEASUREMENTS_FILE = "data/published_finetuning.yaml"

# precision name (as the config / torch spells it) -> PeakFlops field
_DTYPE_FIELDS = {
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "tf32": "tf32",
    "tensorfloat32": "tf32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "fp8": "fp8",
    "float8": "fp8",
    "int8": "int8",
}
_MEMORY_UNITS = {"GB": 10**9, "GiB": 2**30}


class CatalogError(ValueError):
    """A data file does not follow its schema (names the file, the entry and the field)."""


class UnknownNameError(KeyError):
    """A GPU or measurement name that is not in the catalog (the message lists what is)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# --- GPU profiles --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeakFlops:
    """Dense peak rates in FLOP/s (int8 in ops/s); None where the GPU has no such datapath."""

    fp32: float
    tf32: float | None
    bf16: float | None
    fp16: float
    fp8: float | None
    int8: float | None

    def for_dtype(self, dtype: str) -> float:
        """Peak for a precision name (`bf16`, `bfloat16`, `float32`, `tf32`, `fp16`, `fp8`, `int8`, ...).

        Raises:
            ValueError: for an unknown name, or a precision this GPU cannot run on its matrix units.
        """
        field = _DTYPE_FIELDS.get(str(dtype).lower().removeprefix("torch."))
        if field is None:
            raise ValueError(f"unknown precision {dtype!r}; expected one of {sorted(set(_DTYPE_FIELDS))}")
        value = getattr(self, field)
        if value is None:
            raise ValueError(f"this GPU has no {field} support (no published peak for {dtype!r})")
        return value


@dataclass(frozen=True)
class Link:
    """A GPU link: `kind` nvlink or pcie, `generation` as the vendor names it, bandwidth per GPU.

    `bandwidth_bytes_per_s` is the vendor's figure, which counts both directions together.
    """

    kind: Literal["nvlink", "pcie"]
    generation: str
    bandwidth_bytes_per_s: float

    @property
    def unidirectional_bytes_per_s(self) -> float:
        """Bandwidth in one direction (half the vendor's bidirectional figure), for collective timing."""
        return self.bandwidth_bytes_per_s / 2


@dataclass(frozen=True)
class Source:
    """Where a figure comes from: a title, a URL, the quoted passage and where that passage was found."""

    title: str
    url: str
    quote: str
    quote_from: str = ""
    locator: str = ""
    context: str = ""
    date: str = ""


@dataclass(frozen=True)
class GpuProfile:
    """One GPU model, from `gpus.yaml` (see that file's header for units and conventions).

    Attributes:
        key: Canonical name, e.g. `h100-sxm-80gb`.
        name: Human name.
        aliases: Other accepted names (matched case-insensitively, ignoring spaces, `-` and `_`).
        device_names: `torch.cuda.get_device_name()` / nvidia-smi names of the part.
        memory_marketed: Capacity as the vendor writes it ("80GB").
        memory_bytes: That capacity read as binary GiB.
        memory_reported_mib: Memory the driver reports (nvidia-smi memory.total), what can be allocated from.
        memory_bandwidth_bytes_per_s: Peak memory bandwidth (decimal prefixes, as the vendor quotes it).
        peak_flops: Dense peaks per precision.
        intra_node: GPU-to-GPU link inside a server; host_link: GPU-to-CPU link.
        nvlink_bridge_bytes_per_s: Optional bridge between pairs of PCIe cards (H100 PCIe), else None.
        max_gpus_per_node: Usual maximum per server / cloud instance.
        derived_fields: Values derived rather than printed in the source (e.g. `peak_flops.int8`).
    """

    key: str
    name: str
    aliases: tuple[str, ...]
    device_names: tuple[str, ...]
    architecture: str
    compute_capability: str
    memory_marketed: str
    memory_type: str
    memory_bytes: int
    memory_reported_mib: int
    memory_bandwidth_bytes_per_s: float
    peak_flops: PeakFlops
    bf16_supported: bool
    tf32_supported: bool
    fp8_supported: bool
    intra_node: Link
    host_link: Link
    nvlink_bridge_bytes_per_s: float | None
    max_gpus_per_node: int
    tdp_watts: float
    derived_fields: tuple[str, ...]
    source: Source
    notes: str = ""

    @property
    def usable_memory_bytes(self) -> int:
        """Memory the driver exposes (memory_reported_mib), the budget a training process has at most."""
        return self.memory_reported_mib * 2**20

    def peak_flops_for(self, dtype: str) -> float:
        """Dense matrix peak for a precision name; see `PeakFlops.for_dtype`."""
        return self.peak_flops.for_dtype(dtype)

    @property
    def names(self) -> tuple[str, ...]:
        """Every name this profile answers to: key, name, aliases and device names."""
        return (self.key, self.name, *self.aliases, *self.device_names)


def _normalize(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _overlaps(query: str, name: str) -> bool:
    """Whether a normalized query and name contain one another (for "did you mean" hints)."""
    return min(len(query), len(name)) > 1 and (query in name or name in query)


def _read(filename: str) -> Any:
    text = resources.files(_PACKAGE).joinpath(filename).read_text(encoding="utf-8")
    return yaml.safe_load(text)


class _Fields:
    """Typed access to one YAML mapping, with errors that name the file, the entry and the field."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise CatalogError(f"{where}: expected a mapping, got {type(data).__name__}")
        self.data, self.where = data, where

    def _get(self, key: str) -> Any:
        if key not in self.data:
            raise CatalogError(f"{self.where}: missing field {key!r}")
        return self.data[key]

    def text(self, key: str, *, optional: bool = False, default: str = "") -> str:
        if optional and self.data.get(key) is None:
            return default
        value = self._get(key)
        if not isinstance(value, str) or not value.strip():
            raise CatalogError(f"{self.where}: {key!r} must be a non-empty string, got {value!r}")
        return value.strip()

    def maybe_text(self, key: str) -> str | None:
        value = self._get(key)
        return None if value is None else self.text(key)

    def number(self, key: str, *, positive: bool = True) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CatalogError(f"{self.where}: {key!r} must be a number, got {value!r}")
        if positive and value <= 0:
            raise CatalogError(f"{self.where}: {key!r} must be positive, got {value!r}")
        return value

    def maybe_number(self, key: str) -> float | None:
        return None if self.data.get(key) is None else self.number(key)

    def integer(self, key: str) -> int:
        value = self.number(key)
        if not isinstance(value, int):
            raise CatalogError(f"{self.where}: {key!r} must be an integer, got {value!r}")
        return value

    def maybe_integer(self, key: str) -> int | None:
        return None if self.data.get(key) is None else self.integer(key)

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise CatalogError(f"{self.where}: {key!r} must be true or false, got {value!r}")
        return value

    def maybe_flag(self, key: str) -> bool | None:
        return None if self._get(key) is None else self.flag(key)

    def strs(self, key: str) -> tuple[str, ...]:
        value = self._get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise CatalogError(f"{self.where}: {key!r} must be a list of strings, got {value!r}")
        return tuple(v.strip() for v in value)

    def sub(self, key: str) -> _Fields:
        return _Fields(self._get(key), f"{self.where}.{key}")

    def maybe_sub(self, key: str) -> _Fields | None:
        return None if self._get(key) is None else self.sub(key)

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.text(key)
        if value not in choices:
            raise CatalogError(f"{self.where}: {key!r} must be one of {list(choices)}, got {value!r}")
        return value


def _source(f: _Fields) -> Source:
    url = f.text("url")
    if not url.startswith(("https://", "http://")):
        raise CatalogError(f"{f.where}: 'url' must be an http(s) URL, got {url!r}")
    return Source(
        title=f.text("title"),
        url=url,
        quote=f.text("quote"),
        quote_from=f.text("quote_from", optional=True),
        locator=f.text("locator", optional=True),
        context=f.text("context", optional=True),
        date=str(f.data.get("date") or ""),
    )


def _link(f: _Fields) -> Link:
    return Link(
        kind=f.choice("kind", ("nvlink", "pcie")),  # type: ignore[arg-type]
        generation=f.text("generation"),
        bandwidth_bytes_per_s=f.number("bandwidth_bytes_per_s"),
    )


def _gpu(entry: Any, index: int) -> GpuProfile:
    f = _Fields(entry, f"{_GPUS_FILE}: gpus[{index}]")
    f.where = f"{_GPUS_FILE}: gpu {f.text('key')!r}"
    flops = f.sub("peak_flops")
    peak = PeakFlops(
        fp32=flops.number("fp32"),
        tf32=flops.maybe_number("tf32"),
        bf16=flops.maybe_number("bf16"),
        fp16=flops.number("fp16"),
        fp8=flops.maybe_number("fp8"),
        int8=flops.maybe_number("int8"),
    )
    links = f.sub("interconnect")
    profile = GpuProfile(
        key=f.text("key"),
        name=f.text("name"),
        aliases=f.strs("aliases"),
        device_names=f.strs("device_names"),
        architecture=f.text("architecture"),
        compute_capability=f.text("compute_capability"),
        memory_marketed=f.text("memory_marketed"),
        memory_type=f.text("memory_type"),
        memory_bytes=f.integer("memory_bytes"),
        memory_reported_mib=f.integer("memory_reported_mib"),
        memory_bandwidth_bytes_per_s=f.number("memory_bandwidth_bytes_per_s"),
        peak_flops=peak,
        bf16_supported=f.flag("bf16_supported"),
        tf32_supported=f.flag("tf32_supported"),
        fp8_supported=f.flag("fp8_supported"),
        intra_node=_link(links.sub("intra_node")),
        host_link=_link(links.sub("host")),
        nvlink_bridge_bytes_per_s=links.maybe_number("nvlink_bridge_bytes_per_s"),
        max_gpus_per_node=f.integer("max_gpus_per_node"),
        tdp_watts=f.number("tdp_watts"),
        derived_fields=f.strs("derived_fields"),
        source=_source(f.sub("source")),
        notes=f.text("notes", optional=True),
    )
    for flag, field in (("bf16_supported", "bf16"), ("tf32_supported", "tf32"), ("fp8_supported", "fp8")):
        if getattr(profile, flag) != (getattr(peak, field) is not None):
            raise CatalogError(f"{f.where}: {flag} disagrees with peak_flops.{field}")
    return profile


@cache
def _gpu_table() -> tuple[dict[str, GpuProfile], dict[str, str]]:
    data = _read(_GPUS_FILE)
    entries = data.get("gpus") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise CatalogError(f"{_GPUS_FILE}: expected a non-empty list under 'gpus'")
    profiles: dict[str, GpuProfile] = {}
    index: dict[str, str] = {}
    for i, entry in enumerate(entries):
        profile = _gpu(entry, i)
        if profile.key in profiles:
            raise CatalogError(f"{_GPUS_FILE}: duplicate GPU key {profile.key!r}")
        profiles[profile.key] = profile
        for name in profile.names:
            norm = _normalize(name)
            if index.setdefault(norm, profile.key) != profile.key:
                raise CatalogError(
                    f"{_GPUS_FILE}: name {name!r} matches both {index[norm]!r} and {profile.key!r}"
                )
    return profiles, index


def gpu_profiles() -> dict[str, GpuProfile]:
    """All GPU profiles, keyed by canonical key, in the order of `gpus.yaml`."""
    return dict(_gpu_table()[0])


def _known_gpus() -> str:
    return ", ".join(f"{p.key} ({', '.join(p.aliases[:2])})" for p in _gpu_table()[0].values())


def gpu_profile(name_or_alias: str) -> GpuProfile:
    """The profile of a GPU named by key, alias or device name, e.g. `H100`, `a100-80gb`, `NVIDIA L4`.

    Matching ignores case, spaces, `-` and `_`, and a leading `NVIDIA` / `Tesla`.

    Raises:
        KeyError: naming the close matches (e.g. both A100s for a bare "A100") and all known GPUs.
    """
    profiles, index = _gpu_table()
    norm = _normalize(str(name_or_alias))
    for candidate in (norm, norm.removeprefix("nvidia"), norm.removeprefix("tesla")):
        if candidate and candidate in index:
            return profiles[index[candidate]]
    stripped = norm.removeprefix("nvidia").removeprefix("tesla")
    close = sorted({key for n, key in index.items() if _overlaps(stripped, n)})
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise UnknownNameError(f"unknown GPU {name_or_alias!r}{hint} Known GPUs: {_known_gpus()}")


_HARDWARE = re.compile(r"^\s*(?:(\d+)\s*(?:[xX×*]\s*|\s+))?([A-Za-z].*?)\s*$")


def parse_hardware(text: str) -> tuple[int, GpuProfile]:
    """Parse `8xH100`, `4xL4`, `H200` (one GPU), `2x a100-80gb` or `8 x H100` into (count, profile).

    Raises:
        ValueError: for text that is not COUNTxGPU or GPU, or a count below 1.
        KeyError: for an unknown GPU name (see `gpu_profile`).
    """
    match = _HARDWARE.match(str(text))
    if not match:
        raise ValueError(
            f"hardware {text!r} is not understood; write COUNTxGPU or GPU, e.g. 8xH100, 4xL4, H200 or "
            f"2x a100-80gb. Known GPUs: {_known_gpus()}"
        )
    count = int(match.group(1)) if match.group(1) is not None else 1
    if count < 1:
        raise ValueError(f"hardware {text!r}: the GPU count must be at least 1, got {count}")
    return count, gpu_profile(match.group(2))


# --- published measurements ----------------------------------------------------------------------------
@dataclass(frozen=True)
class PublishedModel:
    """A model's config.json dimensions (intermediate_size in the llama gated-MLP convention)."""

    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    dims_note: str = ""

    def hf_config(self) -> SimpleNamespace:
        """A transformers-config-like object, e.g. for `ModelShape.from_hf_config`."""
        return SimpleNamespace(
            model_type=self.model_type,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            vocab_size=self.vocab_size,
            tie_word_embeddings=False,
        )


@dataclass(frozen=True)
class LoraSpec:
    """LoRA settings as far as the source states them (None / empty when not stated)."""

    rank: int | None
    alpha: float | None
    targets: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    trainable_params: int | None
    note: str = ""
    dropout: float | None = None  # on the adapters' inputs


@dataclass(frozen=True)
class MemoryFigure:
    """A published peak-memory figure: `value` in `unit`, for one GPU or summed over all GPUs of the run."""

    value: float
    unit: Literal["GB", "GiB"]
    unit_as_published: str
    per: Literal["gpu", "all_gpus"]
    metric: str
    bound: Literal["measured", "upper_bound"]
    metric_note: str = ""

    @property
    def bytes(self) -> float:
        return self.value * _MEMORY_UNITS[self.unit]


@dataclass(frozen=True)
class ThroughputFigure:
    """A published speed figure (`published` as written) and the numbers it gives or implies.

    tokens_per_step / tokens_per_epoch count the tokens of all GPUs together.
    """

    published: str
    tokens_per_s: float | None
    tokens_per_s_scope: Literal["gpu", "all_gpus"] | None
    seconds_per_step: float | None
    step_kind: Literal["optimizer_step", "micro_batch"] | None
    tokens_per_step: int | None
    seconds_per_epoch: float | None
    tokens_per_epoch: int | None
    derivation: str = ""


@dataclass(frozen=True)
class PublishedMeasurement:
    """One published fine-tuning run: setup, figures and source (see published_finetuning.yaml's header)."""

    id: str
    source: Source
    model: PublishedModel
    method: Literal["full", "lora", "qlora"]
    lora: LoraSpec | None
    precision: str | None
    quantization: str | None
    optimizer: str | None
    parallelism: Literal["single-gpu", "ddp", "fsdp", "deepspeed"]
    zero_stage: int | None
    offload: str | None
    gradient_checkpointing: bool | None
    flash_attention: bool | None
    micro_batch_size: int | None
    gradient_accumulation_steps: int | None
    seq_len: int | None
    seq_len_note: str
    gpu: str
    gpu_profile: str | None
    gpu_profile_inferred: bool
    gpu_count: int
    gpus_per_node: int
    peak_memory: MemoryFigure | None
    throughput: ThroughputFigure | None
    notes: str = ""

    @property
    def peak_memory_bytes_per_gpu(self) -> float | None:
        """Published peak memory of one GPU in bytes (a total over GPUs is divided by gpu_count)."""
        if self.peak_memory is None:
            return None
        total = self.peak_memory.bytes
        return total / self.gpu_count if self.peak_memory.per == "all_gpus" else total

    @property
    def tokens_per_s_all_gpus(self) -> float | None:
        """Training throughput over all GPUs: published, or derived from step / epoch time and tokens."""
        tp = self.throughput
        if tp is None:
            return None
        if tp.tokens_per_s is not None:
            return tp.tokens_per_s * (self.gpu_count if tp.tokens_per_s_scope == "gpu" else 1)
        if tp.tokens_per_step is not None and tp.seconds_per_step is not None:
            return tp.tokens_per_step / tp.seconds_per_step
        if tp.tokens_per_epoch is not None and tp.seconds_per_epoch is not None:
            return tp.tokens_per_epoch / tp.seconds_per_epoch
        return None

    def gpu_profile_or_none(self) -> GpuProfile | None:
        """The `gpus.yaml` profile of the GPU the run used, if it is in the catalog."""
        return None if self.gpu_profile is None else gpu_profile(self.gpu_profile)


def _model(f: _Fields) -> PublishedModel:
    return PublishedModel(
        name=f.text("name"),
        model_type=f.text("model_type"),
        hidden_size=f.integer("hidden_size"),
        intermediate_size=f.integer("intermediate_size"),
        num_hidden_layers=f.integer("num_hidden_layers"),
        num_attention_heads=f.integer("num_attention_heads"),
        num_key_value_heads=f.integer("num_key_value_heads"),
        vocab_size=f.integer("vocab_size"),
        dims_note=f.text("dims_note", optional=True),
    )


def _lora(f: _Fields) -> LoraSpec:
    return LoraSpec(
        rank=f.maybe_integer("rank"),
        alpha=f.maybe_number("alpha"),
        targets=f.strs("targets"),
        modules_to_save=f.strs("modules_to_save"),
        trainable_params=f.maybe_integer("trainable_params"),
        note=f.text("note", optional=True),
        dropout=f.maybe_number("dropout"),
    )


def _memory(f: _Fields) -> MemoryFigure:
    return MemoryFigure(
        value=f.number("value"),
        unit=f.choice("unit", tuple(_MEMORY_UNITS)),  # type: ignore[arg-type]
        unit_as_published=f.text("unit_as_published"),
        per=f.choice("per", ("gpu", "all_gpus")),  # type: ignore[arg-type]
        metric=f.text("metric"),
        bound=f.choice("bound", ("measured", "upper_bound")),  # type: ignore[arg-type]
        metric_note=f.text("metric_note", optional=True),
    )


def _throughput(f: _Fields) -> ThroughputFigure:
    scope = f.maybe_text("tokens_per_s_scope")
    step_kind = f.maybe_text("step_kind")
    if scope not in (None, "gpu", "all_gpus"):
        raise CatalogError(f"{f.where}: 'tokens_per_s_scope' must be gpu, all_gpus or null, got {scope!r}")
    if step_kind not in (None, "optimizer_step", "micro_batch"):
        raise CatalogError(f"{f.where}: 'step_kind' must be optimizer_step, micro_batch or null")
    figure = ThroughputFigure(
        published=str(f._get("published")).strip(),
        tokens_per_s=f.maybe_number("tokens_per_s"),
        tokens_per_s_scope=scope,  # type: ignore[arg-type]
        seconds_per_step=f.maybe_number("seconds_per_step"),
        step_kind=step_kind,  # type: ignore[arg-type]
        tokens_per_step=f.maybe_integer("tokens_per_step"),
        seconds_per_epoch=f.maybe_number("seconds_per_epoch"),
        tokens_per_epoch=f.maybe_integer("tokens_per_epoch"),
        derivation=f.text("derivation", optional=True),
    )
    if not figure.published:
        raise CatalogError(f"{f.where}: 'published' must be the figure as written in the source")
    if figure.tokens_per_s is not None and figure.tokens_per_s_scope is None:
        raise CatalogError(f"{f.where}: tokens_per_s needs tokens_per_s_scope (gpu or all_gpus)")
    return figure


def _measurement(entry: Any, index: int) -> PublishedMeasurement:
    f = _Fields(entry, f"{_MEASUREMENTS_FILE}: measurements[{index}]")
    f.where = f"{_MEASUREMENTS_FILE}: measurement {f.text('id')!r}"
    method = f.choice("method", ("full", "lora", "qlora"))
    lora = f.maybe_sub("lora")
    if method != "full" and lora is None:
        raise CatalogError(f"{f.where}: a {method} run needs a 'lora' mapping (fields may be null)")
    memory, throughput = f.maybe_sub("peak_memory"), f.maybe_sub("throughput")
    if memory is None and throughput is None:
        raise CatalogError(f"{f.where}: needs peak_memory or throughput (or both)")
    gpu_key = f.maybe_text("gpu_profile")
    if gpu_key is not None and gpu_key not in _gpu_table()[0]:
        raise CatalogError(f"{f.where}: gpu_profile {gpu_key!r} is not a key of {_GPUS_FILE}")
    zero = f.data.get("zero_stage")
    if zero is not None and zero not in (0, 1, 2, 3):
        raise CatalogError(f"{f.where}: 'zero_stage' must be 0-3 or null, got {zero!r}")
    return PublishedMeasurement(
        id=f.text("id"),
        source=_source(f.sub("source")),
        model=_model(f.sub("model")),
        method=method,  # type: ignore[arg-type]
        lora=None if lora is None else _lora(lora),
        precision=f.maybe_text("precision"),
        quantization=f.maybe_text("quantization"),
        optimizer=f.maybe_text("optimizer"),
        parallelism=f.choice("parallelism", ("single-gpu", "ddp", "fsdp", "deepspeed")),  # type: ignore[arg-type]
        zero_stage=zero,
        offload=f.maybe_text("offload"),
        gradient_checkpointing=f.maybe_flag("gradient_checkpointing"),
        flash_attention=f.maybe_flag("flash_attention"),
        micro_batch_size=f.maybe_integer("micro_batch_size"),
        gradient_accumulation_steps=f.maybe_integer("gradient_accumulation_steps"),
        seq_len=f.maybe_integer("seq_len"),
        seq_len_note=f.text("seq_len_note", optional=True),
        gpu=f.text("gpu"),
        gpu_profile=gpu_key,
        gpu_profile_inferred=f.flag("gpu_profile_inferred"),
        gpu_count=f.integer("gpu_count"),
        gpus_per_node=f.integer("gpus_per_node"),
        peak_memory=None if memory is None else _memory(memory),
        throughput=None if throughput is None else _throughput(throughput),
        notes=f.text("notes", optional=True),
    )


@cache
def _measurement_table() -> tuple[PublishedMeasurement, ...]:
    data = _read(_MEASUREMENTS_FILE)
    entries = data.get("measurements") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise CatalogError(f"{_MEASUREMENTS_FILE}: expected a non-empty list under 'measurements'")
    rows = tuple(_measurement(entry, i) for i, entry in enumerate(entries))
    seen: set[str] = set()
    for row in rows:
        if row.id in seen:
            raise CatalogError(f"{_MEASUREMENTS_FILE}: duplicate measurement id {row.id!r}")
        seen.add(row.id)
    return rows


def published_measurements() -> list[PublishedMeasurement]:
    """All rows of `published_finetuning.yaml`, in file order."""
    return list(_measurement_table())


def published_measurement(measurement_id: str) -> PublishedMeasurement:
    """One row by id.

    Raises:
        KeyError: naming the known ids.
    """
    for row in _measurement_table():
        if row.id == measurement_id:
            return row
    known = ", ".join(row.id for row in _measurement_table())
    raise UnknownNameError(f"unknown published measurement {measurement_id!r}; known: {known}")
