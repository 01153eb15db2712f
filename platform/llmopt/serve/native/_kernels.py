"""Native fp32 kernels for decoding on CPU (`serving.decode_kernel`).

Decoding one sequence reads every weight once per token, so its speed is the rate at which the weights
stream from memory. torch's `F.linear` on a single row (MKL's GEMV) reached 13-14 GB/s on this project's
machines for Llama-sized layers, against 27-31 GB/s that a plain sum over the same bytes reads; the C kernel
in `_gemv.c` (one sequential pass per row, four vector accumulators) reached 23-27 GB/s, which makes batch-1
decoding of the ~100M preset about 1.7x faster. We deliberately hand-write these kernels: neither torch
(MKL/oneDNN) nor a pinned library offers a single-row GEMV that streams at the machine's bandwidth, and
torch.compile's CPU backend calls the same MKL routine for it. `_gemv.c` also holds single-query attention
over a KV cache, for the engine's lean Llama step (`_lean_step.py`).

For continuous batching it holds a few-row product (MKL packs the whole weight matrix at every call, a cost
that does not shrink with the rows; `GEMM_ROWS`), RMSNorm, RoPE + cache write + attention and SiLU kernels
on rows, and two whole-model calls built from them: a batched decode step and a wave of prompts' prefill. One
ctypes call per step keeps the engine thread off the GIL, which a serving replica's event loop and Ray's
threads also want.

The kernels are compiled at first use with the system C compiler (`$CC`, else cc/gcc/clang; `-O3
-march=native`) into llmopt's cache, keyed by the source, the compiler, its flags and the CPU's flags, checked
against `F.linear`, SDPA and torch's norms on random inputs, and loaded with ctypes (which releases the GIL
during the call). One source serves AVX-512 (16 floats a vector) and AVX2 + FMA (8); `LLMOPT_NATIVE_ISA=avx2`
builds the AVX2 variant on an AVX-512 CPU, to check or measure what AVX2-only machines (AMD EPYC before Zen 4)
get. Only fp32 inputs without autograd use them (single rows, and `GEMM_ROWS` rows); every other input, and
every machine where they cannot be built, keeps torch's kernels. The switched layers' weights move onto 2 MiB
pages (`huge_page_empty`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import re
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


# `LLMOPT_NATIVE_ISA`: the vector width to build for. `native` (the default) is the widest this CPU has;
# `avx2` leaves AVX-512 out, so an AVX-512 machine runs and checks the code AVX2-only machines run.
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"]}


def native_isa() -> str:
    """The build `LLMOPT_NATIVE_ISA` asks for (`native` when unset).

    Raises:
        ValueError: an unknown value (the message names the variable and its choices).
    """
    isa = os.environ.get("LLMOPT_NATIVE_ISA", "native").strip().lower() or "native"
    if isa not in ISA_FLAGS:
        choices = ", ".join(ISA_FLAGS)
        raise ValueError(f"LLMOPT_NATIVE_ISA={isa!r} is not one of {choices}; unset it or pick one")
    return isa


def _build(compiler: list[str], target: Path, flags: list[str]) -> None:
    """Compile `_gemv.c` to `target` atomically (replicas starting together may build at once)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [
            *compiler,
            "-O3",
            "-march=native",
            *flags,
            "-shared",
            "-fPIC",
            "-pthread",
            "-o",
            tmp,
            str(_SOURCE),
            "-lm",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"`{shlex.join(cmd)}` failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclasses.dataclass(frozen=True)
class NativeKernels:
    """The loaded kernels of `_gemv.c` (ctypes functions; they release the GIL while they run).

    Attributes:
        gemv: `gemv(W_ptr, x_ptr, bias_ptr_or_None, y_ptr, m, n)`: y = W x (+ bias).
        attend_rows: `attend_rows(q_ptr, k_ptr, v_ptr, out_ptr, batch, heads, kv_heads, width, dim,
            head_stride, row_stride, starts_ptr, scale, scores_ptr)`: single-query attention over a KV cache
            for each row of a left-padded batch, row b over positions `starts[b]` (int64) to `width`
            (`scores` holds `width` floats of scratch).
        layer_qkv: `layer_qkv(x, hidden, norm, eps, wq, bq, wk, bk, wv, bv, heads, kv_heads, dim, cos, sin,
            q, k, v, h)` (pointers, sizes, floats; a bias may be None): a Llama layer's RMSNorm, q/k/v
            projections and RoPE for one token (`h`: `hidden` floats of scratch).
        layer_out: `layer_out(x, hidden, a, attn_width, wo, bo, norm, eps, wg, bg, wu, bu, wd, bd, inter,
            scratch)`: the rest of the layer after attention output `a`, adding both residuals to `x` in
            place (`scratch`: hidden + 2 * inter floats).
        gemm: `gemm(x, W, bias_or_None, y, rows, n, k, accumulate, scratch) -> int`: y = x W^T (+ bias)
            (+ y when `accumulate`) for a few rows (`scratch`: `gemm_scratch(rows, n, k)` floats); returns
            0, doing nothing, on a build without a vector path.
        rms_norm_rows: `rms_norm_rows(x, weight, eps, out, rows, n)`: RMSNorm of each row.
        decode_attention: `decode_attention(qkv, batch, heads, kv_heads, dim, cos, sin, k, v, head_stride,
            row_stride, pos, starts, scale, out, scores)`: a batched decode step's RoPE, cache write (at
            position `pos`) and attention from each row's `starts[b]`, on fused q|k|v rows.
        silu_mul_rows: `silu_mul_rows(gu, out, rows, inter)`: SiLU(gate) * up of fused gate|up rows.
        decode_step: `decode_step(x, batch, hidden, heads, kv_heads, dim, inter, layers, weights, eps, caches,
            strides, starts, cos, sin, scale, final_norm, final_eps, head, head_bias, vocab, logits, scratch)
            -> int`: a whole batched decode step of a Llama model (see `_gemv.c`); 0 without a vector path.
        decode_step_scratch: `decode_step_scratch(batch, hidden, heads, kv_heads, dim, inter, vocab, width)`:
            the floats of scratch `decode_step` needs.
        prefill: `prefill(x, count, lengths, width, hidden, heads, kv_heads, dim, inter, layers, weights, eps,
            caches, cos, sin, scale, final_norm, final_eps, head, head_bias, vocab, logits, scratch) -> int`:
            the prefill of `count` prompts of a Llama model into left-padded caches (see `_gemv.c`); 0 without
            a vector path.
        prefill_scratch: `prefill_scratch(rows, hidden, heads, kv_heads, dim, inter, vocab)`: its scratch.
        set_threads: `set_threads(n) -> int`: the threads the batched paths (`gemm`, `decode_step`,
            `prefill`, and `gemv` on matrices of 2 MiB or more) split their work over; returns the number
            in use (1 where workers cannot start). Callers follow torch's thread count through
            :meth:`follow_torch_threads`. Results do not depend on it.
        threads: `threads() -> int`: the number in use.
        description: Which build this is, for logs and reports.
    """

    gemv: Callable[..., None]
    attend_rows: Callable[..., None]
    layer_qkv: Callable[..., None]
    layer_out: Callable[..., None]
    gemm: Callable[..., int]
    gemm_scratch: Callable[[int, int, int], int]
    rms_norm_rows: Callable[..., None]
    decode_attention: Callable[..., None]
    silu_mul_rows: Callable[..., None]
    decode_step: Callable[..., int]
    decode_step_scratch: Callable[..., int]
    prefill: Callable[..., int]
    prefill_scratch: Callable[..., int]
    set_threads: Callable[[int], int]
    threads: Callable[[], int]
    description: str

    def follow_torch_threads(self) -> None:
        """Use as many threads as torch does (the replica's CPU share, see `set_torch_threads`); a ctypes
        call only when that number changed."""
        n = torch.get_num_threads()
        if _THREADS.get(id(self.set_threads)) != n:
            _THREADS[id(self.set_threads)] = self.set_threads(n) and n


def load_kernels() -> tuple[NativeKernels | None, str]:
    """Build (once per machine and `LLMOPT_NATIVE_ISA`) and load the kernels.

    Returns:
        `(kernels, description)`, or `(None, reason)` when they are unavailable (not x86-64, no C compiler,
        no AVX2/AVX-512, a failed build or self-check, an unknown `LLMOPT_NATIVE_ISA`).
    """
    try:
        isa = native_isa()
    except ValueError as exc:
        return None, str(exc)
    return _load_kernels(isa)


@functools.cache
def _load_kernels(isa_name: str) -> tuple[NativeKernels | None, str]:
    from llmopt.models import cache_dir

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the native decode kernel needs x86-64 with AVX2 or AVX-512, not {platform.machine()}"
    compiler = _compiler()
    if compiler is None:
        return (
            None,
            "no C compiler found (cc, gcc or clang on PATH, or $CC) to build the native decode kernel",
        )
    flags = ISA_FLAGS[isa_name]
    key = hashlib.sha256(
        b"\0".join([_SOURCE.read_bytes(), shlex.join([*compiler, *flags]).encode(), _cpu_flags().encode()])
    ).hexdigest()[:16]
    path = cache_dir() / "kernels" / f"gemv-{key}.so"
    try:
        if not path.exists():
            _build(compiler, path, flags)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        return None, f"could not build the native decode kernel: {exc}"
    isa = lib.llmopt_gemv_isa()
    if isa == 0:
        return None, "the compiler targets neither AVX2+FMA nor AVX-512 on this CPU"
    ptr, size, real = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    gemv, attend_rows = lib.llmopt_gemv, lib.llmopt_attend_rows
    layer_qkv, layer_out = lib.llmopt_layer_qkv, lib.llmopt_layer_out
    gemv.argtypes = [*[ptr] * 4, size, size]
    attend_rows.argtypes = [*[ptr] * 4, *[size] * 7, ptr, real, ptr]
    layer_qkv.argtypes = [ptr, size, ptr, real, *[ptr] * 6, size, size, size, *[ptr] * 6]
    layer_out.argtypes = [ptr, size, ptr, size, ptr, ptr, ptr, real, *[ptr] * 6, size, ptr]
    gemv.restype = attend_rows.restype = layer_qkv.restype = layer_out.restype = None
    gemm, norm_rows = lib.llmopt_gemm, lib.llmopt_rms_norm_rows
    attention, silu_mul = lib.llmopt_decode_attention, lib.llmopt_silu_mul_rows
    gemm.argtypes = [*[ptr] * 4, size, size, size, ctypes.c_int, ptr]
    gemm.restype = ctypes.c_int
    gemm_scratch = lib.llmopt_gemm_scratch
    gemm_scratch.argtypes, gemm_scratch.restype = [size] * 3, size
    norm_rows.argtypes = [ptr, ptr, real, ptr, size, size]
    attention.argtypes = [ptr, *[size] * 4, *[ptr] * 4, size, size, size, ptr, real, ptr, ptr]
    silu_mul.argtypes = [ptr, ptr, size, size]
    norm_rows.restype = attention.restype = silu_mul.restype = None
    step, step_scratch = lib.llmopt_decode_step, lib.llmopt_decode_step_scratch
    step.argtypes = [ptr, *[size] * 7, *[ptr] * 7, real, ptr, real, ptr, ptr, size, ptr, ptr]
    step_scratch.argtypes = [size] * 8
    prefill, prefill_scratch = lib.llmopt_prefill, lib.llmopt_prefill_scratch
    prefill.argtypes = [ptr, size, ptr, *[size] * 7, *[ptr] * 5, real, ptr, real, ptr, ptr, size, ptr, ptr]
    prefill_scratch.argtypes = [size] * 7
    step.restype = prefill.restype = ctypes.c_int
    lib.llmopt_set_threads.argtypes, lib.llmopt_set_threads.restype = [ctypes.c_int], ctypes.c_int
    lib.llmopt_get_threads.argtypes, lib.llmopt_get_threads.restype = [], ctypes.c_int
    step_scratch.restype = prefill_scratch.restype = size
    description = f"native {'AVX-512' if isa == 512 else 'AVX2 + FMA'} GEMV ({path.name})"
    products = (gemm, gemm_scratch, norm_rows, attention, silu_mul)
    batched = (*products, step, step_scratch, prefill, prefill_scratch)
    kernels = NativeKernels(
        gemv,
        attend_rows,
        layer_qkv,
        layer_out,
        *batched,
        lib.llmopt_set_threads,
        lib.llmopt_get_threads,
        description,
    )
    if failed := _self_check(kernels):
        return None, f"the native decode kernel {path} failed its self-check against {failed}"
    return kernels, description


# The thread count last asked of each loaded library (keyed by the id of its set_threads function).
_THREADS: dict[int, int] = {}


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' `apply_rotary_pos_emb` for one tensor: t * cos + rotate_half(t) * sin (what the layer
    kernel computes, and the lean step's batched path runs)."""
    half = t.shape[-1] // 2
    return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin


def _self_check(kernels: NativeKernels) -> str | None:
    """Odd sizes exercise every tail path; a wrong result disables the kernels rather than serve garbage."""
    gemv, attend_rows = kernels.gemv, kernels.attend_rows
    gen = torch.Generator().manual_seed(0)
    w, x, b = (torch.randn(*s, generator=gen) for s in ((37, 203), (203,), (37,)))
    y = torch.empty(37)
    gemv(w.data_ptr(), x.data_ptr(), b.data_ptr(), y.data_ptr(), 37, 203)
    if not torch.allclose(y, torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4):
        return "F.linear"
    heads, kv_heads, length, dim, capacity = 6, 2, 45, 24, 50
    group = heads // kv_heads  # repeat_interleave, not enable_gqa (torch >= 2.5 only)
    scores = torch.empty(length)
    batch, starts = 3, torch.tensor([0, 7, 44])  # a left-padded batch: row b attends from starts[b]
    q = torch.randn(batch, heads, 1, dim, generator=gen)
    k, v = (torch.randn(batch + 1, kv_heads, capacity, dim, generator=gen) for _ in range(2))
    out = torch.empty(batch, heads, dim)
    args = (q, k, v, out, batch, heads, kv_heads, length, dim, capacity * dim, kv_heads * capacity * dim)
    attend_rows(*(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args), starts.data_ptr(),
                dim**-0.5, scores.data_ptr())  # fmt: skip
    mask = (torch.arange(length) >= starts[:, None]).view(batch, 1, 1, length)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, *(t[:batch, :, :length].repeat_interleave(group, dim=1) for t in (k, v)), attn_mask=mask
    )
    if not torch.allclose(out, want.view(batch, heads, dim), atol=1e-5, rtol=1e-4):
        return "scaled_dot_product_attention"
    return _check_layer(kernels, gen)


