"""The CPU backend's products of Int4 layers (`int4.Int4Linear`):

- decode steps (up to `KERNEL_ROWS` rows, groups in order): our kernel (`cpu_kernels.c`), which
  reads GPTQ's packed codes where they lie, in fp32 or bf16; bf16 rows on CPUs with AVX512-BF16
  through its dot products (`int4_bf16_dot.c`, up to `DOT_KERNEL_ROWS` rows);
- prompts, act-order layers, and where our kernel cannot be built: torch's int4 CPU kernel
  (`_weight_int4pack_mm_for_cpu`) over a copy of the codes in its layout, made when the backend
  is built (half a byte a weight, as the layer's own).

Measured on AVX2 EPYC cores (no native bf16), the mid config's shapes, each weight read from memory
(`python -m benchmarks.cpu_products`):

- one row: ours 2.6-3.0x torch's kernel on one thread (0.06-0.27 ms against 0.16-0.80, 1024 x 1024
  to 5504 x 1024), 1.7-2.8x on two; on two threads two rows 1.3-2.3x, four 1.1-1.3x, eight
  1.05-1.3x. Ours decodes each code once for two rows (13-20% faster at 2 and 4 rows than once a
  row) but multiplies each row apart, so at more rows torch's kernel, which batches them, catches up.
- on Zen 4 cores (AVX512-BF16), where torch's kernel has AVX-512 code too: one row 1.25-1.5x
  torch's through the dot products (19-25 GB/s), two rows 0.8-1.6x, four and eight 0.7-1.3x.
- torch's kernel with bf16 activations: 2.1-2.5x F.linear over the dequantized bf16 weight at one
  row, 2.5-3.5x at 8 rows, 2.8-3.5x at 301 (a prompt). Each call dequantizing the weight first
  (the layer's reference forward) took 25-70 ms.
- torch's kernel with fp32 activations sums in fp32 (within 2^-22 of sum |x w| of the exact
  product) but its time grows with the rows: one row 1.6-10.7 ms, against 25-70 for the
  reference, which it overtakes near 8 rows (`FP32_KERNEL_ROWS`); more rows take the reference.

torch's kernel computes (code - 8) * scale + offset per weight, so GPTQ's scale * (code - zero) is
offset = scale * (8 - zero), held with the scales in the activations' dtype; ours takes
scale * code - scale * zero in fp32. With act-order (`desc_act`, a permuted `g_idx`) the inputs
are put in group order once, here, and each row of inputs is gathered in that order before the
product. A layer neither kernel takes (a group size torch's has no kernel for, groups of unequal
sizes) keeps its own exact forward.
"""

from __future__ import annotations

import torch

from ..int4.linear import Int4Linear
from .cpu_kernels import CpuKernels

GROUP_SIZES = (32, 64, 128, 256)  # the group sizes the kernel takes
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INNER_K_TILES = 2
FP32_KERNEL_ROWS = 8  # fp32 products of this many rows or more take the layer's reference
# products of up to this many rows take our kernel (it decodes each code once for two rows): at 4
# and 8 rows of bf16 activations it led torch's kernel by 1.05-1.3x; with fp32 ones torch's kernel
# is the slower at any count
KERNEL_ROWS = {torch.bfloat16: 8, torch.float32: 8}
# where bf16 rows take AVX512-BF16 dot products: at 1 and 2 rows ours led torch's kernel (which has
# AVX-512 code there too) by 1.2-1.6x, at 4 and 8 rows it trailed (0.7-1.3x)
DOT_KERNEL_ROWS = 2


def int4_product(linear: Int4Linear, dtype: torch.dtype, kernels: CpuKernels | None = None):
    """A faster product of `linear` for activations in `dtype`, or None where its own forward is
    the one to use. `kernels`: our kernels, where they were built."""
    if dtype not in DTYPES or linear.qweight.device.type != "cpu":
        return None
    few_rows = CodesInPlace(linear, kernels) if kernels is not None and CodesInPlace.takes(linear) else None
    packed = PackedInt4(linear, dtype) if PackedInt4.takes(linear) else None
    if few_rows is None and packed is None:
        return None
    return Int4Products(linear, few_rows, packed)


