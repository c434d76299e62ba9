"""Deterministic random-weight checkpoints in the official layout, for tests, demos and benchmarks.

The rule is the golden checkpoints' (shared/golden/README): tensors are generated in sorted-name
order, the k-th from numpy RandomState(seed + k); norm weights are 1 + 0.1 N(0,1), everything
else 0.02 N(0,1), fp32. Names and shapes come from the model itself, built on the meta device.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np
import torch

from .config import QwenVLConfig

NORM_MODULES = ("ln_1", "ln_2", "ln_f", "ln_pre", "ln_post", "ln_q", "ln_kv")
GENERATION_CONFIG = {
    "chat_format": "chatml",
    "do_sample": True,
    "eos_token_id": 151643,
    "max_new_tokens": 512,
    "max_window_size": 6144,
    "pad_token_id": 151643,
    "top_k": 0,
    "top_p": 0.3,
}
TOKENIZER_CONFIG = {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer"}


def parameter_shapes(config: QwenVLConfig | dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a checkpoint for `config` (the model's own state dict)."""
    from .modeling import QwenVLForCausalLM

    if isinstance(config, dict):
        config = QwenVLConfig.from_dict(config)
    with torch.device("meta"):
        model = QwenVLForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def random_state_dict(config: QwenVLConfig | dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    state = {}
    for k, (name, shape) in enumerate(sorted(parameter_shapes(config).items())):
        noise = np.random.RandomState(seed + k).standard_normal(shape)
        is_norm = name.endswith(".weight") and name.split(".")[-2] in NORM_MODULES
        state[name] = torch.from_numpy((1.0 + 0.1 * noise if is_norm else 0.02 * noise).astype(np.float32))
    return state


def save_weights(state: dict[str, torch.Tensor], folder: str, shards: int = 1, fmt: str = "bin") -> list[str]:
    """Write `state` as one file or `shards` files plus an index, in .bin or safetensors format."""
    if fmt not in ("bin", "safetensors"):
        raise ValueError(f"unknown weight format {fmt!r}")
    stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    names = sorted(state)
    groups = [names[i::shards] for i in range(shards)] if shards > 1 else [names]
    weight_map, written = {}, []
    for i, group in enumerate(groups, 1):
        filename = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i:05d}-of-{shards:05d}.{ext}"
        part = {n: state[n].contiguous() for n in group}
        path = os.path.join(folder, filename)
        if fmt == "bin":
            torch.save(part, path)
        else:
            from safetensors.torch import save_file

            save_file(part, path, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, filename))
        written.append(path)
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(folder, f"{stem}.{ext}.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return written


def build_checkpoint(
    config: dict[str, Any], folder: str, seed: int, shards: int = 1, fmt: str = "bin"
) -> str:
    """A complete model folder: config, generation and tokenizer configs, vocabulary, weights."""
    from .tokenizer import packaged_vocab_file

    os.makedirs(folder, exist_ok=True)
    for name, data in (
        ("config.json", config),
        ("generation_config.json", GENERATION_CONFIG),
        ("tokenizer_config.json", TOKENIZER_CONFIG),
    ):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(data, f, indent=2)
    shutil.copy(packaged_vocab_file(), os.path.join(folder, "qwen.tiktoken"))
    save_weights(random_state_dict(config, seed), folder, shards, fmt)
    return folder
