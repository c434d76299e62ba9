"""The models the benchmarks time: the `tiny`, `mid` and `real` configs with random weights, their
prompt (one picture and a question in ChatML) and picture, and how many bytes a decode step reads.

Weight values do not change the speed, so every model is built in memory from the class's own
init, directly in the measured dtype and on the measured device (no fp32 or host copy).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from qwenvl import QwenVLConfig, QwenVLForCausalLM, QwenVLTokenizer, make_context
from qwenvl.chat_format import DEFAULT_SYSTEM

from .common import MID_CONFIG

TESTS_DATA = Path(__file__).parent.parent / "tests" / "data"
CONFIGS = ("tiny", "mid", "real")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUESTION = "What is in this picture? Describe the main objects, their colours and where they are."
MIB = 2**20


def model_config(name: str) -> dict:
    """`tiny`: the golden test checkpoint's config (hidden 128, 2 layers); `mid`: MID_CONFIG (490M
    parameters, for 2-core CPUs); `real`: Qwen-VL-Chat's shapes (9.6B parameters, for a GPU)."""
    if name == "tiny":
        return json.loads((TESTS_DATA / "golden" / "config.json").read_text())
    if name == "mid":
        return MID_CONFIG
    if name == "real":
        return json.loads((TESTS_DATA / "real-qwen-vl-chat" / "config.json").read_text())
    raise ValueError(f"unknown config {name!r}; expected one of {CONFIGS}")


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters created directly in `dtype`, so no fp32 copy raises the peak memory."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(config: dict, dtype: torch.dtype, device: torch.device | str = "cpu") -> QwenVLForCausalLM:
    torch.manual_seed(0)
    with default_dtype(dtype), torch.device(device):
        return QwenVLForCausalLM(QwenVLConfig.from_dict(config)).eval()


def prompt_ids(tokenizer: QwenVLTokenizer) -> list[int]:
    """One picture and a question in ChatML, with the system message `model.chat` sends (301 tokens)."""
    _, ids = make_context(tokenizer, f"Picture 1: <img>x.png</img>\n{QUESTION}", system=DEFAULT_SYSTEM)
    return ids


def picture(model: QwenVLForCausalLM, count: int = 1) -> torch.Tensor:
    """Random pixels [count, 3, S, S] on the model's device, in its dtype."""
    size = model.transformer.vision_config.image_size
    pixels = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))
    return pixels.to(model.device, model.dtype)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def llm_weight_bytes(model: QwenVLForCausalLM) -> int:
    """Bytes of weights one decode step reads: all but the vision tower and the embedding table."""
    transformer = model.transformer
    skipped = {id(p) for p in transformer.visual.parameters()} | {id(p) for p in transformer.wte.parameters()}
    from qwenvl.int4 import Int4Linear

    packed = [  # an Int4 layer's weights are buffers; g_idx is not read when groups are in order
        tensor
        for module in transformer.h.modules()
        if isinstance(module, Int4Linear)
        for name, tensor in module.named_buffers()
        if name != "g_idx"
    ]
    return tensor_bytes([*(p for p in model.parameters() if id(p) not in skipped), *packed])


INT4 = "int4"  # what the runs call the Int4 model: bf16 activations, the LLM's Linears in 4 bits


def build_measured_model(config: dict, name: str, device: torch.device | str = "cpu") -> QwenVLForCausalLM:
    """The model a run measures as `name`: a dtype of `DTYPES`, or `INT4`: the bf16 model with its
    LLM's Linears quantized (round-to-nearest, groups of 128) as Qwen-VL-Chat-Int4 lays them out,
    the LM head, embeddings and vision tower left in bf16."""
    if name != INT4:
        return build_model(config, DTYPES[name], device)
    from qwenvl.int4 import GPTQSettings, quantize_model

    model = build_model(config, torch.bfloat16, device)
    quantize_model(model, GPTQSettings(group_size=128))
    return model


def model_bytes(model: QwenVLForCausalLM) -> int:
    """Bytes the loaded model holds: its parameters and buffers (packed codes included)."""
    return tensor_bytes([*model.parameters(), *model.buffers()])
