"""Time to first token: a picture encoded and the prompt prefilled, through the fast path against
the baseline; a conversation's second turn with its prefix reused against without.

- `measure`: the picture through `vision_graphs.encode_pixels` (on a GPU the vision tower replayed
  as a CUDA graph), the prompt through the fast decoder's prefill, and its first greedy token read
  by the host; the baseline is the tower's forward from Python (`graphed=False`) and the baseline
  decoder's prefill (`decode_speed.BASELINE`). On CPU the two differ in the prefill's backend only.
- `second_turn_timings`: the first token of a conversation's second turn about the same picture in
  a fresh `Engine`, with prefix reuse (`prefix_cache_entries=8`) against without (0). The engine's
  loop runs in this thread while a client thread talks to it, as `qwenvl serve` runs it.
- `chat_second_turn_timings`: the same turn (one new token) through `model.chat`, with a
  `PrefixCache` passed to both turns against without one.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from qwenvl import PrefixCache, QwenVLForCausalLM, QwenVLTokenizer, make_context
from qwenvl.chat_format import DEFAULT_SYSTEM
from qwenvl.decode import SamplingParams
from qwenvl.engine import Engine
from qwenvl.vision_graphs import encode_pixels, graphable

from .common import Timing, timed
from .decode_speed import BASELINE, DecodePath

FIRST_QUESTION = "Picture 1: <img>x.png</img>\nWhat is in this picture?"
SECOND_QUESTION = "What colour is it, and is there anything else in the picture?"


def first_token(
    model: QwenVLForCausalLM, prompt: list[int], pixels: torch.Tensor, path: DecodePath, graphed: bool
) -> int:
    """The prompt's first greedy token: its picture encoded, the prompt prefilled by `path`'s decoder."""
    features = encode_pixels(model.transformer.visual, pixels, graphed=graphed)
    logits = path.decoder(model, 1, len(prompt) + 1).prefill([prompt], features)
    return int(logits.argmax(-1)[0])


@torch.inference_mode()
def measure(
    model: QwenVLForCausalLM, prompt: list[int], pixels: torch.Tensor, fast: DecodePath, repeats: int
) -> dict:
    """Image encoding and time to first token, the fast path's and the baseline's."""
    device, visual = model.device, model.transformer.visual
    result = {
        "prompt_tokens": len(prompt),
        "image_encode_per_image": timed(
            lambda: encode_pixels(visual, pixels), device, repeats=repeats
        ).as_dict(),
    }
    if graphable(visual, pixels):  # the tower's forward from Python, where a graph replays it
        result["image_encode_per_image_eager"] = timed(
            lambda: visual(pixels), device, repeats=repeats
        ).as_dict()
    for name, path, graphed in (("", fast, True), ("_baseline", BASELINE, False)):
        timing = timed(
            lambda p=path, g=graphed: first_token(model, prompt, pixels, p, g), device, repeats=repeats
        )
        result[f"time_to_first_token{name}"] = timing.as_dict()
    return result


# -- a conversation's second turn -------------------------------------------------------------------


def first_turn(tokenizer: QwenVLTokenizer) -> tuple[Image.Image, list[int]]:
    """The picture and the prompt of a conversation's first turn."""
    _, prompt = make_context(tokenizer, FIRST_QUESTION, system=DEFAULT_SYSTEM)
    return Image.new("RGB", (448, 448), "red"), prompt


def first_token_latency(handle) -> float:
    """Seconds from now until `handle` yields its first token (the rest is drained)."""
    start = time.perf_counter()
    tokens = iter(handle)
    next(tokens)
    elapsed = time.perf_counter() - start
    for _ in tokens:
        pass
    return elapsed


def second_turn(
    model: QwenVLForCausalLM, tokenizer: QwenVLTokenizer, prefix_entries: int, reply_tokens: int
) -> tuple[float, int]:
    """(time to first token of turn 2, prompt tokens the engine reused) in a fresh Engine."""
    image, first = first_turn(tokenizer)
    engine = Engine(model, prefix_cache_entries=prefix_entries)

    def conversation() -> tuple[float, int]:
        handle = engine.submit(first, SamplingParams(max_new_tokens=reply_tokens), images=[image])
        reply = tokenizer.decode(list(handle))
        history = [(FIRST_QUESTION, reply)]
        _, second = make_context(tokenizer, SECOND_QUESTION, history=history, system=DEFAULT_SYSTEM)
        handle = engine.submit(second, SamplingParams(max_new_tokens=1), images=[image])
        return first_token_latency(handle), handle.reused_tokens

    return engine.run_while(conversation)


