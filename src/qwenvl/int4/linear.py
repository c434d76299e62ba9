"""`Int4Linear`: a Linear whose weight stays packed in 4 bits (GPTQ's layout, `gptq.py`).

Its own `forward` is the reference product: the weight dequantized exactly (in fp32, where, with
fp16 or bf16 scales, scale * (code - zero) is exact: an 11-bit significand times a 4-bit integer),
rounded once to the input's dtype, then `F.linear`. So an Int4 model computes what its dequantized copy
computes (`dequantized`), to the last bit. The decode backends hold faster products of the same
weights (`decode/cpu_ops.py`, `decode/triton_ops.py`); the model only keeps the packed tensors.

Module and buffer names are the checkpoint's (`qweight`, `qzeros`, `scales`, `g_idx`, `bias`),
so a GPTQ state dict loads into it as it is. Floating tensors (scales, bias) take the model's
dtype like every other weight; the integer ones keep theirs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gptq import BITS, CODES_PER_WORD, GPTQSettings, unpack_rows, unpack_zeros


class Int4Linear(nn.Module):
    """y = x W^T + b with W [out, in] kept as GPTQ's 4-bit codes, zero points and scales."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        settings: GPTQSettings,
        bias: bool,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if size % CODES_PER_WORD:
                raise ValueError(
                    f"{name} {size} is not a multiple of {CODES_PER_WORD}, as GPTQ's packing needs"
                )
        self.in_features, self.out_features = in_features, out_features
        self.settings = settings
        groups, width = settings.groups(in_features), settings.group_width(in_features)
        self.register_buffer(
            "qweight", torch.zeros(in_features // CODES_PER_WORD, out_features, dtype=torch.int32)
        )
        self.register_buffer("qzeros", torch.zeros(groups, out_features // CODES_PER_WORD, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=dtype))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // width)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @property
    def groups(self) -> int:
        return self.scales.shape[0]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}, "
            f"bias={self.bias is not None}"
        )

    def codes(self) -> torch.Tensor:
        """The weight's codes [in, out] (uint8, 0..15)."""
        return unpack_rows(self.qweight)

    def zeros(self) -> torch.Tensor:
        """The zero points [groups, out] (uint8, 0..15)."""
        return unpack_zeros(self.qzeros, self.settings.zero_offset)

    def ordered_groups(self) -> bool:
        """Whether each group is `group_size` consecutive inputs (no act-order permutation)."""
        width = self.settings.group_width(self.in_features)
        expected = torch.arange(self.in_features, device=self.g_idx.device) // width
        return bool(torch.equal(self.g_idx.to(expected.dtype), expected))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] in `dtype`: computed exactly in fp32, then rounded once."""
        # unpacked from the transposed words, so that the codes come out [out, in], a Linear's
        # layout: the same BLAS call, hence the same sums, as the dequantized copy's
        words = self.qweight.t().contiguous()  # [out, in / 8]
        shifts = torch.arange(0, 32, BITS, dtype=torch.int32, device=words.device)
        codes = (words[:, :, None] >> shifts).bitwise_and_(0xF).view(self.out_features, self.in_features)
        groups = self.g_idx.long()
        scales = self.scales.float()
        offsets = scales * self.zeros().float()
        # each input's group's values, [out, in]: index_select over contiguous rows of groups
        scales, offsets = (t.t().contiguous().index_select(1, groups) for t in (scales, offsets))
        # scale * code - scale * zero: with fp16 or bf16 scales both products and their difference
        # are exact in fp32
        weight = torch.addcmul(offsets.neg_(), codes.float(), scales)
        return weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)


def dequantized(linear: Int4Linear, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain Linear with `linear`'s dequantized weight, in `dtype` (default: its scales')."""
    dtype = dtype or linear.scales.dtype
    plain = nn.Linear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        device=linear.qweight.device,
        dtype=dtype,
    )
    with torch.no_grad():
        plain.weight.copy_(linear.dequantize(dtype))
        if linear.bias is not None:
            plain.bias.copy_(linear.bias)
    return plain
