"""A native fp32 kernel for batch-1 decoding on CPU (`serving.decode_kernel`).

Decoding one sequence reads every weight once per token, so its speed is the rate at which the weights
stream from memory. torch's `F.linear` on a single row (MKL's GEMV) reached 13-14 GB/s on this project's
machines for Llama-sized layers, against 27-31 GB/s that a plain sum over the same bytes reads; the C kernel
in `_gemv.c` (one sequential pass per row, four vector accumulators) reached 23-27 GB/s, which makes batch-1
decoding of the ~100M preset about 1.7x faster. We deliberately hand-write this one kernel: neither torch
(MKL/oneDNN) nor a pinned library offers a single-row GEMV that streams at the machine's bandwidth, and
torch.compile's CPU backend calls the same MKL routine for it.

The kernel is compiled at first use with the system C compiler (`$CC`, else cc/gcc/clang; `-O3
-march=native`) into llmopt's cache, keyed by the source, the compiler and the CPU's flags, checked against
`F.linear` on a random matrix, and loaded with ctypes (which releases the GIL during the call). Only
single-row fp32 inputs without autograd use it; every other input, and every machine where it cannot be
built, keeps torch's kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("_gemv.c")


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so a kernel built with -march=native is never reused elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> list[str] | None:
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        if found := shutil.which(name):
            return [found]
    return None


def _build(compiler: list[str], target: Path) -> None:
    """Compile `_gemv.c` to `target` atomically (replicas starting together may build at once)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [*compiler, "-O3", "-march=native", "-shared", "-fPIC", "-o", tmp, str(_SOURCE)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"`{shlex.join(cmd)}` failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load_gemv() -> tuple[Callable[..., None] | None, str]:
    """Build (once per machine) and load the kernel.

    Returns:
        `(gemv, description)`: `gemv(W_ptr, x_ptr, bias_ptr_or_None, y_ptr, m, n)`, or `None` with the reason
        it is unavailable (not x86-64, no C compiler, no AVX2/AVX-512, a failed build or self-check).
    """
    from llmopt.models import cache_dir

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the native decode kernel needs x86-64 with AVX2 or AVX-512, not {platform.machine()}"
    compiler = _compiler()
    if compiler is None:
        return (
            None,
            "no C compiler found (cc, gcc or clang on PATH, or $CC) to build the native decode kernel",
        )
    key = hashlib.sha256(
        b"\0".join([_SOURCE.read_bytes(), shlex.join(compiler).encode(), _cpu_flags().encode()])
    ).hexdigest()[:16]
    path = cache_dir() / "kernels" / f"gemv-{key}.so"
    try:
        if not path.exists():
            _build(compiler, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        return None, f"could not build the native decode kernel: {exc}"
    isa = lib.llmopt_gemv_isa()
    if isa == 0:
        return None, "the compiler targets neither AVX2+FMA nor AVX-512 on this CPU"
    gemv = lib.llmopt_gemv
    gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 2
    gemv.restype = None
    # Odd sizes exercise every tail path; a wrong result disables the kernel rather than serve garbage.
    gen = torch.Generator().manual_seed(0)
    w, x, b = (torch.randn(*s, generator=gen) for s in ((37, 203), (203,), (37,)))
    y = torch.empty(37)
    gemv(w.data_ptr(), x.data_ptr(), b.data_ptr(), y.data_ptr(), 37, 203)
    if not torch.allclose(y, torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4):
        return None, f"the native decode kernel {path} failed its self-check against F.linear"
    return gemv, f"native AVX-{isa} GEMV ({path.name})"


class DecodeLinear(torch.nn.Linear):
    """`nn.Linear` whose single-row fp32 inputs (batch-1 decoding) run the native GEMV.

    Set on existing modules by :func:`use_native_decode` (same parameters and state dict); anything else
    (prefill, batches, autograd, another dtype) calls `nn.Linear.forward`.
    """

    _gemv: Callable[..., None]  # set once per process by use_native_decode (a ctypes function never binds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            x.numel() == self.in_features
            and x.dtype is torch.float32
            and w.dtype is torch.float32
            and x.device.type == "cpu"
            and not torch.is_grad_enabled()
            and x.is_contiguous()
        ):
            y = x.new_empty((*x.shape[:-1], self.out_features))
            bias = self.bias.data_ptr() if self.bias is not None else None
            self._gemv(w.data_ptr(), x.data_ptr(), bias, y.data_ptr(), self.out_features, self.in_features)
            return y
        return super().forward(x)


def use_native_decode(model: torch.nn.Module, required: bool = False) -> tuple[int, str]:
    """Route the batch-1 products of `model`'s fp32 CPU `nn.Linear` layers through the native kernel.

    Only plain `torch.nn.Linear` modules change (quantized and bitsandbytes layers keep their own kernels).

    Args:
        model: A model on CPU, in fp32.
        required: Raise instead of keeping torch's kernels when the native kernel is unavailable.

    Returns:
        `(layers switched, description of the kernel or why not)`.

    Raises:
        RuntimeError: `required` and the kernel cannot be built or loaded here (the message says why).
    """
    gemv, description = load_gemv()
    if gemv is None:
        if required:
            raise RuntimeError(description)
        return 0, description
    DecodeLinear._gemv = gemv
    switched = 0
    for module in model.modules():
        w = module.weight if type(module) is torch.nn.Linear else None
        if w is not None and w.dtype is torch.float32 and w.device.type == "cpu" and w.is_contiguous():
            module.__class__ = DecodeLinear
            switched += 1
    return switched, description