def _check_layer(kernels: NativeKernels, gen: torch.Generator) -> str | None:
    """The fused layer halves against torch's RMSNorm, rotate-half RoPE and SiLU MLP (odd sizes, biases)."""
    F = torch.nn.functional
    hidden, heads, kv_heads, dim, inter, eps = 37, 3, 1, 10, 53, 1e-5
    x, norm, norm2, cos, sin = (torch.randn(n, generator=gen) for n in (hidden, hidden, hidden, dim, dim))
    wq, wk, wv = (torch.randn(n * dim, hidden, generator=gen) for n in (heads, kv_heads, kv_heads))
    bq, bk, bv = (torch.randn(n * dim, generator=gen) for n in (heads, kv_heads, kv_heads))
    wo, wg, wu = (
        torch.randn(*s, generator=gen) for s in ((hidden, heads * dim), (inter, hidden), (inter, hidden))
    )
    wd, bo = torch.randn(hidden, inter, generator=gen), torch.randn(hidden, generator=gen)
    q, k, v, h = (torch.empty(n) for n in (heads * dim, kv_heads * dim, kv_heads * dim, hidden))
    ptrs = lambda *ts: [t.data_ptr() if t is not None else None for t in ts]  # noqa: E731
    kernels.layer_qkv(x.data_ptr(), hidden, norm.data_ptr(), eps, *ptrs(wq, bq, wk, bk, wv, bv),
                      heads, kv_heads, dim, *ptrs(cos, sin, q, k, v, h))  # fmt: skip
    n = F.rms_norm(x, (hidden,), norm, eps)
    roped = (apply_rope(F.linear(n, w, b).view(-1, dim), cos, sin).view(-1) for w, b in ((wq, bq), (wk, bk)))
    want = (*roped, F.linear(n, wv, bv))
    if not all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip((q, k, v), want, strict=True)):
        return "RMSNorm, projections and RoPE"
    a, after, scratch = torch.randn(heads * dim, generator=gen), x.clone(), torch.empty(hidden + 2 * inter)
    kernels.layer_out(after.data_ptr(), hidden, a.data_ptr(), heads * dim, *ptrs(wo, bo, norm2), eps,
                      *ptrs(wg, None, wu, None, wd, None), inter, scratch.data_ptr())  # fmt: skip
    mid = x + F.linear(a, wo, bo)
    n = F.rms_norm(mid, (hidden,), norm2, eps)
    want = mid + F.linear(F.silu(F.linear(n, wg)) * F.linear(n, wu), wd)
    if not torch.allclose(after, want, atol=1e-3, rtol=1e-4):
        return "the attention output projection and SiLU MLP"
    return _check_batched(kernels, gen)


