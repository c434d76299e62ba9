"""The GPTQ checkpoint format, as AutoGPTQ writes it ("gptq", also called v1) and GPTQModel
("gptq_v2"): its settings, and how 4-bit codes and zero points are packed into int32 words.

A quantized Linear of `in` inputs and `out` outputs is stored as

- `qweight` int32 [in / 8, out]: word [r, o] holds the codes of inputs 8r..8r+7 for output o,
  input 8r + j in bits 4j..4j+3;
- `qzeros` int32 [groups, out / 8]: word [g, c] holds the zero points of outputs 8c..8c+7 in
  group g, output 8c + j in bits 4j..4j+3. v1 stores each as zero - 1 (modulo 16: AutoGPTQ's
  packing subtracts 1 and its kernels add it back), v2 stores the zero itself;
- `scales` [groups, out] (fp16 in the official checkpoints);
- `g_idx` int32 [in]: each input's group, i // group_size, or with `desc_act` (act-order) the
  group of the input's place in the order GPTQ quantized the inputs in;
- `bias` [out], where the layer has one (AutoGPTQ before 0.8 wrote zeros for layers without).

weight[o, i] = scales[g, o] * (code[i, o] - zero[g, o]), g = g_idx[i].
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

BITS = 4
CODES_PER_WORD = 32 // BITS
FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what is subtracted from a stored zero
# the LLM's Linears a GPTQ checkpoint of Qwen-VL quantizes, by their names inside a block
QUANTIZED_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


@dataclass(frozen=True)
class GPTQSettings:
    """quantize_config.json (or config.json's `quantization_config`): what loading needs of it."""

    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"
    bits: int = BITS

    @classmethod
    def from_dict(cls, data: Any) -> GPTQSettings:
        """The settings of a quantization config; ValueError naming a key this package cannot load."""
        if not isinstance(data, dict):
            raise ValueError(f"a quantization config must be a JSON object, not {type(data).__name__}")
        method = str(data.get("quant_method", "gptq")).lower()
        if method != "gptq":
            raise ValueError(f"quant_method {data.get('quant_method')!r} is not supported; only 'gptq' is")
        checkpoint_format = str(data.get("checkpoint_format", "gptq")).lower()
        if checkpoint_format not in FORMATS:
            raise ValueError(
                f"checkpoint_format {data.get('checkpoint_format')!r} is not supported; "
                f"expected one of {', '.join(FORMATS)}"
            )
        bits = data.get("bits", data.get("w_bit"))
        if bits != BITS:
            raise ValueError(f"bits {bits!r} is not supported; only 4-bit GPTQ checkpoints load")
        group_size = data.get("group_size", data.get("q_group_size", -1))
        if (
            not isinstance(group_size, int)
            or isinstance(group_size, bool)
            or not (group_size > 0 or group_size == -1)
        ):
            raise ValueError(f"group_size {group_size!r} must be a positive integer or -1 (one group)")
        return cls(
            group_size=group_size,
            desc_act=bool(data.get("desc_act", False)),
            sym=bool(data.get("sym", True)),
            checkpoint_format=checkpoint_format,
        )

    def to_dict(self) -> dict:
        """The keys AutoGPTQ writes to quantize_config.json, and transformers reads from config.json."""
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "true_sequential": True,
            "damp_percent": 0.01,
            "static_groups": False,
            "quant_method": "gptq",
            "checkpoint_format": self.checkpoint_format,
        }

    @property
    def zero_offset(self) -> int:
        """What the format subtracts from a zero point before storing it."""
        return FORMATS[self.checkpoint_format]

    def groups(self, in_features: int) -> int:
        """Groups of a layer of `in_features` inputs."""
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def linear_slots(model) -> Iterator[tuple[str, nn.Module, str]]:
    """(checkpoint name, parent module, attribute) of each LLM Linear a GPTQ checkpoint quantizes."""
    for index, block in enumerate(model.transformer.h):
        for path in QUANTIZED_LINEARS:
            parent_path, _, attribute = path.rpartition(".")
            yield f"transformer.h.{index}.{path}", block.get_submodule(parent_path), attribute


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64, as the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """Codes [in, out] (0..15) as qweight [in / 8, out]: input 8r + j in bits 4j of row r."""
    rows, out = codes.shape
    if rows % CODES_PER_WORD:
        raise ValueError(f"{rows} inputs: GPTQ packs eight to a word, so they must be a multiple of 8")
    grouped = codes.to(torch.int64).reshape(rows // CODES_PER_WORD, CODES_PER_WORD, out)
    shifts = torch.arange(0, 32, BITS, device=codes.device)[None, :, None]
    return _to_int32((grouped << shifts).sum(dim=1))


def unpack_rows(qweight: torch.Tensor) -> torch.Tensor:
    """qweight [in / 8, out] as codes [in, out] (uint8, 0..15)."""
    shifts = torch.arange(0, 32, BITS, device=qweight.device, dtype=torch.int32)[None, :, None]
    codes = (qweight[:, None, :] >> shifts) & 0xF  # an arithmetic shift: the mask drops the sign
    return codes.reshape(-1, qweight.shape[1]).to(torch.uint8)


def pack_columns(values: torch.Tensor) -> torch.Tensor:
    """Values [groups, out] (0..15) as words [groups, out / 8]: output 8c + j in bits 4j of column c."""
    groups, out = values.shape
    if out % CODES_PER_WORD:
        raise ValueError(f"{out} outputs: GPTQ packs eight zero points to a word, so a multiple of 8")
    grouped = values.to(torch.int64).reshape(groups, out // CODES_PER_WORD, CODES_PER_WORD)
    shifts = torch.arange(0, 32, BITS, device=values.device)
    return _to_int32((grouped << shifts).sum(dim=2))


def unpack_columns(words: torch.Tensor) -> torch.Tensor:
    """Words [groups, out / 8] as values [groups, out] (uint8, 0..15)."""
    shifts = torch.arange(0, 32, BITS, device=words.device, dtype=torch.int32)
    return ((words[:, :, None] >> shifts) & 0xF).reshape(words.shape[0], -1).to(torch.uint8)


def pack_zeros(zeros: torch.Tensor, zero_offset: int) -> torch.Tensor:
    """Zero points [groups, out] (0..15) as qzeros, each stored as zero - `zero_offset` modulo 16."""
    return pack_columns((zeros.to(torch.int64) - zero_offset) & 0xF)


def unpack_zeros(qzeros: torch.Tensor, zero_offset: int) -> torch.Tensor:
    """qzeros as zero points [groups, out] (uint8, 0..15)."""
    return ((unpack_columns(qzeros).to(torch.int16) + zero_offset) & 0xF).to(torch.uint8)
