"""One benchmark run: decode fast path vs a growing-cache eager baseline, dtypes, batching, prefix reuse.

Run: .venv/bin/python -m benchmarks.run --config tiny|mid|real --device cpu|cuda [--compile] [--no-fused]
     [--sdpa-decode] [--no-matvec] [--no-dependent-launch] [--settings JSON] [--dtypes fp32 bf16]
     [--batch-sizes 8 32 64] [--engine-tokens 64] [--[no-]load-time] [--threads N] [--json PATH]

The model has random weights (values do not change the speed); each dtype is measured in a
process of its own. Every ratio compares figures measured in this same run, on this same machine:

- decode_speedup_vs_eager: batch-1 greedy decode tokens/s of the fast path (a DecodeRunner over a
  preallocated KVCache: on CUDA the step with fused_decode's kernels captured as a CUDA graph, on
  CPU the static eager step; torch.compile with --compile) over the straightforward baseline
  (decode_step over a cache that grows by torch.cat); both must choose the same greedy tokens. In
  the dtype models load in by default on the device (fp32 on CPU, bf16 on CUDA); every dtype's in
  decode_speedup_vs_eager_per_dtype.
- bf16_over_fp32_decode: batch-1 fast-path decode tokens/s, bf16 over fp32.
- batchN_over_batch1_throughput (N of --batch-sizes): fast-path decode tokens/s of N rows over
  1 row, bf16.
- second_turn_speedup: time to first token of a conversation's second turn about the same image,
  without prefix reuse over with it (Engine with prefix_cache_entries=0 vs > 0), bf16;
  chat_second_turn_speedup the same through model.chat, without a PrefixCache over with one.
- decode_roofline_fraction: bytes of LLM weights read per decode step x tokens/s over the memory
  bandwidth of a large tensor copy (the higher of a reading before the models and one after),
  bf16 (per dtype in decode_roofline_fraction_per_dtype).
- engine_over_fast_path_decode: batch-1 decode tokens/s of one request through the serving
  Engine (its default decode mode: on CUDA a steady batch's step replayed as a CUDA graph) over
  the fast path's, bf16; on CUDA also engine_graphs_speedup, the Engine with graphs over the
  Engine without them (decode_mode "static").
- first_token_graph_speedup (CUDA): time to first token with the vision tower launched from
  Python over with it replayed as a CUDA graph (vision_graphs.encode_pixels), bf16.

Besides the ratios: image encoding, time to first token, decode tokens/s per batch size, the
second turn's latency, peak memory, and (`--load-time`, on by default but for real) the seconds
`from_pretrained` takes to load a checkpoint of the config in each dtype.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from qwenvl import PrefixCache, QwenVLConfig, QwenVLForCausalLM, QwenVLTokenizer, fused_decode, make_context
from qwenvl.cache import KVCache
from qwenvl.chat_format import DEFAULT_SYSTEM
from qwenvl.config import LLMConfig
from qwenvl.engine import Engine
from qwenvl.generation import SamplingParams, choose_tokens, decode_step, prefill, tokens_a_step_ahead
from qwenvl.static_decode import DecodeRunner, fuses_by_default
from qwenvl.vision_graphs import encode_pixels, graphable

from . import tuned
from .common import (
    Timing,
    add_json_option,
    json_path,
    markdown_table,
    peak_rss_bytes,
    run_isolated,
    save_record,
    time_call,
)
from .load_memory import measure_load, write_checkpoint
from .model_speed import DTYPES, GREEDY, MIB, default_dtype, load_config, prompt_ids, tensor_bytes

REAL_CONFIG = Path(__file__).parent.parent / "tests" / "data" / "real-qwen-vl-chat" / "config.json"
FIRST_QUESTION = "Picture 1: <img>x.png</img>\nWhat is in this picture?"
SECOND_QUESTION = "What colour is it, and is there anything else in the picture?"
EQUAL_STEPS = 16


class GrowingCache:
    """The straightforward KV cache: each write appends its keys and values with torch.cat.

    It offers the model what KVCache offers (lengths, ntk_alpha, inv_freq, empty, positions, write,
    view), for rows that all have the same length (the baseline decodes copies of one prompt).
    """

    def __init__(self, cfg: LLMConfig, batch_size: int, device: torch.device | str = "cpu"):
        self.num_layers = cfg.num_hidden_layers
        self.keys: list[torch.Tensor | None] = [None] * cfg.num_hidden_layers
        self.values: list[torch.Tensor | None] = [None] * cfg.num_hidden_layers
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.ntk_alpha = torch.ones(batch_size, dtype=torch.float32, device=device)
        self.inv_freq = torch.zeros(batch_size, cfg.rotary_dim // 2, dtype=torch.float32, device=device)
        self.empty = True

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        """Room for one more token than is stored: the cache grows as it is written."""
        stored = self.keys[0]
        return (0 if stored is None else stored.shape[2]) + 1

    def positions(self, new_tokens: int) -> torch.Tensor:
        steps = torch.arange(new_tokens, device=self.lengths.device)
        return self.lengths[:, None] + steps

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k, v [B, heads, L, d]; `positions` must follow what is stored (equal-length rows)."""
        stored = self.keys[layer]
        if stored is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([stored, k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)

    def view(self, layer: int, kv_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][:, :, :kv_length], self.values[layer][:, :, :kv_length]


# -- helpers ----------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> Timing:
    """time_call that waits for the device at the end of every call."""

    def call() -> None:
        fn()
        synchronize(device)

    return time_call(call, warmup=warmup, repeats=repeats)


def model_config(name: str) -> dict:
    if name == "real":
        return json.loads(REAL_CONFIG.read_text())
    return load_config(name)


def build_model(config: dict, dtype: torch.dtype, device: torch.device) -> QwenVLForCausalLM:
    """Random weights created directly on `device` in `dtype` (no fp32 or host copy)."""
    torch.manual_seed(0)
    with default_dtype(dtype), device:
        return QwenVLForCausalLM(QwenVLConfig.from_dict(config)).eval()


def llm_weight_bytes(model: QwenVLForCausalLM) -> int:
    """Bytes of weights one decode step reads: all but the vision tower and the embedding table."""
    transformer = model.transformer
    skipped = {id(p) for p in transformer.visual.parameters()} | {id(p) for p in transformer.wte.parameters()}
    return tensor_bytes(p for p in model.parameters() if id(p) not in skipped)


def memory_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s of copying a large tensor (read + write = 2 x its size)."""
    source = torch.ones(megabytes * MIB // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    timing = timed(lambda: target.copy_(source), device, warmup=1, repeats=repeats)
    return 2 * tensor_bytes([source]) / timing.median


# -- decoding ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FastPath:
    """The decode runner a run measures against the eager baseline."""

    mode: str  # a DecodeRunner mode
    fused: bool | None = None  # fused_decode's kernels; None: wherever they run (CUDA with Triton)
    # fused_decode.FLASH_DECODING for every decode step, the baseline's too; False: SDPA
    flash_decoding: bool | None = None
    # fused_decode.MATVEC for every one-row decode step, the baseline's too; False: cuBLAS
    matvec: bool | None = None
    # fused_decode's settings (benchmarks.tuned's, DEPENDENT_LAUNCH among them) for every decode
    # step, the baseline's too
    settings: dict | None = field(default=None, compare=False)

    def runner(self, model: QwenVLForCausalLM, cache: KVCache) -> DecodeRunner:
        return DecodeRunner(model, cache, self.mode, self.fused)

    def fuses(self, device: torch.device) -> bool:
        return fuses_by_default(self.mode, device) if self.fused is None else self.fused


def decode_run(
    model: QwenVLForCausalLM,
    prompt: list[int],
    features: torch.Tensor | None,
    batch: int,
    fast: FastPath | None,
    *,
    warmup: int,
    steps: int,
    capacity: int,
) -> tuple[Timing, list[list[int]]]:
    """Per-step timing of greedy decoding `batch` copies of the prompt, and every row's tokens.

    fast None: the eager baseline (decode_step over a GrowingCache); otherwise its runner over a
    KVCache of `capacity` (the same in every call, so a compiled step compiles once per batch
    size). The prefill is not timed.
    """
    param = next(model.parameters())
    llm = model.transformer.llm_config
    if fast is None:
        cache = GrowingCache(llm, batch, param.device)

        def advance(tokens: torch.Tensor) -> torch.Tensor:
            return decode_step(model, tokens, cache)

    else:
        cache = KVCache(llm, batch, capacity, param.dtype, param.device)
        advance = fast.runner(model, cache)
    with torch.inference_mode():
        rows_features = None if features is None else features.repeat(batch, 1, 1)
        logits = prefill(model, [prompt] * batch, cache, rows_features)

    def following(tokens: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return choose_tokens(advance(tokens), GREEDY, None, None)

    # the loop of generation (stream_tokens): each step's tokens read by the host, on a GPU while
    # it computes the next step; a step's time is then that of the device, once steady
    first = choose_tokens(logits, GREEDY, None, None)
    generated = tokens_a_step_ahead(first, following, 1 + warmup + steps)
    steps_tokens = [next(generated)]
    timing = time_call(lambda: steps_tokens.append(next(generated)), warmup=warmup, repeats=steps)
    return timing, [list(row) for row in zip(*steps_tokens, strict=True)]


def fast_path(
    device: torch.device,
    compile_: bool,
    fused: bool | None,
    flash_decoding: bool | None = None,
    matvec: bool | None = None,
    settings: dict | None = None,
) -> FastPath:
    """--compile: inductor's kernels (captured as a CUDA graph on a GPU); else the static step."""
    mode = "compile" if compile_ else "cuda_graph" if device.type == "cuda" else "static"
    return FastPath(mode, fused, flash_decoding, matvec, settings)


def greedy_tokens_equal(
    model: QwenVLForCausalLM,
    prompt: list[int],
    features: torch.Tensor | None,
    fast: FastPath,
    steps: int,
    capacity: int,
) -> tuple[bool, list[int], list[int]]:
    """Whether the baseline and the fast path choose the same `steps` greedy tokens after the prompt."""
    _, baseline = decode_run(model, prompt, features, 1, None, warmup=0, steps=steps, capacity=capacity)
    _, tokens = decode_run(model, prompt, features, 1, fast, warmup=0, steps=steps, capacity=capacity)
    return baseline == tokens, baseline[0], tokens[0]


# -- a conversation's second turn -------------------------------------------------------------------


def first_token_latency(handle) -> float:
    """Seconds from now until `handle` yields its first token (the rest is drained)."""
    start = time.perf_counter()
    tokens = iter(handle)
    next(tokens)
    elapsed = time.perf_counter() - start
    for _ in tokens:
        pass
    return elapsed


def first_turn(tokenizer: QwenVLTokenizer) -> tuple[Image.Image, list[int]]:
    """The picture and the prompt of a conversation's first turn (the engine's figures)."""
    _, prompt = make_context(tokenizer, FIRST_QUESTION, system=DEFAULT_SYSTEM)
    return Image.new("RGB", (448, 448), "red"), prompt


def second_turn(
    model: QwenVLForCausalLM, tokenizer: QwenVLTokenizer, prefix_entries: int, reply_tokens: int
) -> tuple[float, int]:
    """(time to first token of turn 2, prompt tokens the engine reused) in a fresh Engine, whose loop
    runs in this thread while a client thread talks to it, as `qwenvl serve` runs it."""
    image, first = first_turn(tokenizer)
    engine = Engine(model, prefix_cache_entries=prefix_entries)

    def conversation() -> tuple[float, int]:
        handle = engine.submit(first, SamplingParams(max_new_tokens=reply_tokens), images=[image])
        reply = tokenizer.decode(list(handle))
        _, second = make_context(
            tokenizer, SECOND_QUESTION, history=[(FIRST_QUESTION, reply)], system=DEFAULT_SYSTEM
        )
        handle = engine.submit(second, SamplingParams(max_new_tokens=1), images=[image])
        return first_token_latency(handle), handle.reused_tokens

    return engine.run_while(conversation)


def second_turn_timings(
    model: QwenVLForCausalLM, tokenizer: QwenVLTokenizer, repeats: int, reply_tokens: int = 8
) -> dict:
    out = {}
    for name, entries in (("reuse", 8), ("no_reuse", 0)):
        runs = [second_turn(model, tokenizer, entries, reply_tokens) for _ in range(repeats + 1)][1:]
        out[name] = {
            **Timing([t for t, _ in runs]).as_dict(),
            "reused_tokens": runs[0][1],
        }
    return out


def chat_second_turn(
    model: QwenVLForCausalLM, tokenizer: QwenVLTokenizer, reuse: bool, reply_tokens: int
) -> float:
    """Seconds of `model.chat`'s second turn (one new token) about a picture file, with a
    PrefixCache passed to both turns or without one."""
    image, _ = first_turn(tokenizer)
    cache = PrefixCache() if reuse else None
    options = {"do_sample": False, "prefix_cache": cache}
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


# -- a request through the serving engine -----------------------------------------------------------


def engine_decode(
    model: QwenVLForCausalLM, tokenizer: QwenVLTokenizer, decode_mode: str, new_tokens: int, repeats: int
) -> Timing:
    """Seconds per token of one greedy request through a fresh Engine, after its first token; the
    engine's loop runs in this thread and a client thread submits, as `qwenvl serve` runs it.

    Each request gets a cache of its own, so the time of the steps before its batch turns
    steady, and of capturing its graph, counts in the figure.
    """
    image, prompt = first_turn(tokenizer)
    params = SamplingParams(max_new_tokens=new_tokens)  # greedy; no end token: all new_tokens come
    engine = Engine(model, decode_mode=decode_mode)

    def requests() -> list[float]:
        samples = []
        for _ in range(repeats + 1):  # the first warms up
            tokens = iter(engine.submit(prompt, params, images=[image]))
            next(tokens)
            start = time.perf_counter()
            count = sum(1 for _ in tokens)
            samples.append((time.perf_counter() - start) / max(count, 1))
        return samples[1:]

    return Timing(engine.run_while(requests))


def engine_decode_timings(
    model: QwenVLForCausalLM, tokenizer: QwenVLTokenizer, new_tokens: int, repeats: int
) -> dict:
    """Per decode mode ("auto" and, on CUDA, "static"): seconds per token and tokens/s."""
    modes = ("auto", "static") if next(model.parameters()).is_cuda else ("auto",)
    out = {}
    for mode in modes:
        timing = engine_decode(model, tokenizer, mode, new_tokens, repeats)
        out[mode] = {**timing.as_dict(), "tokens_per_s": 1 / timing.median, "new_tokens": new_tokens}
    return out


# -- loading a checkpoint ---------------------------------------------------------------------------

CHECKPOINT_SHARDS = 10  # as the real Qwen-VL-Chat checkpoint's .bin files
LOAD_LABEL = "checkpoint load, bf16 .bin shards in the page cache (s)"


def checkpoint_load(config: dict, dtype_names: Sequence[str], device: torch.device) -> dict:
    """Seconds of `from_pretrained` onto `device`, each dtype in a fresh process, from a bf16
    checkpoint of `config` in the real one's layout (.bin shards and their index), which the
    page cache holds (it was just written: a cold disk adds its read time)."""
    with tempfile.TemporaryDirectory(prefix="qwenvl-benchmark-checkpoint-") as scratch:
        folder = str(Path(scratch) / "checkpoint")
        # constant values: the load time does not depend on them, and they are written sooner
        size = run_isolated(write_checkpoint, folder, CHECKPOINT_SHARDS, config=config, random=False)
        loads = {name: run_isolated(measure_load, folder, name, str(device)) for name in dtype_names}
    seconds = {name: load["seconds"] for name, load in loads.items()}
    return {"format": "bin", "dtype": "bf16", "shards": CHECKPOINT_SHARDS, "bytes": size, "seconds": seconds}


# -- one dtype, one run -----------------------------------------------------------------------------


def measure_dtype(
    config: dict,
    dtype_name: str,
    device: torch.device,
    *,
    threads: int,
    steps: int,
    warmup: int,
    repeats: int,
    fast: FastPath,
    with_second_turn: bool,
    batch_sizes: Sequence[int],
    equal_steps: int = EQUAL_STEPS,
    engine_tokens: int = 64,
) -> dict:
    """Every figure of one dtype; run in a process of its own (`run_isolated`): on CPU a process
    that had held the other dtype's model decoded 30% slower."""
    torch.set_num_threads(threads)
    fused_decode.FLASH_DECODING = fast.flash_decoding  # this process's own settings
    fused_decode.MATVEC = fast.matvec
    tuned.apply(fast.settings or {})
    tokenizer = QwenVLTokenizer()
    model = build_model(config, DTYPES[dtype_name], device)
    prompt = prompt_ids(tokenizer)
    visual = model.transformer.visual
    size = visual.config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(device, model.dtype)

    with torch.inference_mode():
        encode = timed(lambda: encode_pixels(visual, pixels), device, warmup=1, repeats=repeats)
        features = encode_pixels(visual, pixels)

        def first_token(encoder: Callable[[torch.Tensor], torch.Tensor]) -> None:
            cache = KVCache(model.transformer.llm_config, 1, len(prompt) + 1, model.dtype, device)
            choose_tokens(prefill(model, [prompt], cache, encoder(pixels)), GREEDY, None, None)

        ttft = timed(
            lambda: first_token(functools.partial(encode_pixels, visual)), device, warmup=1, repeats=repeats
        )
        tower_eager = {}
        if graphable(visual, pixels):  # the baseline: the tower launched from Python
            eager_encode = timed(lambda: visual(pixels), device, warmup=1, repeats=repeats)
            eager_ttft = timed(lambda: first_token(visual), device, warmup=1, repeats=repeats)
            tower_eager["image_encode_per_image_eager"] = eager_encode.as_dict()
            tower_eager["time_to_first_token_eager"] = eager_ttft.as_dict()

    capacity = len(prompt) + max(warmup + steps, equal_steps) + 1
    equal, baseline_tokens, fast_tokens = greedy_tokens_equal(
        model, prompt, features, fast, equal_steps, capacity
    )
    timing = {"warmup": warmup, "steps": steps, "capacity": capacity}
    eager_1, _ = decode_run(model, prompt, features, 1, None, **timing)
    per_batch = {b: decode_run(model, prompt, features, b, fast, **timing)[0] for b in (1, *batch_sizes)}
    result = {
        "fused_kernels": fast.fuses(device),
        "flash_decoding": fused_decode.flash_decoding(device),
        "matvec": fused_decode.matvec_runs(device),
        "dependent_launch": fused_decode.dependent_launch(device),
        "prompt_tokens": len(prompt),
        "parameters": sum(p.numel() for p in model.parameters()),
        "llm_weight_bytes_per_step": llm_weight_bytes(model),
        "image_encode_per_image": encode.as_dict(),
        "time_to_first_token": ttft.as_dict(),
        **tower_eager,
        "greedy_tokens_equal": equal,
        "greedy_tokens_baseline": baseline_tokens,
        "greedy_tokens_fast": fast_tokens,
        "decode_step_eager_batch1": eager_1.as_dict(),
        **{f"decode_step_fast_batch{b}": t.as_dict() for b, t in per_batch.items()},
        "decode_tokens_per_s_eager_batch1": 1 / eager_1.median,
        **{f"decode_tokens_per_s_fast_batch{b}": b / t.median for b, t in per_batch.items()},
    }
    if with_second_turn:  # the serving dtype: the engine's figures
        result["second_turn_time_to_first_token"] = second_turn_timings(model, tokenizer, repeats)
        result["chat_second_turn"] = chat_second_turn_timings(model, tokenizer, repeats)
        result["engine_decode_batch1"] = engine_decode_timings(model, tokenizer, engine_tokens, repeats)
    if device.type == "cuda":
        result["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def default_dtype_name(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"


def measure(
    config_name: str,
    device_name: str = "cpu",
    *,
    dtype_names: Sequence[str] = ("fp32", "bf16"),
    batch_sizes: Sequence[int] = (8, 32, 64),
    steps: int = 16,
    warmup: int = 2,
    repeats: int = 3,
    compile_: bool = False,
    fused: bool | None = None,
    flash_decoding: bool | None = None,
    matvec: bool | None = None,
    settings: dict | None = None,
    bandwidth_mb: int | None = None,
    equal_steps: int = EQUAL_STEPS,
    engine_tokens: int = 64,
    load_time: bool = True,
) -> dict:
    """Every figure of a run, with the plain-number ratios at the top level.

    A ratio whose figures the run did not measure (bf16 over fp32 without both dtypes, the second
    turn and the engine without bf16, the engine without graphs off CUDA) is None.
    """
    if config_name == "real" and device_name != "cuda":
        raise ValueError("config 'real' (9.6B parameters) is only meaningful on a GPU: use --device cuda")
    device = torch.device(device_name)
    config = model_config(config_name)
    fast = fast_path(device, compile_, fused, flash_decoding, matvec, settings)
    if bandwidth_mb is None:  # well past the last-level cache: 60 MB of L2 on an H200
        bandwidth_mb = 2048 if device.type == "cuda" else 256
    # before the models and after them: one reading came out 12% lower after the real model's
    # runs on an H200; the higher is what the memory can do
    bandwidth_samples = [memory_bandwidth(device, bandwidth_mb)]
    dtypes = {}
    for name in dtype_names:
        dtypes[name] = run_isolated(
            measure_dtype,
            config,
            name,
            device,
            threads=torch.get_num_threads(),
            steps=steps,
            warmup=warmup,
            repeats=repeats,
            fast=fast,
            with_second_turn=name == "bf16",
            batch_sizes=batch_sizes,
            equal_steps=equal_steps,
            engine_tokens=engine_tokens,
        )
    peak_rss = max(r["peak_rss_bytes"] for r in dtypes.values())
    bandwidth_samples.append(memory_bandwidth(device, bandwidth_mb))
    loaded = checkpoint_load(config, dtype_names, device) if load_time else None
    bandwidth = max(bandwidth_samples)
    fast_1 = {name: r["decode_tokens_per_s_fast_batch1"] for name, r in dtypes.items()}
    speedups = {name: fast_1[name] / r["decode_tokens_per_s_eager_batch1"] for name, r in dtypes.items()}
    roofline = {name: r["llm_weight_bytes_per_step"] * fast_1[name] / bandwidth for name, r in dtypes.items()}
    # batching and the second turn are judged in bf16, the serving dtype
    serving = dtypes.get("bf16") or next(iter(dtypes.values()))
    turn = serving.get("second_turn_time_to_first_token")
    chat = serving.get("chat_second_turn")
    engine = serving.get("engine_decode_batch1", {})
    headline = default_dtype_name(device) if default_dtype_name(device) in dtypes else next(iter(dtypes))
    return {
        "config": config_name,
        "model_config": config,
        "device": device_name,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "fast_path_mode": fast.mode,
        "fused_kernels": all(r["fused_kernels"] for r in dtypes.values()),
        "flash_decoding": all(r["flash_decoding"] for r in dtypes.values()),
        "matvec": all(r["matvec"] for r in dtypes.values()),
        "dependent_launch": all(r["dependent_launch"] for r in dtypes.values()),
        "settings": settings,
        "decode_steps": steps,
        "decode_warmup_steps": warmup,
        "batch_sizes": [1, *batch_sizes],
        "greedy_tokens_compared": equal_steps,
        "greedy_tokens_equal": all(r["greedy_tokens_equal"] for r in dtypes.values()),
        # in the dtype a model loads in by default on this device (SPEC 6): fp32 on CPU, bf16 on a GPU
        "decode_speedup_vs_eager": speedups[headline],
        "decode_speedup_vs_eager_dtype": headline,
        "decode_speedup_vs_eager_per_dtype": speedups,
        "bf16_over_fp32_decode": (
            fast_1["bf16"] / fast_1["fp32"] if {"bf16", "fp32"} <= fast_1.keys() else None
        ),
        **{
            f"batch{b}_over_batch1_throughput": serving[f"decode_tokens_per_s_fast_batch{b}"]
            / serving["decode_tokens_per_s_fast_batch1"]
            for b in batch_sizes
        },
        "second_turn_speedup": (
            turn["no_reuse"]["median_s"] / turn["reuse"]["median_s"] if turn is not None else None
        ),
        "chat_second_turn_speedup": (
            chat["no_reuse"]["median_s"] / chat["reuse"]["median_s"] if chat is not None else None
        ),
        "engine_over_fast_path_decode": (
            engine["auto"]["tokens_per_s"] / serving["decode_tokens_per_s_fast_batch1"] if engine else None
        ),
        "engine_graphs_speedup": (
            engine["auto"]["tokens_per_s"] / engine["static"]["tokens_per_s"] if "static" in engine else None
        ),
        "first_token_graph_speedup": (
            serving["time_to_first_token_eager"]["median_s"] / serving["time_to_first_token"]["median_s"]
            if "time_to_first_token_eager" in serving
            else None
        ),
        "decode_roofline_fraction": roofline.get("bf16", roofline[headline]),
        "decode_roofline_fraction_per_dtype": roofline,
        "memory_bandwidth_bytes_per_s": bandwidth,
        "memory_bandwidth_before_and_after_bytes_per_s": bandwidth_samples,
        "peak_rss_bytes": peak_rss,
        "checkpoint": loaded,
        "dtypes": dtypes,
    }


# -- report -----------------------------------------------------------------------------------------


def table_rows(r: dict, bandwidth: float, batch_sizes: Sequence[int]) -> list[tuple[str, float]]:
    turn = r.get("second_turn_time_to_first_token")
    weights = r["llm_weight_bytes_per_step"]
    bound = bandwidth / weights
    rows = [
        ("image encode, per image (ms)", r["image_encode_per_image"]["median_s"] * 1e3),
        (
            f"time to first token, 1 image + question = {r['prompt_tokens']} tokens (ms)",
            r["time_to_first_token"]["median_s"] * 1e3,
        ),
    ]
    if "time_to_first_token_eager" in r:
        rows += [
            ("image encode, tower eager (ms)", r["image_encode_per_image_eager"]["median_s"] * 1e3),
            ("time to first token, tower eager (ms)", r["time_to_first_token_eager"]["median_s"] * 1e3),
        ]
    rows += [
        ("decode batch 1, eager growing cache (tokens/s)", r["decode_tokens_per_s_eager_batch1"]),
        ("decode batch 1, fast path (tokens/s)", r["decode_tokens_per_s_fast_batch1"]),
        *[
            (f"decode batch {b}, fast path (tokens/s, all rows)", r[f"decode_tokens_per_s_fast_batch{b}"])
            for b in batch_sizes
            if b != 1
        ],
        ("LLM weights read per step (MiB)", weights / MIB),
        ("decode bound = bandwidth / weights (tokens/s)", bound),
        ("decode roofline fraction (batch 1, fast)", r["decode_tokens_per_s_fast_batch1"] / bound),
    ]
    if turn is not None:
        rows += [
            ("turn 2 first token, prefix reused (ms)", turn["reuse"]["median_s"] * 1e3),
            ("turn 2 first token, whole prompt (ms)", turn["no_reuse"]["median_s"] * 1e3),
        ]
    chat = r.get("chat_second_turn")
    if chat is not None:
        rows += [
            ("model.chat turn 2, one token, PrefixCache (ms)", chat["reuse"]["median_s"] * 1e3),
            ("model.chat turn 2, one token, whole prompt (ms)", chat["no_reuse"]["median_s"] * 1e3),
        ]
    engine = r.get("engine_decode_batch1", {})
    if "auto" in engine:
        rows.append(("engine decode, one request (tokens/s)", engine["auto"]["tokens_per_s"]))
    if "static" in engine:
        label = "engine decode, one request, no CUDA graphs (tokens/s)"
        rows.append((label, engine["static"]["tokens_per_s"]))
    if "peak_gpu_memory_bytes" in r:
        rows.append(("peak GPU memory (MiB)", r["peak_gpu_memory_bytes"] / MIB))
    if "peak_rss_bytes" in r:
        rows.append(("peak RSS of its process (MiB)", r["peak_rss_bytes"] / MIB))
    return rows


def ratio_rows(results: dict) -> list[list]:
    speedups = results["decode_speedup_vs_eager_per_dtype"]
    rows = [
        [
            f"decode_speedup_vs_eager ({results['decode_speedup_vs_eager_dtype']}, batch 1)",
            results["decode_speedup_vs_eager"],
        ],
        *[[f"decode speedup vs eager, {n}", v] for n, v in speedups.items()],
        ["bf16_over_fp32_decode (batch 1)", results["bf16_over_fp32_decode"]],
        *[
            [f"batch{b}_over_batch1_throughput (bf16)", results[f"batch{b}_over_batch1_throughput"]]
            for b in results["batch_sizes"]
            if b != 1
        ],
        ["second_turn_speedup (bf16)", results["second_turn_speedup"]],
        [
            "chat_second_turn_speedup (bf16, model.chat with a PrefixCache)",
            results.get("chat_second_turn_speedup"),
        ],
        ["decode_roofline_fraction (bf16)", results["decode_roofline_fraction"]],
        ["engine_over_fast_path_decode (bf16, batch 1)", results["engine_over_fast_path_decode"]],
        ["engine_graphs_speedup (bf16, batch 1)", results["engine_graphs_speedup"]],
        ["first_token_graph_speedup (bf16, the vision tower)", results.get("first_token_graph_speedup")],
        ["memory bandwidth, tensor copy (GB/s)", results["memory_bandwidth_bytes_per_s"] / 1e9],
        ["peak RSS, the larger process (MiB)", results["peak_rss_bytes"] / MIB],
        [
            f"greedy tokens equal ({results['greedy_tokens_compared']} steps, every dtype)",
            str(results["greedy_tokens_equal"]),
        ],
    ]
    return [[label, "not measured" if value is None else value] for label, value in rows]


def decode_attention_name(results: dict) -> str:
    if results["flash_decoding"]:
        return "flash decoding"
    if results["device"] == "cpu":
        return "SDPA (bf16: two products around a softmax)"
    return "SDPA"


def report(results: dict) -> str:
    bandwidth = results["memory_bandwidth_bytes_per_s"]
    columns = {
        name: dict(table_rows(r, bandwidth, results["batch_sizes"])) for name, r in results["dtypes"].items()
    }
    if results.get("checkpoint") is not None:  # records before it had none
        for name, column in columns.items():
            column[LOAD_LABEL] = results["checkpoint"]["seconds"][name]
    labels = list(dict.fromkeys(label for column in columns.values() for label in column))
    rows = [[label, *(column.get(label, "") for column in columns.values())] for label in labels]
    parameters = next(iter(results["dtypes"].values()))["parameters"]
    device = results["device_name"] or results["device"]
    lines = [
        f"Config {results['config']} on {device}: {parameters / 1e6:.1f}M parameters, "
        f"fast path = DecodeRunner mode {results['fast_path_mode']!r}, "
        f"fused decode kernels {'on' if results['fused_kernels'] else 'off'}, "
        f"decode attention {decode_attention_name(results)}"
        + (", one-row products fused_decode.matvec" if results.get("matvec") else "")
        + (", kernels launched early (dependent launch)" if results.get("dependent_launch") else "")
        + (f", settings {json.dumps(results['settings'])}" if results.get("settings") else ""),
        "",
        markdown_table(["figure", *columns], rows),
        "",
        markdown_table(["ratio", "value"], ratio_rows(results)),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("tiny", "mid", "real"), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="fast path through torch.compile (CPU: ~1 min; GPU: inductor's kernels in a CUDA graph)",
    )
    parser.add_argument(
        "--no-fused", action="store_true", help="decode without fused_decode's kernels (default: on, on CUDA)"
    )
    parser.add_argument(
        "--sdpa-decode",
        action="store_true",
        help="decode attention through SDPA in every step, the baseline's too (default on CUDA: "
        "fused_decode.decode_attention)",
    )
    parser.add_argument(
        "--no-matvec",
        action="store_true",
        help="one-row decode products through cuBLAS in every step, the baseline's too (default on CUDA: "
        "fused_decode.matvec)",
    )
    parser.add_argument(
        "--dependent-launch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fused_decode's kernels launched while the one before them ends, matvec reading weights "
        "(fused_decode.DEPENDENT_LAUNCH; CUDA capability 9.0+), in every step, the baseline's too "
        "(default: its default, on)",
    )
    parser.add_argument(
        "--settings",
        type=Path,
        default=None,
        help="fused_decode's settings from benchmarks.tuned (JSON), in every step, the baseline's too",
    )
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument(
        "--batch-sizes", nargs="+", type=int, default=[8, 32, 64], help="decode throughput rows, besides 1"
    )
    parser.add_argument("--decode-steps", type=int, default=16, help="timed greedy steps per measurement")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs of encode, first token, turn 2, engine decode"
    )
    parser.add_argument(
        "--engine-tokens", type=int, default=64, help="new tokens of each request the engine decode times"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)"
    )
    parser.add_argument(
        "--load-time",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write a checkpoint of the config and time loading it (default: on, but for real, "
        "whose 19 GB checkpoint takes a minute or two to write)",
    )
    add_json_option(parser, "run_{config}_{device}.json")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.config == "real" and args.device != "cuda":
        parser.error("config 'real' (the real Qwen-VL-Chat shapes, 9.6B parameters) needs --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if any(b < 2 for b in args.batch_sizes):
        parser.error("--batch-sizes: each must be at least 2 (batch 1 is always measured)")
    settings = {}
    if args.settings is not None:
        try:
            settings = json.loads(args.settings.read_text())
        except (OSError, ValueError) as error:
            parser.error(f"--settings: cannot read {args.settings}: {error}")
    if args.dependent_launch is not None:
        settings["DEPENDENT_LAUNCH"] = args.dependent_launch

    results = measure(
        args.config,
        args.device,
        dtype_names=args.dtypes,
        batch_sizes=sorted(set(args.batch_sizes)),
        steps=args.decode_steps,
        repeats=args.repeats,
        compile_=args.compile,
        fused=False if args.no_fused else None,
        flash_decoding=False if args.sdpa_decode else None,
        matvec=False if args.no_matvec else None,
        settings=settings or None,
        engine_tokens=args.engine_tokens,
        load_time=args.config != "real" if args.load_time is None else args.load_time,
    )
    print(report(results))
    path = json_path(args, "run_{config}_{device}.json")
    save_record(path, f"run_{args.config}_{args.device}", results, args.device)
    print(f"\nsaved {path}")
    if not results["greedy_tokens_equal"]:
        sys.exit("greedy tokens of the fast path differ from the eager baseline")


if __name__ == "__main__":
    main()
