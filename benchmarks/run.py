"""One benchmark run: decode fast path vs a growing-cache eager baseline, dtypes, batching, prefix reuse.

Run: .venv/bin/python -m benchmarks.run --config tiny|mid|real --device cpu|cuda [--compile] [--json PATH]

The model has random weights (values do not change the speed). Every ratio compares figures
measured in this same run, on this same machine:

- decode_speedup_vs_eager: batch-1 greedy decode tokens/s of the fast path (a DecodeRunner over a
  preallocated KVCache: CUDA graphs on CUDA, static eager steps on CPU, or torch.compile with
  --compile) over the straightforward baseline (decode_step over a cache that grows by torch.cat);
  both must produce the same greedy tokens. In the dtype models load in by default on the device
  (fp32 on CPU, bf16 on CUDA); every dtype's in decode_speedup_vs_eager_per_dtype.
- bf16_over_fp32_decode: batch-1 fast-path decode tokens/s, bf16 over fp32.
- batch8_over_batch1_throughput: fast-path decode tokens/s of 8 rows over 1 row, bf16.
- second_turn_speedup: time to first token of a conversation's second turn about the same image,
  without prefix reuse over with it (Engine with prefix_cache_entries=0 vs > 0), bf16.
- decode_roofline_fraction: bytes of LLM weights read per decode step x tokens/s over the memory
  bandwidth measured by a large tensor copy, bf16 (per dtype in decode_roofline_fraction_per_dtype).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from qwenvl import QwenVLConfig, QwenVLForCausalLM, QwenVLTokenizer, make_context
from qwenvl.cache import KVCache
from qwenvl.chat_format import DEFAULT_SYSTEM
from qwenvl.config import LLMConfig
from qwenvl.engine import Engine
from qwenvl.generation import SamplingParams, choose_tokens, decode_step, prefill
from qwenvl.static_decode import DecodeRunner

from .common import Timing, add_json_option, json_path, markdown_table, peak_rss_bytes, save_record, time_call
from .model_speed import DTYPES, GREEDY, MIB, default_dtype, load_config, prompt_ids, tensor_bytes

REAL_CONFIG = Path(__file__).parent.parent / "tests" / "data" / "real-qwen-vl-chat" / "config.json"
FIRST_QUESTION = "Picture 1: <img>x.png</img>\nWhat is in this picture?"
SECOND_QUESTION = "What colour is it, and is there anything else in the picture?"
EQUAL_STEPS = 16


class GrowingCache:
    """The straightforward KV cache: each write appends its keys and values with torch.cat.

    It offers the model what KVCache offers (lengths, ntk_alpha, inv_freq, positions, write, view),
    for rows that all have the same length (the baseline decodes copies of one prompt).
    """

    def __init__(self, cfg: LLMConfig, batch_size: int, device: torch.device | str = "cpu"):
        self.num_layers = cfg.num_hidden_layers
        self.keys: list[torch.Tensor | None] = [None] * cfg.num_hidden_layers
        self.values: list[torch.Tensor | None] = [None] * cfg.num_hidden_layers
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.ntk_alpha = torch.ones(batch_size, dtype=torch.float32, device=device)
        self.inv_freq = torch.zeros(batch_size, cfg.rotary_dim // 2, dtype=torch.float32, device=device)

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


def decode_run(
    model: QwenVLForCausalLM,
    prompt: list[int],
    features: torch.Tensor | None,
    batch: int,
    mode: str | None,
    *,
    warmup: int,
    steps: int,
) -> tuple[Timing, list[list[int]]]:
    """Per-step timing of greedy decoding `batch` copies of the prompt, and every row's tokens.

    mode None: the eager baseline (decode_step over a GrowingCache); otherwise a DecodeRunner mode.
    The prefill is not timed.
    """
    param = next(model.parameters())
    llm = model.transformer.llm_config
    if mode is None:
        cache = GrowingCache(llm, batch, param.device)

        def advance(tokens: torch.Tensor) -> torch.Tensor:
            return decode_step(model, tokens, cache)

    else:
        cache = KVCache(llm, batch, len(prompt) + warmup + steps + 1, param.dtype, param.device)
        advance = DecodeRunner(model, cache, mode)
    with torch.inference_mode():
        rows_features = None if features is None else features.repeat(batch, 1, 1)
        logits = prefill(model, [prompt] * batch, cache, rows_features)
    generated = [choose_tokens(logits, GREEDY, None, None)]

    def step() -> None:
        with torch.inference_mode():
            generated.append(choose_tokens(advance(generated[-1]), GREEDY, None, None))

    timing = timed(step, param.device, warmup=warmup, repeats=steps)
    return timing, torch.stack(generated, 1).tolist()


def fast_mode(device: torch.device, compile_: bool) -> str:
    if device.type == "cuda":
        return "cuda_graph"
    return "compile" if compile_ else "static"


def greedy_tokens_equal(
    model: QwenVLForCausalLM,
    prompt: list[int],
    features: torch.Tensor | None,
    mode: str,
    steps: int = EQUAL_STEPS,
) -> tuple[bool, list[int], list[int]]:
    """Whether the baseline and the fast path choose the same `steps` greedy tokens after the prompt."""
    _, baseline = decode_run(model, prompt, features, 1, None, warmup=0, steps=steps)
    _, fast = decode_run(model, prompt, features, 1, mode, warmup=0, steps=steps)
    return baseline == fast, baseline[0], fast[0]


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


def second_turn(
    model: QwenVLForCausalLM, tokenizer: QwenVLTokenizer, prefix_entries: int, reply_tokens: int
) -> tuple[float, int]:
    """(time to first token of turn 2, prompt tokens the engine reused) in a fresh Engine."""
    image = Image.new("RGB", (448, 448), "red")
    _, first = make_context(tokenizer, FIRST_QUESTION, system=DEFAULT_SYSTEM)
    with Engine(model, prefix_cache_entries=prefix_entries) as engine:
        handle = engine.submit(first, SamplingParams(max_new_tokens=reply_tokens), images=[image])
        reply = tokenizer.decode(list(handle))
        _, second = make_context(
            tokenizer, SECOND_QUESTION, history=[(FIRST_QUESTION, reply)], system=DEFAULT_SYSTEM
        )
        handle = engine.submit(second, SamplingParams(max_new_tokens=1), images=[image])
        return first_token_latency(handle), handle.reused_tokens


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


# -- one dtype, one run -----------------------------------------------------------------------------


def measure_dtype(
    config: dict,
    dtype_name: str,
    device: torch.device,
    tokenizer: QwenVLTokenizer,
    *,
    steps: int,
    warmup: int,
    repeats: int,
    mode: str,
    with_second_turn: bool,
    equal_steps: int = EQUAL_STEPS,
) -> dict:
    model = build_model(config, DTYPES[dtype_name], device)
    prompt = prompt_ids(tokenizer)
    visual = model.transformer.visual
    size = visual.config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(device, model.dtype)

    with torch.inference_mode():
        encode = timed(lambda: visual(pixels), device, warmup=1, repeats=repeats)
        features = visual(pixels)

        def first_token() -> None:
            cache = KVCache(model.transformer.llm_config, 1, len(prompt) + 1, model.dtype, device)
            choose_tokens(prefill(model, [prompt], cache, visual(pixels)), GREEDY, None, None)

        ttft = timed(first_token, device, warmup=1, repeats=repeats)

    equal, baseline_tokens, fast_tokens = greedy_tokens_equal(model, prompt, features, mode, equal_steps)
    eager_1, _ = decode_run(model, prompt, features, 1, None, warmup=warmup, steps=steps)
    fast_1, _ = decode_run(model, prompt, features, 1, mode, warmup=warmup, steps=steps)
    fast_8, _ = decode_run(model, prompt, features, 8, mode, warmup=warmup, steps=steps)
    result = {
        "prompt_tokens": len(prompt),
        "parameters": sum(p.numel() for p in model.parameters()),
        "llm_weight_bytes_per_step": llm_weight_bytes(model),
        "image_encode_per_image": encode.as_dict(),
        "time_to_first_token": ttft.as_dict(),
        "greedy_tokens_equal": equal,
        "greedy_tokens_baseline": baseline_tokens,
        "greedy_tokens_fast": fast_tokens,
        "decode_step_eager_batch1": eager_1.as_dict(),
        "decode_step_fast_batch1": fast_1.as_dict(),
        "decode_step_fast_batch8": fast_8.as_dict(),
        "decode_tokens_per_s_eager_batch1": 1 / eager_1.median,
        "decode_tokens_per_s_fast_batch1": 1 / fast_1.median,
        "decode_tokens_per_s_fast_batch8": 8 / fast_8.median,
    }
    if with_second_turn:
        result["second_turn_time_to_first_token"] = second_turn_timings(model, tokenizer, repeats)
    if device.type == "cuda":
        result["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    return result


def default_dtype_name(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"


def measure(
    config_name: str,
    device_name: str = "cpu",
    *,
    steps: int = 16,
    warmup: int = 2,
    repeats: int = 3,
    compile_: bool = False,
    bandwidth_mb: int = 256,
    equal_steps: int = EQUAL_STEPS,
) -> dict:
    """Every figure of a run, with the five plain-number ratios at the top level."""
    if config_name == "real" and device_name != "cuda":
        raise ValueError("config 'real' (9.6B parameters) is only meaningful on a GPU: use --device cuda")
    device = torch.device(device_name)
    config = model_config(config_name)
    tokenizer = QwenVLTokenizer()
    mode = fast_mode(device, compile_)
    dtypes = {}
    for name in ("fp32", "bf16"):
        dtypes[name] = measure_dtype(
            config,
            name,
            device,
            tokenizer,
            steps=steps,
            warmup=warmup,
            repeats=repeats,
            mode=mode,
            with_second_turn=name == "bf16",
            equal_steps=equal_steps,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peak_rss = peak_rss_bytes()  # before the bandwidth test's buffers
    bandwidth = memory_bandwidth(device, bandwidth_mb)
    fp32, bf16 = dtypes["fp32"], dtypes["bf16"]
    roofline = {
        name: r["llm_weight_bytes_per_step"] * r["decode_tokens_per_s_fast_batch1"] / bandwidth
        for name, r in dtypes.items()
    }
    turn = bf16["second_turn_time_to_first_token"]
    speedups = {
        name: r["decode_tokens_per_s_fast_batch1"] / r["decode_tokens_per_s_eager_batch1"]
        for name, r in dtypes.items()
    }
    return {
        "config": config_name,
        "model_config": config,
        "device": device_name,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "fast_path_mode": mode,
        "decode_steps": steps,
        "decode_warmup_steps": warmup,
        "greedy_tokens_compared": equal_steps,
        "greedy_tokens_equal": fp32["greedy_tokens_equal"] and bf16["greedy_tokens_equal"],
        # in the dtype a model loads in by default on this device (SPEC 6): fp32 on CPU, bf16 on a GPU
        "decode_speedup_vs_eager": speedups[default_dtype_name(device)],
        "decode_speedup_vs_eager_dtype": default_dtype_name(device),
        "decode_speedup_vs_eager_per_dtype": speedups,
        "bf16_over_fp32_decode": bf16["decode_tokens_per_s_fast_batch1"]
        / fp32["decode_tokens_per_s_fast_batch1"],
        "batch8_over_batch1_throughput": bf16["decode_tokens_per_s_fast_batch8"]
        / bf16["decode_tokens_per_s_fast_batch1"],
        "second_turn_speedup": turn["no_reuse"]["median_s"] / turn["reuse"]["median_s"],
        "decode_roofline_fraction": roofline["bf16"],
        "decode_roofline_fraction_per_dtype": roofline,
        "memory_bandwidth_bytes_per_s": bandwidth,
        "peak_rss_bytes": peak_rss,
        "dtypes": dtypes,
    }


# -- report -----------------------------------------------------------------------------------------


def table_rows(r: dict, bandwidth: float) -> list[tuple[str, float]]:
    turn = r.get("second_turn_time_to_first_token")
    rows = [
        ("image encode, per image (ms)", r["image_encode_per_image"]["median_s"] * 1e3),
        (
            f"time to first token, 1 image + question = {r['prompt_tokens']} tokens (ms)",
            r["time_to_first_token"]["median_s"] * 1e3,
        ),
        ("decode batch 1, eager growing cache (tokens/s)", r["decode_tokens_per_s_eager_batch1"]),
        ("decode batch 1, fast path (tokens/s)", r["decode_tokens_per_s_fast_batch1"]),
        ("decode batch 8, fast path (tokens/s, all rows)", r["decode_tokens_per_s_fast_batch8"]),
        ("LLM weights read per step (MiB)", r["llm_weight_bytes_per_step"] / MIB),
        (
            "decode roofline fraction (batch 1, fast)",
            r["llm_weight_bytes_per_step"] * r["decode_tokens_per_s_fast_batch1"] / bandwidth,
        ),
    ]
    if turn is not None:
        rows += [
            ("turn 2 first token, prefix reused (ms)", turn["reuse"]["median_s"] * 1e3),
            ("turn 2 first token, whole prompt (ms)", turn["no_reuse"]["median_s"] * 1e3),
        ]
    return rows


def report(results: dict) -> str:
    bandwidth = results["memory_bandwidth_bytes_per_s"]
    columns = {name: dict(table_rows(r, bandwidth)) for name, r in results["dtypes"].items()}
    labels = list(dict.fromkeys(label for column in columns.values() for label in column))
    rows = [[label, *(column.get(label, "") for column in columns.values())] for label in labels]
    parameters = results["dtypes"]["bf16"]["parameters"]
    device = results["device_name"] or results["device"]
    lines = [
        f"Config {results['config']} on {device}: {parameters / 1e6:.1f}M parameters, "
        f"fast path = DecodeRunner mode {results['fast_path_mode']!r}",
        "",
        markdown_table(["figure", *columns], rows),
        "",
        markdown_table(
            ["ratio", "value"],
            [
                [
                    f"decode_speedup_vs_eager ({results['decode_speedup_vs_eager_dtype']}, batch 1)",
                    results["decode_speedup_vs_eager"],
                ],
                *[
                    [f"decode speedup vs eager, {name}", value]
                    for name, value in results["decode_speedup_vs_eager_per_dtype"].items()
                ],
                ["bf16_over_fp32_decode (batch 1)", results["bf16_over_fp32_decode"]],
                ["batch8_over_batch1_throughput (bf16)", results["batch8_over_batch1_throughput"]],
                ["second_turn_speedup (bf16)", results["second_turn_speedup"]],
                ["decode_roofline_fraction (bf16)", results["decode_roofline_fraction"]],
                ["memory bandwidth, tensor copy (GB/s)", bandwidth / 1e9],
                ["peak RSS (MiB)", results["peak_rss_bytes"] / MIB],
                [
                    f"greedy tokens equal ({results['greedy_tokens_compared']} steps, both dtypes)",
                    str(results["greedy_tokens_equal"]),
                ],
            ],
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("tiny", "mid", "real"), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--compile", action="store_true", help="CPU: fast path via torch.compile (~1 min)")
    parser.add_argument("--decode-steps", type=int, default=16, help="timed greedy steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of encode, first token, turn 2")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)"
    )
    add_json_option(parser, "run_{config}_{device}.json")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.config == "real" and args.device != "cuda":
        parser.error("config 'real' (the real Qwen-VL-Chat shapes, 9.6B parameters) needs --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    results = measure(
        args.config, args.device, steps=args.decode_steps, repeats=args.repeats, compile_=args.compile
    )
    print(report(results))
    path = json_path(args, "run_{config}_{device}.json")
    save_record(path, f"run_{args.config}_{args.device}", results, args.device)
    print(f"\nsaved {path}")
    if not results["greedy_tokens_equal"]:
        sys.exit("greedy tokens of the fast path differ from the eager baseline")


if __name__ == "__main__":
    main()
