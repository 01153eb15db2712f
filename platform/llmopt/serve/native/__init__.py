"""Optional native CPU kernels for decoding fp32 models (`serving.decode_kernel`): an accelerator, not a
requirement.

Small C kernels (`_gemv.c`: GEMV, few-row products, attention, whole Llama decode steps and prefills) built
with the system C compiler at first use, checked against torch, and a lean Llama decode step on top of them
that computes transformers' logits to 1e-5. Where they cannot be built (no compiler, another architecture),
on GPUs and at other precisions, the engine keeps torch's kernels.
"""

from llmopt.serve.native._kernels import (
    GEMM_ROWS,
    HUGE_PAGE,
    DecodeLinear,
    NativeKernels,
    huge_page_empty,
    huge_pages_available,
    load_gemv,
    load_kernels,
    transparent_huge_pages,
    use_native_decode,
)
from llmopt.serve.native._lean_step import LlamaDecodeStep, unsupported_reason

__all__ = [
    "GEMM_ROWS",
    "HUGE_PAGE",
    "DecodeLinear",
    "LlamaDecodeStep",
    "NativeKernels",
    "huge_page_empty",
    "huge_pages_available",
    "load_gemv",
    "load_kernels",
    "transparent_huge_pages",
    "unsupported_reason",
    "use_native_decode",
]
