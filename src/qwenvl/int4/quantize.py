"""Making an Int4 model: round-to-nearest quantization of the LLM's Linears into GPTQ's format, the
way back (`dequantize_model`), and `qwenvl quantize`, which writes a folder that loads as the
official Int4 checkpoint does.

Round-to-nearest, symmetric, as GPTQ's `sym` grid: per group of `group_size` inputs and per
output, scale = 2 * max|w| / 15 and zero point 8, code = clamp(round(w / scale) + 8, 0, 15). The
codes are rounded against the scale as stored (fp16 by default), so that dequantizing gives the
nearest grid point of the scale the checkpoint holds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil

import torch
from torch import nn

from .gptq import GPTQSettings, linear_slots, pack_rows, pack_zeros
from .linear import Int4Linear, dequantized

SYMMETRIC_ZERO = 8
OFFICIAL = GPTQSettings()  # as Qwen-VL-Chat-Int4: 4 bits, groups of 128, symmetric, no act-order
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# files of the source folder that the quantized folder gets anew (weights, their index, configs)
REWRITTEN = (
    r".*\.(safetensors|bin|pt|pth)",
    r".*\.index\.json",
    r"config\.json",
    r"generation_config\.json",
    r"quantize_config\.json",
)


def quantize_linear(linear: nn.Linear, settings: GPTQSettings, scale_dtype: torch.dtype) -> Int4Linear:
    """`linear` as an Int4Linear (round-to-nearest on the symmetric grid), on its device."""
    if not settings.sym:
        raise ValueError("only symmetric quantization (sym=True) is implemented")
    out_features, in_features = linear.weight.shape
    width = settings.group_width(in_features)
    if in_features % width:
        raise ValueError(f"a layer of {in_features} inputs cannot be cut into groups of {width}")
    groups = in_features // width
    weight = linear.weight.detach().float().reshape(out_features, groups, width)
    largest = weight.abs().amax(dim=-1)
    largest = torch.where(largest > 0, largest, torch.ones_like(largest))  # an all-zero group
    scales = (2 * largest / 15).to(scale_dtype)  # [out, groups]
    codes = torch.round(weight / scales.float()[..., None]) + SYMMETRIC_ZERO
    codes = codes.clamp_(0, 15).to(torch.uint8).reshape(out_features, in_features)
    with linear.weight.device:
        int4 = Int4Linear(
            in_features, out_features, settings, bias=linear.bias is not None, dtype=scale_dtype
        )
    zeros = torch.full((groups, out_features), SYMMETRIC_ZERO, device=codes.device)
    int4.qweight.copy_(pack_rows(codes.t()))
    int4.qzeros.copy_(pack_zeros(zeros, settings.zero_offset))
    int4.scales.copy_(scales.t())
    if linear.bias is not None:
        int4.bias.copy_(linear.bias.detach())
    return int4


@torch.no_grad()
def quantize_model(model, settings: GPTQSettings = OFFICIAL, scale_dtype: torch.dtype | None = None) -> int:
    """Replace the LLM's Linears by Int4Linears in place (scales in `scale_dtype`, default the
    model's dtype); marks the config as quantized. Returns how many layers were quantized."""
    scale_dtype = scale_dtype or model.dtype
    count = 0
    for _, parent, attribute in linear_slots(model):
        linear = getattr(parent, attribute)
        if isinstance(linear, Int4Linear):
            raise ValueError("the model is already quantized")
        if type(linear) is not nn.Linear:
            raise ValueError(
                f"cannot quantize a {type(linear).__name__} (merge adapters into the weights first)"
            )
        setattr(parent, attribute, quantize_linear(linear, settings, scale_dtype))
        count += 1
    model.config.quantization_config = settings.to_dict()
    return count


@torch.no_grad()
def dequantize_model(model, dtype: torch.dtype | None = None) -> int:
    """Replace each Int4Linear by a plain Linear holding its dequantized weight (in `dtype`, default
    the model's): the model the Int4 one computes exactly. Returns how many layers were replaced."""
    dtype = dtype or model.dtype
    count = 0
    for _, parent, attribute in linear_slots(model):
        linear = getattr(parent, attribute)
        if isinstance(linear, Int4Linear):
            setattr(parent, attribute, dequantized(linear, dtype))
            count += 1
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return count


def quantize_folder(
    source: str,
    target: str,
    settings: GPTQSettings = OFFICIAL,
    dtype: torch.dtype = torch.float16,
    max_shard_size: int = 4 * 2**30,
) -> int:
    """Write `target`: the checkpoint `source` (folder or hub id) with its LLM's Linears in 4 bits,
    the other weights in `dtype`, config.json's quantization_config and quantize_config.json, and
    the source's other files (tokenizer, ...). Returns how many layers were quantized."""
    from ..hub import resolve_model_folder
    from ..modeling import QwenVLForCausalLM

    folder = resolve_model_folder(source)
    if os.path.abspath(folder) == os.path.abspath(target):
        raise ValueError(f"the quantized checkpoint needs a folder of its own, not {source}")
    model = QwenVLForCausalLM.from_pretrained(folder, dtype=dtype, device_map="cpu")
    count = quantize_model(model, settings, scale_dtype=dtype)
    model.save_pretrained(target, max_shard_size=max_shard_size)
    with open(os.path.join(target, "quantize_config.json"), "w", encoding="utf-8") as f:
        json.dump(settings.to_dict(), f, indent=2)
        f.write("\n")
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not any(re.fullmatch(pattern, name) for pattern in REWRITTEN):
            shutil.copy2(path, os.path.join(target, name))
    return count


# -- the command ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="IN", help="the checkpoint to quantize: a folder or hub id")
    parser.add_argument("target", metavar="OUT", help="the folder to write the Int4 checkpoint to")
    parser.add_argument("--bits", type=int, choices=[4], default=4, help="bits per weight (4)")
    parser.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="inputs that share a scale (-1: all of a layer's; default 128)",
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="fp16",
        help="of the scales and the weights left unquantized (default fp16, as the official Int4 checkpoint)",
    )  # fmt: skip


def run_from_args(args: argparse.Namespace) -> int:
    settings = GPTQSettings.from_dict({"bits": args.bits, "group_size": args.group_size})
    count = quantize_folder(args.source, args.target, settings, DTYPES[args.dtype])
    print(f"wrote {args.target}: {count} layers in {args.bits} bits, groups of {args.group_size}")
    return 0
