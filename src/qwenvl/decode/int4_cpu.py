"""The CPU backend's products of Int4 layers (`int4.Int4Linear`): torch's int4 CPU kernel
(`_weight_int4pack_mm_for_cpu`) over a copy of the codes in its layout, made when the backend is
built (half a byte a weight, as the layer's own).

Measured on two AVX2 EPYC cores (no native bf16), the mid config's shapes, each weight read from
memory (benchmarks: `python -m benchmarks.run --config mid --device cpu --int4`):

- bf16 activations, one row: 0.11-0.73 ms where F.linear over the dequantized bf16 weight takes
  0.27-1.57 (2.1-2.5x, 1024 x 1024 to 1024 x 8192); 8 rows 2.5-3.5x; 301 rows (a prompt) 2.8-3.5x.
  Each call dequantizing the weight first (the layer's reference forward) took 25-70 ms.
- fp32 activations: the kernel sums in fp32 (within 2^-22 of sum |x w| of the exact product),
  but its time grows with the rows: one row 1.6-10.7 ms, against 25-70 for the reference, which
  it overtakes near 8 rows (`FP32_KERNEL_ROWS`); more rows take the reference.
- not chosen: an inductor-compiled dequantize-and-sum over GPTQ's own layout (0.9-4.4 ms a
  row) and a hand-written AVX2 loop over it (0.3-1.6 ms), both slower than the kernel.

The kernel computes (code - 8) * scale + offset per weight, so GPTQ's scale * (code - zero) is
offset = scale * (8 - zero), held with the scales in the activations' dtype. With act-order
(`desc_act`, a permuted `g_idx`) the inputs are put in group order once, here, and each row of
inputs is gathered in that order before the product. A layer the kernel does not take (a group
size it has no kernel for, groups of unequal sizes) keeps its own exact forward.
"""

from __future__ import annotations

import torch

from ..int4.linear import Int4Linear

GROUP_SIZES = (32, 64, 128, 256)  # the group sizes the kernel takes
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INNER_K_TILES = 2
FP32_KERNEL_ROWS = 8  # fp32 products of this many rows or more take the layer's reference


def int4_product(linear: Int4Linear, dtype: torch.dtype):
    """A faster product of `linear` for activations in `dtype`, or None where its own forward is
    the one to use."""
    width = linear.settings.group_width(linear.in_features)
    if (
        dtype not in DTYPES
        or linear.qweight.device.type != "cpu"
        or width not in GROUP_SIZES
        or linear.in_features % width
        or linear.in_features % (INNER_K_TILES * 16)
    ):
        return None
    sizes = torch.bincount(linear.g_idx.long(), minlength=linear.groups)
    if not bool((sizes == width).all()):  # act-order whose groups are not all `width` inputs
        return None
    return PackedInt4(linear, dtype)


class PackedInt4:
    """`linear`'s codes in the int4 CPU kernel's layout, its scales and offsets in `dtype`."""

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