class Int4Products:
    """Steps through our kernel, other products through torch's, or the layer's own forward."""

    def __init__(self, linear: Int4Linear, few_rows: CodesInPlace | None, packed: PackedInt4 | None):
        self.linear, self.few_rows, self.packed = linear, few_rows, packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.few_rows is not None and x.numel() <= self.few_rows.most_rows.get(x.dtype, 0) * x.shape[-1]:
            return self.few_rows(x)
        if self.packed is not None:
            return self.packed(x)
        return self.linear(x)


class CodesInPlace:
    """Our kernel over the layer's own codes, zero points and scales (fp16 ones as an fp32 copy)."""

    def __init__(self, linear: Int4Linear, kernels: CpuKernels):
        with torch.no_grad():
            scales = linear.scales.detach()
            self.scales = scales if scales.dtype in (torch.float32, torch.bfloat16) else scales.float()
            self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.qweight, self.qzeros, self.kernels = linear.qweight, linear.qzeros, kernels
        self.zero_offset = linear.settings.zero_offset
        self.group_size = linear.settings.group_width(linear.in_features)
        self.linear = linear
        # the most rows in each dtype that our kernel multiplies faster than torch's
        self.most_rows = dict(KERNEL_ROWS)
        if kernels.bf16_dot:
            self.most_rows[torch.bfloat16] = DOT_KERNEL_ROWS

    @staticmethod
    def takes(linear: Int4Linear) -> bool:
        width = linear.settings.group_width(linear.in_features)
        return (
            linear.out_features % 32 == 0
            and width % 8 == 0
            and linear.in_features % width == 0
            and linear.qweight.is_contiguous()
            and linear.qzeros.is_contiguous()
            and linear.scales.is_contiguous()
            and linear.ordered_groups()
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.bfloat16):
            return self.linear(x)
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = self.kernels.int4_product(
            rows, self.qweight, self.scales, self.qzeros, self.zero_offset, self.group_size, self.bias
        )
        return out.view(*x.shape[:-1], -1)


class PackedInt4:
    """`linear`'s codes in the int4 CPU kernel's layout, its scales and offsets in `dtype`."""

    @staticmethod
    def takes(linear: Int4Linear) -> bool:
        width = linear.settings.group_width(linear.in_features)
        if (
            width not in GROUP_SIZES
            or linear.in_features % width
            or linear.in_features % (INNER_K_TILES * 16)
        ):
            return False
        sizes = torch.bincount(linear.g_idx.long(), minlength=linear.groups)
        return bool((sizes == width).all())  # not act-order whose groups are not all `width` inputs

    def __init__(self, linear: Int4Linear, dtype: torch.dtype):
        with torch.no_grad():
            codes = linear.codes()  # [in, out]
            self.order = None
            if not linear.ordered_groups():
                self.order = torch.argsort(linear.g_idx, stable=True)
                codes = codes[self.order]
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes.t().contiguous().to(torch.int32), INNER_K_TILES
            )
            scales = linear.scales.float()
            offsets = scales * (8 - linear.zeros().float())
            self.scales_and_offsets = torch.stack([scales, offsets], dim=-1).to(dtype).contiguous()
        self.group_size = linear.settings.group_width(linear.in_features)
        self.dtype, self.linear = dtype, linear
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if x.dtype != self.dtype or (x.dtype == torch.float32 and rows.shape[0] >= FP32_KERNEL_ROWS):
            return self.linear(x)
        if self.order is not None:
            rows = rows[:, self.order]
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows.contiguous(), self.weight, self.group_size, self.scales_and_offsets
        )
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], -1)
