"""The machine a strategy runs on (CPUs, host memory, GPUs), detected or described, and memory sizes.

"Memory" in llmopt.tune means what the training code reports as `peak_memory_bytes`
(`llmopt.train._metrics`): on a GPU, `torch.cuda.max_memory_allocated` of the worker; on a CPU-only
machine, the worker process's peak resident set size (ru_maxrss), which includes the Python runtime
and its libraries. Budgets, predictions and measurements all use that one definition.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from llmopt.config import format_bytes
from llmopt.config._resolve import GIB
from llmopt.runtime import available_cpus

_UNITS = {
    "": GIB,  # a bare number is GiB, like the schema's *_gb fields
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "ki": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gi": GIB,
    "gib": GIB,
    "t": 1000**4,
    "tb": 1000**4,
    "ti": 1024**4,
    "tib": 1024**4,
}


def parse_memory(text: str | float | int) -> int:
    """Parse a memory size such as `4GiB`, `512MB`, `1.5Gi` or `2` (GiB) into bytes.

    Decimal units (`KB`, `MB`, `GB`, `TB`, and Kubernetes' `K`, `M`, `G`, `T`) are powers of 1000; binary
    units (`KiB`, `MiB`, `GiB`, `TiB`, `Ki`, `Mi`, `Gi`, `Ti`) powers of 1024. A bare number is GiB.

    Raises:
        ValueError: naming the value and the accepted forms.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"memory size {text!r} is not understood; write a number and a unit such as 4GiB, "
                "512MiB, 8GB or 1.5Gi (a bare number means GiB)"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    if value <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return int(value * _UNITS[unit])


def _cgroup_limit(paths: list[str]) -> int | None:
    for path in paths:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text and text != "max" and text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def _cpu_has_bf16() -> bool:
    """Whether the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Hardware:
    """What one machine offers to training workers.

    Attributes:
        accelerator: `gpu` when CUDA GPUs are visible, else `cpu`.
        cpus: CPU cores usable by this process (affinity and cgroup quota).
        memory_bytes: Host memory (the smaller of physical memory and the cgroup limit).
        gpus: Visible CUDA GPUs.
        gpu_memory_bytes: Memory of one GPU.
        cpu_name: Processor model, for the calibration key.
        cpu_bf16: The CPU has native bf16 matrix instructions (bf16 then trains faster than fp32 on CPU;
            without them it is many times slower).
        gpu_name: GPU model, for the calibration key.
    """

    accelerator: Literal["cpu", "gpu"] = "cpu"
    cpus: int = 1
    memory_bytes: int = 16 * GIB
    gpus: int = 0
    gpu_memory_bytes: int = 0
    cpu_name: str = ""
    gpu_name: str = ""
    cpu_bf16: bool = False

    @classmethod
    def detect(cls) -> Hardware:
        """Describe this machine (reads /proc and cgroups; asks torch about CUDA devices)."""
        import psutil
        import torch

        memory = psutil.virtual_memory().total
        limit = _cgroup_limit(["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"])
        if limit:
            memory = min(memory, limit)
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpu_memory, gpu_name = 0, ""
        if gpus:
            props = torch.cuda.get_device_properties(0)
            gpu_memory, gpu_name = int(props.total_memory), props.name
        return cls(
            accelerator="gpu" if gpus else "cpu",
            cpus=available_cpus(),
            memory_bytes=int(memory),
            gpus=gpus,
            gpu_memory_bytes=gpu_memory,
            cpu_name=_cpu_name(),
            cpu_bf16=_cpu_has_bf16(),
            gpu_name=gpu_name,
        )

    @property
    def device_memory_bytes(self) -> int:
        """Memory one worker's device has: a GPU's memory, or the host's on a CPU-only machine."""
        return self.gpu_memory_bytes if self.accelerator == "gpu" else self.memory_bytes

    def fingerprint(self) -> str:
        """A short stable key of what decides measured speed and memory here (for calibration files)."""
        import torch

        key = {
            "accelerator": self.accelerator,
            "cpus": self.cpus,
            "cpu": self.cpu_name,
            "gpu": self.gpu_name,
            "gpus": self.gpus,
            "torch": torch.__version__,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> str:
        """One line for logs and the CLI."""
        text = f"{self.cpus} CPU ({self.cpu_name or 'unknown'}), {format_bytes(self.memory_bytes)} RAM"
        if self.accelerator == "gpu":
            text += f", {self.gpus} x {self.gpu_name} ({format_bytes(self.gpu_memory_bytes)})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
