"""One request through the serving engine against the same request through `generate`.

- `engine_decode`: decode tokens/s of one greedy request (`new_tokens` of them) through a fresh
  `Engine`, from its first token to its last. Its loop runs in this thread while a client thread
  submits, as `qwenvl serve` runs it; on a GPU a request alone is decoded through a graphed
  decoder from its first step (`Engine._steady`), whose capture counts here.
- the baseline, `generate_decode`: the same prompt, picture and parameters through
  `generation.stream_tokens` (what `model.generate` and `model.chat` run), timed the same way:
  its decoder's capture of its graph counts too.
- on a GPU also the engine with decode mode "static" (its steps never graphed), for
  `engine_graphs_speedup`.

Both run the device's default backend and kernel settings.
"""

from __future__ import annotations

import time

import torch

from qwenvl import QwenVLForCausalLM, QwenVLTokenizer
from qwenvl.decode import SamplingParams
from qwenvl.engine import Engine
from qwenvl.generation import stream_tokens

from .common import Timing
from .first_token import first_turn


def seconds_per_token(tokens) -> float:
    """Seconds per token of an iterator of tokens, after its first."""
    tokens = iter(tokens)
    next(tokens)
    start = time.perf_counter()
    count = sum(1 for _ in tokens)
    return (time.perf_counter() - start) / max(count, 1)


def engine_decode(
    model: QwenVLForCausalLM, tokenizer: QwenVLTokenizer, decode_mode: str, new_tokens: int, repeats: int
) -> Timing:
    """Seconds per token of one request in a fresh Engine (the first of `repeats` + 1 warms up)."""
    image, prompt = first_turn(tokenizer)
    params = SamplingParams(max_new_tokens=new_tokens)  # greedy; no end token: all new_tokens come
    engine = Engine(model, decode_mode=decode_mode)

    def requests() -> list[float]:
        return [seconds_per_token(engine.submit(prompt, params, images=[image])) for _ in range(repeats + 1)]

    return Timing(engine.run_while(requests)[1:])


def generate_decode(
    model: QwenVLForCausalLM, tokenizer: QwenVLTokenizer, new_tokens: int, repeats: int
) -> Timing:
    """Seconds per token of the same request through `stream_tokens` (the first run warms up)."""
    image, prompt = first_turn(tokenizer)
    params = SamplingParams(max_new_tokens=new_tokens)
    with torch.inference_mode():
        features = model.encode_images([image])
        samples = [
            seconds_per_token(stream_tokens(model, [prompt], params, features)) for _ in range(repeats + 1)
        ]
    return Timing(samples[1:])


def measure(model: QwenVLForCausalLM, tokenizer: QwenVLTokenizer, new_tokens: int, repeats: int) -> dict:
    """Tokens/s of one request through `generate`, the engine, and on a GPU the engine without graphs."""
    timings = {
        "generate": generate_decode(model, tokenizer, new_tokens, repeats),
        "engine": engine_decode(model, tokenizer, "auto", new_tokens, repeats),
    }
    if model.device.type == "cuda":
        timings["engine_static"] = engine_decode(model, tokenizer, "static", new_tokens, repeats)
    return {
        name: {**timing.as_dict(), "tokens_per_s": 1 / timing.median, "new_tokens": new_tokens}
        for name, timing in timings.items()
    }


def ratios(serving: dict) -> dict:
    decode = serving.get("engine_decode", {})
    return {
        "engine_over_generate_decode": (
            decode["engine"]["tokens_per_s"] / decode["generate"]["tokens_per_s"] if decode else None
        ),
        "engine_graphs_speedup": (
            decode["engine"]["tokens_per_s"] / decode["engine_static"]["tokens_per_s"]
            if "engine_static" in decode
            else None
        ),
    }


def table_rows(r: dict) -> list[tuple[str, float]]:
    decode = r.get("engine_decode", {})
    labels = {
        "generate": "one request through generate (tokens/s)",
        "engine": "one request through the engine (tokens/s)",
        "engine_static": "one request through the engine, no CUDA graphs (tokens/s)",
    }
    return [(labels[name], figures["tokens_per_s"]) for name, figures in decode.items()]