def _check_batched(kernels: NativeKernels, gen: torch.Generator) -> str | None:
    """The batched decode kernels against torch: the product (both row widths, a tail of columns, bias,
    accumulation), RMSNorm rows, RoPE + cache write + attention on fused q|k|v rows, SiLU * up."""
    F = torch.nn.functional
    for rows in (3, 7, 11, 16, 29, 45, 83):  # few rows (groups of 8 or 6, up to 16), 1 to 3 panels of 32
        x, w, b, y = (torch.randn(*s, generator=gen) for s in ((rows, 70), (27, 70), (27,), (rows, 27)))
        out, scratch = y.clone(), torch.empty(kernels.gemm_scratch(rows, 27, 70))
        kernels.gemm(x.data_ptr(), w.data_ptr(), b.data_ptr(), out.data_ptr(), rows, 27, 70, 1,
                     scratch.data_ptr())  # fmt: skip
        if not torch.allclose(out, y + F.linear(x, w, b), atol=1e-4, rtol=1e-4):
            return f"F.linear on {rows} rows"
    rows, hidden, eps = 5, 37, 1e-5
    x, weight = torch.randn(rows, hidden, generator=gen), torch.randn(hidden, generator=gen)
    out = torch.empty(rows, hidden)
    kernels.rms_norm_rows(x.data_ptr(), weight.data_ptr(), eps, out.data_ptr(), rows, hidden)
    if not torch.allclose(out, F.rms_norm(x, (hidden,), weight, eps), atol=1e-5, rtol=1e-5):
        return "RMSNorm on rows"
    # A head size of 10 takes the scalar path; 32 (a multiple of the vector width) the vector one, over 41
    # positions (a tail of 9 or 1).
    for dim, capacity, pos in ((10, 12, 8), (32, 45, 40)):
        if failed := _check_decode_attention(kernels, gen, dim, capacity, pos):
            return failed
    gu, inter = torch.randn(rows, 2 * 13, generator=gen), 13
    out = torch.empty(rows, inter)
    kernels.silu_mul_rows(gu.data_ptr(), out.data_ptr(), rows, inter)
    if not torch.allclose(out, F.silu(gu[:, :inter]) * gu[:, inter:], atol=1e-6, rtol=1e-5):
        return "SiLU * up on rows"
    return None


