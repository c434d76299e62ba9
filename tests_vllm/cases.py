"""The chat cases of the vLLM plugin's tests, the checkpoint they run on, and how both sides run them.

The checkpoint is the golden tiny config with two changes that make the cases test what they
claim. Its attention projections are 20 times the random rule's scale: at 0.02 the attention is
near uniform, and the greedy tokens come out the same with NTK or log-n switched off, which would
let a wrong rotation pass. And its `seq_length` sits 4 tokens past the short text prompt, so that
prompt is prefilled with NTK alpha 1 and its decoding steps cross into log-n scaling, while every
other case is prefilled past `seq_length` (`test_the_cases_depend_on_ntk_and_logn` checks both).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import torch

IMAGES = Path(__file__).parent.parent / "tests" / "data" / "images"
GOLDEN_CONFIG = Path(__file__).parent.parent / "tests" / "data" / "golden" / "config.json"
SEED = 7
ATTENTION_SHARPNESS = 20.0
NEW_TOKENS = 12
# a Qwen-VL-Chat checkpoint's tokenizer_config.json names remote code; loading must not need it
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


SHAPES, TEXTURE = data_url(IMAGES / "shapes.png"), data_url(IMAGES / "texture.png")
SHORT_TEXT = "Describe a sunny day at the beach."
# A case: (system or None, history [(user parts, reply)], user parts); parts in qwenvl's list format
CASES = {
    "text": (None, [], [{"text": SHORT_TEXT}]),
    "long_text": (None, [], [{"text": " ".join(f"item{i}" for i in range(60))}]),
    "one_image": (None, [], [{"image": SHAPES}, {"text": "What is in the picture?"}]),
    "two_images": (None, [], [{"image": SHAPES}, {"image": TEXTURE}, {"text": "Compare them."}]),
    "history": (
        "You answer briefly.",
        [([{"image": TEXTURE}, {"text": "What is this?"}], "A texture of <ref>bricks</ref>.")],
        [{"text": "And its colour?"}],
    ),
}


def openai_messages(case: tuple) -> list[dict]:
    """The case as OpenAI chat messages, pictures as `image_url` data URLs."""
    system, history, query = case

    def user(parts: list[dict]) -> dict:
        content = [
            {"type": "image_url", "image_url": {"url": p["image"]}}
            if "image" in p
            else {"type": "text", "text": p["text"]}
            for p in parts
        ]
        return {"role": "user", "content": content}

    messages = [{"role": "system", "content": system}] if system else []
    for parts, reply in history:
        messages += [user(parts), {"role": "assistant", "content": reply}]
    return [*messages, user(query)]


class TokenRecorder:
    """A transformers streamer that keeps what `model.chat` feeds it: the prompt, then each token."""

    def __init__(self):
        self.prompt: list[int] = []
        self.tokens: list[int] = []

    def put(self, value) -> None:
        ids = torch.as_tensor(value).flatten().tolist()
        if not self.prompt:
            self.prompt = ids
        else:
            self.tokens += ids

    def end(self) -> None:
        pass


def chat_reference(model, tokenizer, case: tuple) -> dict:
    """qwenvl's greedy `model.chat` reply to the case: its prompt ids, token ids and text."""
    system, history, query = case
    turns = [(tokenizer.from_list_format(parts), reply) for parts, reply in history]
    recorder = TokenRecorder()
    kwargs = {"system": system} if system else {}
    response, _ = model.chat(
        tokenizer,
        tokenizer.from_list_format(query),
        history=turns,
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        streamer=recorder,
        **kwargs,
    )
    return {"prompt": recorder.prompt, "tokens": recorder.tokens, "response": response}


def build_sharp_checkpoint(folder: Path, config: dict) -> Path:
    """The official layout (two .bin shards and an index), random weights by the golden rule with
    the LLM's attention projections scaled up."""
    from qwenvl.random_checkpoint import GENERATION_CONFIG, TOKENIZER_CONFIG, random_state_dict, save_weights
    from qwenvl.tokenizer import packaged_vocab_file

    folder.mkdir(parents=True)
    tokenizer_config = {**TOKENIZER_CONFIG, "auto_map": TOKENIZER_AUTO_MAP}
    for name, data in (
        ("config.json", config),
        ("generation_config.json", GENERATION_CONFIG),
        ("tokenizer_config.json", tokenizer_config),
    ):
        (folder / name).write_text(json.dumps(data, indent=2))
    shutil.copy(packaged_vocab_file(), folder / "qwen.tiktoken")
    state = random_state_dict(config, SEED)
    for name, tensor in state.items():
        if name.startswith("transformer.h.") and name.endswith(".attn.c_attn.weight"):
            tensor.mul_(ATTENTION_SHARPNESS)
    save_weights(state, str(folder), shards=2)
    return folder


def short_prompt_length() -> int:
    from qwenvl import QwenVLTokenizer, make_context
    from qwenvl.chat_format import DEFAULT_SYSTEM

    tokenizer = QwenVLTokenizer()
    return len(make_context(tokenizer, SHORT_TEXT, system=DEFAULT_SYSTEM)[1])


def vllm_engine_options() -> dict:
    """What every engine of these tests is given: fp32 as the reference, a small KV cache (on CPU
    vLLM otherwise reserves most of the machine's memory), no compilation (eager is what is tested,
    and compiling costs minutes on two cores)."""
    return {
        "dtype": "float32",
        "max_model_len": 1024,
        "kv_cache_memory_bytes": 64 * 2**20,
        "enforce_eager": True,
    }


def cpu_binding(tensor_parallel: int) -> dict[str, str]:
    """The environment for `tensor_parallel` CPU workers on one NUMA node: one core each (vLLM
    binds a worker per NUMA node by itself, and refuses two workers on one node)."""
    cores = sorted(os.sched_getaffinity(0))
    if tensor_parallel == 1:
        return {}
    share = len(cores) // tensor_parallel
    groups = [cores[i * share : (i + 1) * share] for i in range(tensor_parallel)]
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, group)) for group in groups)}


IMG, IMG_END, PAD = 151857, 151858, 151859


def blank_spans(ids: list[int]) -> list[int]:
    """Ids with each image span's reference bytes as pads: the model never sees them."""
    out, inside = [], False
    for token in ids:
        inside = token == IMG or (inside and token != IMG_END)
        out.append(PAD if inside and token != IMG else token)
    return out