def second_turn_timings(
    model: QwenVLForCausalLM, tokenizer: QwenVLTokenizer, repeats: int, reply_tokens: int = 8
) -> dict:
    out = {}
    for name, entries in (("reuse", 8), ("no_reuse", 0)):
        runs = [second_turn(model, tokenizer, entries, reply_tokens) for _ in range(repeats + 1)][1:]
        out[name] = {**Timing([t for t, _ in runs]).as_dict(), "reused_tokens": runs[0][1]}
    return out


def chat_second_turn(
    model: QwenVLForCausalLM, tokenizer: QwenVLTokenizer, reuse: bool, reply_tokens: int
) -> float:
    """Seconds of `model.chat`'s second turn (one new token) about a picture file."""
    image, _ = first_turn(tokenizer)
    options = {"do_sample": False, "prefix_cache": PrefixCache() if reuse else None}
    with tempfile.TemporaryDirectory(prefix="qwenvl-benchmark-") as folder:
        path = Path(folder) / "red.png"
        image.save(path)
        first = FIRST_QUESTION.replace("x.png", str(path))
        _, history = model.chat(tokenizer, first, max_new_tokens=reply_tokens, **options)
        start = time.perf_counter()
        model.chat(tokenizer, SECOND_QUESTION, history=history, max_new_tokens=1, **options)
        return time.perf_counter() - start


def chat_second_turn_timings(
    model: QwenVLForCausalLM, tokenizer: QwenVLTokenizer, repeats: int, reply_tokens: int = 8
) -> dict:
    return {
        name: Timing(
            [chat_second_turn(model, tokenizer, reuse, reply_tokens) for _ in range(repeats + 1)][1:]
        ).as_dict()
        for name, reuse in (("reuse", True), ("no_reuse", False))
    }


# -- the run's figures ------------------------------------------------------------------------------


def ratios(dtypes: dict[str, dict], serving: str) -> dict:
    """First token, fast path over baseline (in the `serving` dtype and in each), and the second
    turn's speedups from reuse."""
    speedups = {
        name: r["time_to_first_token_baseline"]["median_s"] / r["time_to_first_token"]["median_s"]
        for name, r in dtypes.items()
    }
    turn, chat = dtypes[serving].get("second_turn"), dtypes[serving].get("chat_second_turn")
    return {
        "first_token_speedup_vs_baseline": speedups[serving],
        "first_token_speedup_vs_baseline_per_dtype": speedups,
        "second_turn_speedup": turn["no_reuse"]["median_s"] / turn["reuse"]["median_s"] if turn else None,
        "chat_second_turn_speedup": chat["no_reuse"]["median_s"] / chat["reuse"]["median_s"]
        if chat
        else None,
    }


def table_rows(r: dict) -> list[tuple[str, float]]:
    """(figure, value) of one dtype's first-token results, in display units."""
    rows = [("image encode, per image (ms)", r["image_encode_per_image"]["median_s"] * 1e3)]
    if "image_encode_per_image_eager" in r:
        rows.append(
            ("image encode, tower from Python (ms)", r["image_encode_per_image_eager"]["median_s"] * 1e3)
        )
    tokens = r["prompt_tokens"]
    rows += [
        (
            f"time to first token, 1 image + question = {tokens} tokens (ms)",
            r["time_to_first_token"]["median_s"] * 1e3,
        ),
        ("time to first token, baseline (ms)", r["time_to_first_token_baseline"]["median_s"] * 1e3),
    ]
    if "second_turn" in r:
        turn = r["second_turn"]
        rows += [
            ("turn 2 first token in the engine, prefix reused (ms)", turn["reuse"]["median_s"] * 1e3),
            ("turn 2 first token in the engine, whole prompt (ms)", turn["no_reuse"]["median_s"] * 1e3),
        ]
    if "chat_second_turn" in r:
        chat = r["chat_second_turn"]
        rows += [
            ("model.chat turn 2, one token, PrefixCache (ms)", chat["reuse"]["median_s"] * 1e3),
            ("model.chat turn 2, one token, whole prompt (ms)", chat["no_reuse"]["median_s"] * 1e3),
        ]
    return rows
