"""Mixture-of-Experts grouped products on CPU in 16-bit: each expert's rows padded to a few sizes.

Transformers runs a MoE layer's experts as grouped products (`transformers.integrations.moe._grouped_mm`),
one product per expert over the tokens routed to it, so one row count per expert that changes with every
batch. On CPU, torch hands 16-bit products to oneDNN, which compiles a kernel for every new shape
(~0.5-1 ms here) and keeps 1,024 of them. Fine-tuning the tiny MoE preset in bf16 made ~2,000 distinct
shapes in 60 steps, so past the first steps the cache thrashed: steps slowed from ~130 to ~200 ms over 200
steps and the process grew to 1.6 GiB, where 32-row padding gave ~90 ms and 0.7 GiB
(packed micro-batch 8, LoRA on attention and experts, one thread). fp32 products go to MKL, which compiles
nothing per shape, and CUDA's grouped product is one kernel, so both keep transformers' path.

Padding is exact: the added rows are zeros, their outputs are dropped, and they add nothing to the
weights' gradients. The granule is at most a quarter of the mean rows per expert, so the padding adds at
most a quarter (about an eighth on average) to the experts' products.
"""

from __future__ import annotations

import torch

GRANULE_MAX = 32
_SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def granule(rows: int, experts: int) -> int:
    """Rows each expert's group is padded to a multiple of: the largest power of two up to
    `GRANULE_MAX` and a quarter of the mean group (1: no padding)."""
    limit = min(GRANULE_MAX, rows / max(1, experts) / 4)
    size = 1
    while size * 2 <= limit:
        size *= 2
    return size


def _layout(offs: torch.Tensor, size: int, rows: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """`(position of each row in the padded layout, padded rows, padded cumulative offsets)`."""
    ends = offs.to(torch.int64)
    sizes = torch.diff(ends, prepend=ends.new_zeros(1))
    padded = (sizes + size - 1) // size * size
    extra = padded - sizes
    shift = torch.cumsum(extra, 0) - extra  # padding rows before each group
    group = torch.repeat_interleave(torch.arange(len(sizes), device=ends.device), sizes, output_size=rows)
    position = torch.arange(rows, device=ends.device) + shift[group]
    return position, int(padded.sum()), torch.cumsum(padded, 0).to(offs.dtype)


def _pad(x: torch.Tensor, position: torch.Tensor, rows: int) -> torch.Tensor:
    return x.new_zeros(rows, x.size(1)).index_copy_(0, position, x)


class _PaddedGroupedMm(torch.autograd.Function):
    """The padded product as one autograd node that keeps what the unpadded product keeps (its input and
    weight) and pads again in backward: through autograd's own index ops, each layer kept a padded copy
    of every expert input as well, 19% more saved activations a layer on the tiny MoE."""

    @staticmethod
    def forward(ctx, x, weight, offs, size, original):
        position, rows, padded_offs = _layout(offs, size, x.size(0))
        out = original(_pad(x, position, rows), weight, offs=padded_offs)
        # As torch's own product: the input only for the weight's gradient, the weight only for the input's.
        wants_x, wants_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x if wants_w else None, weight if wants_x else None, offs)
        ctx.size, ctx.original, ctx.rows = size, original, x.size(0)
        ctx.dtypes = (x.dtype, weight.dtype)
        return out.index_select(0, position)

    @staticmethod
    def backward(ctx, grad):
        x, weight, offs = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        position, rows, padded_offs = _layout(offs, ctx.size, ctx.rows)
        grad_rows = _pad(grad.to(w_dtype), position, rows)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = ctx.original(grad_rows, weight.transpose(-2, -1), offs=padded_offs)
            dx = dx.index_select(0, position).to(x_dtype)
        if ctx.needs_input_grad[1]:  # one (in, rows) @ (rows, out) product per expert
            padded_x = _pad(x.to(w_dtype), position, rows)
            dw = torch._grouped_mm(padded_x.t(), grad_rows, offs=padded_offs)
        return dx, dw, None, None, None


def padded_grouped_mm(original, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, size: int):
    """`original(x, weight, offs)` with each group's rows padded with zeros to a multiple of `size`.

    Args:
        original: The grouped product (transformers' `_grouped_mm` signature).
        x: Rows sorted by expert, `(S, in)`.
        weight: Expert weights, `(experts, in, out)`.
        offs: Cumulative rows per expert, `(experts,)`.
        size: The padding granule.

    Returns:
        `(S, out)`, as `original` returns it.
    """
    return _PaddedGroupedMm.apply(x, weight, offs, size, original)


def grouped_product(original, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """What the installed product does: pads 16-bit products on CPU, hands the rest to `original`."""
    size = granule(x.size(0), weight.size(0))
    if x.device.type != "cpu" or weight.dtype not in _SIXTEEN_BIT or size == 1:
        return original(x, weight, offs=offs)
    return padded_grouped_mm(original, x, weight, offs, size)


def pad_expert_groups() -> bool:
    """Route transformers' grouped expert products through `grouped_product`. Idempotent.

    Returns:
        Whether it is installed (False where this transformers has no grouped experts).
    """
    try:
        from transformers.integrations import moe
    except ImportError:
        return False
    original = getattr(moe, "_grouped_mm", None)
    if original is None:
        return False
    if getattr(original, "_llmopt_padded", False):
        return True

    def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return grouped_product(original, x, weight, offs)

    grouped_mm._llmopt_padded = True  # type: ignore[attr-defined]
    grouped_mm.__wrapped__ = original  # type: ignore[attr-defined]
    moe._grouped_mm = grouped_mm
    return True