def _check_decode_attention(kernels: NativeKernels, gen: torch.Generator, dim: int, capacity: int, pos: int):
    F = torch.nn.functional
    batch, heads, kv_heads = 3, 6, 2
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=gen)
    cos, sin = torch.randn(batch, dim, generator=gen), torch.randn(batch, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, capacity, dim, generator=gen) for _ in range(2))
    starts, out, scores = torch.tensor([0, 3, pos]), torch.empty(batch, heads * dim), torch.empty(capacity)
    q, kn, vn = qkv.clone().split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
    q, kn = (apply_rope(t.view(batch, -1, dim), cos[:, None], sin[:, None]) for t in (q, kn))
    want_k, want_v = k.clone(), v.clone()
    want_k[:, :, pos], want_v[:, :, pos] = kn, vn.view(batch, kv_heads, dim)
    kernels.decode_attention(qkv.data_ptr(), batch, heads, kv_heads, dim, cos.data_ptr(), sin.data_ptr(),
                             k.data_ptr(), v.data_ptr(), capacity * dim, kv_heads * capacity * dim, pos,
                             starts.data_ptr(), dim**-0.5, out.data_ptr(), scores.data_ptr())  # fmt: skip
    mask = (torch.arange(pos + 1) >= starts[:, None]).view(batch, 1, 1, pos + 1)
    want = F.scaled_dot_product_attention(
        q.view(batch, heads, 1, dim),
        *(t[:, :, : pos + 1].repeat_interleave(heads // kv_heads, dim=1) for t in (want_k, want_v)),
        attn_mask=mask,
    )
    # RoPE's products may be fused (FMA) in C: the keys agree to rounding, the values exactly.
    if not (torch.allclose(k, want_k, atol=1e-6, rtol=1e-5) and torch.equal(v, want_v)):
        return f"the batched cache write (head size {dim})"
    if not torch.allclose(out, want.reshape(batch, heads * dim), atol=1e-5, rtol=1e-4):
        return f"RoPE and attention on fused q|k|v rows (head size {dim})"
    return None


def load_gemv() -> tuple[Callable[..., None] | None, str]:
    """The GEMV of :func:`load_kernels`: `(gemv, description)`, or `(None, reason)`."""
    kernels, description = load_kernels()
    return (kernels.gemv if kernels else None), description


# Rows on which the native product replaces torch's (MKL's SGEMM packs the whole weight matrix at every call,
# a cost that does not shrink with the rows): a batched decode step of 2 rows or more, a short prompt's
# prefill. Up to 16 rows it reads each weight row once for all rows (`GEMM_SMALL_ROWS` in _gemv.c), beyond
# that on 32-row panels. Decode steps, engine alone, one thread, AVX-512, torch's products against these:
# base-100m 8 rows 99 -> 55 ms, 16 rows 108 -> 81 ms; tiny-llama 8 rows 2.5 -> 1.8 ms, 16 rows 4.1 -> 2.8 ms.
# Beyond a few hundred rows MKL's cache blocking wins.
GEMM_ROWS = (2, 128)


class DecodeLinear(torch.nn.Linear):
    """`nn.Linear` whose single-row fp32 inputs (batch-1 decoding) run the native GEMV.

    Set on existing modules by :func:`use_native_decode` (same parameters and state dict); anything else
    (prefill, batches, autograd, another dtype) calls `nn.Linear.forward`.
    """

    # Set once per process by use_native_decode (a ctypes function never binds as a method).
    _gemv: Callable[..., None]
    _gemm: Callable[..., int]
    _kernels: NativeKernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            x.dtype is torch.float32
            and w.dtype is torch.float32
            and x.device.type == "cpu"
            and not torch.is_grad_enabled()
            and x.is_contiguous()
        ):
            rows = x.numel() // self.in_features
            bias = self.bias.data_ptr() if self.bias is not None else None
            self._kernels.follow_torch_threads()
            if rows == 1:
                y = x.new_empty((*x.shape[:-1], self.out_features))
                self._gemv(
                    w.data_ptr(), x.data_ptr(), bias, y.data_ptr(), self.out_features, self.in_features
                )
                return y
            if GEMM_ROWS[0] <= rows <= GEMM_ROWS[1]:
                y = x.new_empty((*x.shape[:-1], self.out_features))
                scratch = torch.empty(self._kernels.gemm_scratch(rows, self.out_features, self.in_features))
                self._gemm(x.data_ptr(), w.data_ptr(), bias, y.data_ptr(), rows, self.out_features,
                           self.in_features, 0, scratch.data_ptr())  # fmt: skip
                return y
        return super().forward(x)


def use_native_decode(
    model: torch.nn.Module, required: bool = False, huge_pages: bool = True
) -> tuple[int, str]:
    """Route the batch-1 products of `model`'s fp32 CPU `nn.Linear` layers through the native kernel.

    Only plain `torch.nn.Linear` modules change (quantized and bitsandbytes layers keep their own kernels).

    Args:
        model: A model on CPU, in fp32.
        required: Raise instead of keeping torch's kernels when the native kernel is unavailable.
        huge_pages: Move the switched layers' weights onto 2 MiB pages (see :func:`huge_page_empty`).

    Returns:
        `(layers switched, description of the kernel or why not)`.

    Raises:
        RuntimeError: `required` and the kernel cannot be built or loaded here (the message says why).
    """
    kernels, description = load_kernels()
    if kernels is None:
        if required:
            raise RuntimeError(description)
        return 0, description
    DecodeLinear._gemv = kernels.gemv
    DecodeLinear._gemm = kernels.gemm
    DecodeLinear._kernels = kernels
    switched = []
    for module in model.modules():
        w = module.weight if type(module) is torch.nn.Linear else None
        if w is not None and w.dtype is torch.float32 and w.device.type == "cpu" and w.is_contiguous():
            module.__class__ = DecodeLinear
            switched.append(module)
    if huge_pages and huge_pages_available():
        moved = _move_to_huge_pages(switched)
        description += f", {moved / 2**20:.0f} MiB of weights on 2 MiB pages"
    return len(switched), description


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


def transparent_huge_pages() -> str:
    """The kernel's transparent-huge-page mode (`always`, `madvise` or `never`; '' where unknown)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    found = re.search(r"\[(\w+)\]", text)
    return found.group(1) if found else ""


def huge_pages_available() -> bool:
    """Whether a process may ask for transparent huge pages here (mode `always` or `madvise`)."""
    return transparent_huge_pages() in ("always", "madvise")


def huge_page_empty(numel: int) -> torch.Tensor:
    """An uninitialised 1-D fp32 tensor whose memory the kernel is asked to back with 2 MiB pages.

    Batch-1 decoding streams every weight once per token, and the CPU's hardware prefetchers stop at every
    4 KiB page boundary; on 2 MiB pages a plain read of 456 MB went from 25.6 to 31.2 GB/s and the native
    GEMV from 26 to 30.5 GB/s on this project's machines. Where transparent huge pages are off, or the
    memory was touched before (small allocations from the heap), the tensor simply keeps 4 KiB pages.
    """
    nbytes = numel * 4
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # untouched: mapped on first write
    start = -raw.data_ptr() % HUGE_PAGE
    region = raw[start : start + nbytes]
    if nbytes >= HUGE_PAGE and huge_pages_available():
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(region.data_ptr()), ctypes.c_size_t(nbytes), _MADV_HUGEPAGE)
    return region.view(torch.float32)


def _move_to_huge_pages(modules: list[torch.nn.Module], chunk_bytes: int = 64 << 20) -> int:
    """Copy the modules' weights, in order, into huge-page buffers of about `chunk_bytes` each.

    Consecutive layers then also share pages and the decode step streams memory in the order it reads it.
    Chunks bound the extra memory while copying to one chunk. Returns the bytes moved.
    """
    params = list({id(m.weight): m.weight for m in modules}.values())  # tied weights move once
    groups: list[list[torch.nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if groups[-1] and size + p.numel() * 4 > chunk_bytes:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.numel() * 4
    moved = 0
    with torch.no_grad():
        for group in groups:
            flat, offset = huge_page_empty(sum(p.numel() for p in group)), 0
            for p in group:
                view = flat[offset : offset + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view
                offset += p.numel()
            moved += offset * 4
    return moved
