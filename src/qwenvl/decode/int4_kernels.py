"""Triton kernels for Int4 layers (`int4.Int4Linear`), reading GPTQ's packing as it is stored:
no copy of the weights is made.

- `int4_matvec`: one row, a decode step's product at batch 1. Each program takes `MATVEC_COLUMNS`
  outputs and walks the inputs `MATVEC_INPUTS` at a time (one group's scale and zero point a
  turn): it sums x * code in fp32 and applies the group's scale and zero point to the sum,
  scale * (sum x code - zero * sum x), so a weight is never formed.
- `int4_matmul`: a few rows (batched decoding, short prompts): tiles of weights dequantized as the
  reference rounds them (scale * (code - zero) in fp32, then the activations' dtype) and
  multiplied on tensor cores, summing in fp32.

Both take layers whose groups are consecutive inputs (no act-order permutation) of a multiple of
`MATVEC_INPUTS` (and of `MATMUL_INPUTS`) inputs; the backend leaves the others to the layer's own
forward. The block sizes are first choices, not yet tuned on a GPU.
"""

from __future__ import annotations

import torch

from ..int4.linear import Int4Linear
from .kernels import triton

if triton is not None:
    import triton.language as tl

MATVEC_COLUMNS, MATVEC_INPUTS = 32, 128
MATMUL_ROWS, MATMUL_COLUMNS, MATMUL_INPUTS = 16, 64, 64
MATMUL_MAX_ROWS = 64  # more rows (a prompt): the weight dequantized once, then cuBLAS


if triton is not None:

    @triton.jit
    def _codes(qweight_ptr, first, cols, col_in, n, k, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        # the codes [BLOCK_K, BLOCK_N] of inputs first.. for outputs `cols`: input 8r + j of
        # output c sits in bits 4j of qweight[r, c]; zeros past the matrix's edges
        packed = first // 8 + tl.arange(0, BLOCK_K // 8)
        words = tl.load(
            qweight_ptr + packed[:, None] * n + cols[None, :],
            mask=(packed < k // 8)[:, None] & col_in[None, :],
            other=0,
        )
        shifts = tl.arange(0, 8) * 4
        codes = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # the mask drops the sign
        return tl.reshape(codes, [BLOCK_K, BLOCK_N])

    @triton.jit
    def _group(scales_ptr, qzeros_ptr, group, cols, col_in, n, ZERO_OFFSET: tl.constexpr):
        # the scales and zero points (fp32) of `group` for outputs `cols`
        scale = tl.load(scales_ptr + group * n + cols, mask=col_in, other=0.0).to(tl.float32)
        word = tl.load(qzeros_ptr + group * (n // 8) + cols // 8, mask=col_in, other=0)
        zero = (((word >> ((cols % 8) * 4)) & 0xF) + ZERO_OFFSET) & 0xF
        return scale, zero.to(tl.float32)

    @triton.jit
    def _int4_matvec_kernel(
        x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, bias_ptr, out_ptr, n, k, group_size,
        ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_in = cols < n
        acc = tl.zeros([BLOCK_N], tl.float32)
        for first in range(0, k, BLOCK_K):
            at = first + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + at, mask=at < k, other=0.0).to(tl.float32)
            codes = _codes(qweight_ptr, first, cols, col_in, n, k, BLOCK_K, BLOCK_N).to(tl.float32)
            scale, zero = _group(scales_ptr, qzeros_ptr, first // group_size, cols, col_in, n, ZERO_OFFSET)
            acc += scale * (tl.sum(codes * x[:, None], axis=0) - zero * tl.sum(x, axis=0))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
        tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=col_in)

    @triton.jit
    def _int4_matmul_kernel(
        x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, bias_ptr, out_ptr, m, n, k, group_size,
        ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_in, col_in = rows < m, cols < n
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for first in range(0, k, BLOCK_K):
            at = first + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + rows[:, None] * k + at[None, :], mask=row_in[:, None] & (at < k)[None, :], other=0.0
            )
            codes = _codes(qweight_ptr, first, cols, col_in, n, k, BLOCK_K, BLOCK_N).to(tl.float32)
            scale, zero = _group(scales_ptr, qzeros_ptr, first // group_size, cols, col_in, n, ZERO_OFFSET)
            weight = ((codes - zero[None, :]) * scale[None, :]).to(x.dtype)
            if IEEE:  # fp32 activations: fp32 products, as F.linear's, not TF32
                acc = tl.dot(x, weight, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, weight, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out_ptr + rows[:, None] * n + cols[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=row_in[:, None] & col_in[None, :],
        )


def takes(linear: Int4Linear) -> bool:
    """Whether the kernels take `linear` (checked once, when a backend is built: it reads g_idx)."""
    width = linear.settings.group_width(linear.in_features)
    return (
        width % MATVEC_INPUTS == 0
        and width % MATMUL_INPUTS == 0
        and linear.in_features % width == 0
        and linear.ordered_groups()
    )


def _arguments(linear: Int4Linear, out: torch.Tensor) -> tuple:
    bias = linear.bias
    return (
        linear.qweight,
        linear.scales,
        linear.qzeros,
        out if bias is None else bias,
        out,
    )


def int4_linear(linear: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x) for x [..., in] through the kernels: one row by `int4_matvec`'s, up to
    `MATMUL_MAX_ROWS` by `int4_matmul`'s, more by the layer's own forward (dequantize, then cuBLAS)."""
    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    if count > MATMUL_MAX_ROWS:
        return linear(x)
    rows = rows.contiguous()
    n, k = linear.out_features, linear.in_features
    width = linear.settings.group_width(k)
    out = torch.empty(count, n, dtype=x.dtype, device=x.device)
    common = {"ZERO_OFFSET": linear.settings.zero_offset, "HAS_BIAS": linear.bias is not None}
    if count == 1:
        _int4_matvec_kernel[(triton.cdiv(n, MATVEC_COLUMNS),)](
            rows, *_arguments(linear, out), n, k, width,
            BLOCK_N=MATVEC_COLUMNS, BLOCK_K=MATVEC_INPUTS, num_warps=4, **common,
        )  # fmt: skip
    else:
        grid = (triton.cdiv(count, MATMUL_ROWS), triton.cdiv(n, MATMUL_COLUMNS))
        _int4_matmul_kernel[grid](
            rows, *_arguments(linear, out), count, n, k, width, IEEE=x.dtype == torch.float32,
            BLOCK_M=MATMUL_ROWS, BLOCK_N=MATMUL_COLUMNS, BLOCK_K=MATMUL_INPUTS, num_warps=4, **common,
        )  # fmt: skip
    return out.view(*x.shape[:-1], n)
