"""Loading a GPTQ (Int4) checkpoint: which of the model's Linears become `Int4Linear`s, before
the weights are read, and the checks on what was read.

A folder is quantized when its config.json has a `quantization_config` or the folder has a
quantize_config.json (AutoGPTQ's); when both are there they must agree. Which layers are
quantized, and which have a bias, is read from the checkpoint's tensor names (`.qweight`,
`.bias`): the official Qwen-VL-Chat-Int4 stores a bias for every quantized layer, zeros for the
layers the model has none for, and newer quantizers store none there.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..loading import WEIGHT_INDEXES, CheckpointError, read_weight_map
from .gptq import QUANTIZED_LINEARS, GPTQSettings, linear_slots
from .linear import Int4Linear

QUANTIZE_CONFIG = "quantize_config.json"


def read_settings(folder: str, config) -> GPTQSettings | None:
    """The folder's GPTQ settings, or None for an unquantized checkpoint."""
    sources = {}
    embedded = getattr(config, "quantization_config", None)
    if embedded is not None:
        to_dict = getattr(embedded, "to_dict", None)  # a transformers QuantizationConfig object
        sources["config.json's quantization_config"] = to_dict() if callable(to_dict) else embedded
    path = os.path.join(folder, QUANTIZE_CONFIG)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                sources[path] = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    settings = {}
    for source, data in sources.items():
        try:
            settings[source] = GPTQSettings.from_dict(data)
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from e
    distinct = set(settings.values())
    if len(distinct) > 1:
        described = "; ".join(f"{source} says {value}" for source, value in settings.items())
        raise CheckpointError(f"the quantization configs of {folder} disagree: {described}")
    return distinct.pop() if distinct else None


def tensor_names(folder: str, files: list[str]) -> set[str]:
    """Every tensor name of the checkpoint, from its index when sharded, else from its file's header."""
    for index_name in WEIGHT_INDEXES:
        index_path = os.path.join(folder, index_name)
        if os.path.exists(index_path):
            return set(read_weight_map(index_path))
    names: set[str] = set()
    for path in files:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                names.update(f.keys())
        else:  # mapped, not read: only the names are needed
            names.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return names


def use_int4_layers(model, settings: GPTQSettings, names: set[str]) -> int:
    """Replace each LLM Linear whose `.qweight` the checkpoint holds by an `Int4Linear` (on the
    Linear's device, typically meta); returns how many. The checkpoint must quantize some layer."""
    replaced = 0
    for prefix, parent, attribute in linear_slots(model):
        if f"{prefix}.qweight" not in names:
            continue
        linear: nn.Linear = getattr(parent, attribute)
        with linear.weight.device:
            int4 = Int4Linear(
                linear.in_features,
                linear.out_features,
                settings,
                bias=f"{prefix}.bias" in names,
                dtype=linear.weight.dtype,
            )
        setattr(parent, attribute, int4)
        replaced += 1
    if not replaced:
        shown = ", ".join(f"transformer.h.N.{p}.qweight" for p in QUANTIZED_LINEARS)
        raise CheckpointError(f"the checkpoint is marked quantized but holds none of {shown}")
    return replaced


def prepare(model, folder: str, files: list[str]) -> GPTQSettings | None:
    """Before loading: Int4 layers where the folder's checkpoint is quantized. None: it is not."""
    settings = read_settings(folder, model.config)
    if settings is not None:
        use_int4_layers(model, settings, tensor_names(folder, files))
        # kept in the config, so that save_pretrained writes a folder that loads as Int4 again
        if getattr(model.config, "quantization_config", None) is None:
            model.config.quantization_config = settings.to_dict()
    return settings


def check_loaded(model) -> None:
    """After loading: every Int4 layer's tensors are of the format's kinds, its groups in range."""
    for name, module in model.named_modules():
        if not isinstance(module, Int4Linear):
            continue
        for tensor_name in ("qweight", "qzeros", "g_idx"):
            tensor = getattr(module, tensor_name)
            if tensor.dtype != torch.int32:
                raise CheckpointError(
                    f"{name}.{tensor_name} is {tensor.dtype} in the checkpoint; GPTQ stores it as int32"
                )
        g_idx = module.g_idx
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= module.groups):
            raise CheckpointError(
                f"{name}.g_idx names groups {int(g_idx.min())}..{int(g_idx.max())}; "
                f"the layer has {module.groups} (0..{module.groups - 1})"
            )
