"""The speed suite for one config and device: decode, first token, engine; one record.

Run: .venv/bin/python -m benchmarks.run --config tiny|mid|real --device cpu|cuda [--mode MODE]
     [--ops NAME] [--settings JSON] [--sdpa-decode] [--no-matvec] [--no-dependent-launch]
     [--dtypes fp32 bf16] [--int4] [--batch-sizes 8 32 64] [--engine-tokens 64] [--[no-]load-time]
     [--threads N] [--json PATH]

The model has random weights (values do not change the speed); each dtype is measured in a
process of its own (on CPU, a process that had held the fp32 model decoded bf16 30% slower).
Every ratio compares two figures of this run. The fast path is a `Decoder` with `--mode` (default
"auto") and `--ops` (default: the device's backend), its Triton kernels under `--settings` (a
`KernelSettings` JSON; default: the device's) changed by the flags; the baseline is a `Decoder`
in mode "plain" with the "torch" backend. What each part measures:

- `decode_speed`: batch-1 greedy decode, fast path over baseline (`decode_speedup_vs_baseline`, in
  the dtype models load in by default: fp32 on CPU, bf16 on a GPU; per dtype too); bf16 over fp32;
  batch N over batch 1 (bf16); the fraction of the copy-bandwidth bound (`decode_roofline_fraction`).
- `first_token`: time to first token, fast path over baseline; in bf16 a conversation's second
  turn with prefix reuse over without, in the engine and through `model.chat`.
- `engine_speed` (bf16): one request's decode through the engine over the same through `generate`;
  on a GPU, the engine with graphs over without.
- `--int4`: the Int4 model too (the bf16 model with its LLM's Linears quantized as
  Qwen-VL-Chat-Int4's are), every figure above, and its batch-1 decode over bf16's: measured
  in turns with bf16's in one more process that holds both models (`int4_over_bf16_decode`, the
  median of 15 rounds' ratios), and as the two dtypes' runs measured it
  (`int4_over_bf16_decode_separate_runs`, which the machine's drift between them moves); each
  model's bytes (parameters and buffers) are in the table.
- `--load-time`: seconds of `from_pretrained` for a checkpoint of the config (`load_memory`'s
  measure), in each dtype.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qwenvl import QwenVLTokenizer
from qwenvl.decode import BACKENDS, DECODE_MODES, KernelSettings
from qwenvl.vision_graphs import encode_pixels

from . import decode_speed, engine_speed, first_token
from .common import (
    OtherLoad,
    add_json_option,
    device_kind,
    json_path,
    markdown_table,
    memory_bandwidth,
    peak_rss_bytes,
    run_isolated,
    save_record,
)
from .decode_speed import DecodePath, describe
from .load_memory import measure_load, write_checkpoint
from .models import CONFIGS, INT4, MIB, build_measured_model, model_bytes, model_config, picture, prompt_ids


@dataclass(frozen=True)
class Options:
    """How a run measures each dtype (its fields: see `decode_speed.measure` and the parts)."""

    fast: DecodePath = DecodePath()
    batch_sizes: tuple[int, ...] = (8, 32, 64)
    steps: int = 16
    warmup: int = 2
    repeats: int = 3
    equal_steps: int = 16
    engine_tokens: int = 64
    threads: int | None = None


def measure_dtype(
    config: dict, dtype_name: str, device: torch.device, options: Options, serving: bool
) -> dict:
    """Every figure of one dtype; `serving`: also the second turn's and the engine's."""
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    tokenizer = QwenVLTokenizer()
    model = build_measured_model(config, dtype_name, device)
    prompt = prompt_ids(tokenizer)
    pixels = picture(model)
    with torch.inference_mode():
        features = encode_pixels(model.transformer.visual, pixels)
    result = {"parameters": sum(p.numel() for p in model.parameters()), "model_bytes": model_bytes(model)}
    result.update(first_token.measure(model, prompt, pixels, options.fast, options.repeats))
    result.update(
        decode_speed.measure(
            model, prompt, features, options.fast, batch_sizes=options.batch_sizes, steps=options.steps,
            warmup=options.warmup, equal_steps=options.equal_steps,
        )
    )  # fmt: skip
    if serving:
        result["second_turn"] = first_token.second_turn_timings(model, tokenizer, options.repeats)
        result["chat_second_turn"] = first_token.chat_second_turn_timings(model, tokenizer, options.repeats)
        result["engine_decode"] = engine_speed.measure(
            model, tokenizer, options.engine_tokens, options.repeats
        )
    if device.type == "cuda":
        result["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def int4_against_bf16(config: dict, device: torch.device, options: Options) -> dict:
    """Batch-1 decode of the Int4 model and the bf16 one in turns, in one process (both models
    held at once): `decode_speed.alternating`, and the median of its rounds' ratios."""
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    prompt = prompt_ids(QwenVLTokenizer())
    models, features = {}, {}
    for name in ("bf16", INT4):
        models[name] = build_measured_model(config, name, device)
        with torch.inference_mode():
            features[name] = encode_pixels(models[name].transformer.visual, picture(models[name]))
    # one prefill's features serve both: the two towers are the same bf16 weights
    record = decode_speed.alternating(models, prompt, features["bf16"], options.fast, steps=options.steps)
    ratios = decode_speed.round_ratios(record, "bf16", INT4)
    return dict(record, int4_over_bf16_per_round=ratios, int4_over_bf16=statistics.median(ratios))


CHECKPOINT_SHARDS = 10  # as the real Qwen-VL-Chat checkpoint's .bin files


def checkpoint_load(config: dict, dtype_names: Sequence[str], device: torch.device) -> dict:
    """Seconds of `from_pretrained` onto `device`, each dtype in a fresh process, from a bf16
    checkpoint of `config` in the real one's layout (.bin shards), which the page cache holds."""
    with tempfile.TemporaryDirectory(prefix="qwenvl-benchmark-checkpoint-") as scratch:
        folder = str(Path(scratch) / "checkpoint")
        # constant values: the load time does not depend on them, and they are written sooner
        size = run_isolated(write_checkpoint, folder, CHECKPOINT_SHARDS, config=config, random=False)
        seconds = {
            name: run_isolated(measure_load, folder, name, str(device))["seconds"] for name in dtype_names
        }
    return {"format": "bin", "dtype": "bf16", "shards": CHECKPOINT_SHARDS, "bytes": size, "seconds": seconds}


def measure(
    config_name: str,
    device_name: str = "cpu",
    options: Options = Options(),
    *,
    dtype_names: Sequence[str] = ("fp32", "bf16"),
    bandwidth_mb: int | None = None,
    load_time: bool = False,
    isolated: bool = True,
) -> dict:
    """Every figure of a run, with its ratios as plain numbers at the top level (None for a ratio
    whose figures the run did not measure: bf16 over fp32 without both dtypes, the second turn and
    the engine without bf16, the engine without graphs off CUDA). `isolated`: each dtype in a
    process of its own."""
    if config_name == "real" and device_name != "cuda":
        raise ValueError("config 'real' (9.6B parameters) is only meaningful on a GPU: use --device cuda")
    device = torch.device(device_name)
    config = model_config(config_name)
    if bandwidth_mb is None:  # well past the last-level cache: 60 MB of L2 on an H200
        bandwidth_mb = 2048 if device.type == "cuda" else 256
    other_load = OtherLoad()
    loaded = [name for name in dtype_names if name != INT4]  # the Int4 model is quantized in memory
    # read before the models and after them: the higher is what the memory can do
    bandwidths = [memory_bandwidth(device, bandwidth_mb)]
    run = run_isolated if isolated else lambda fn, *args: fn(*args)
    dtypes = {name: run(measure_dtype, config, name, device, options, name == "bf16") for name in dtype_names}
    in_turns = None
    if {INT4, "bf16"} <= set(dtype_names):
        in_turns = run(int4_against_bf16, config, device, options)
    bandwidths.append(memory_bandwidth(device, bandwidth_mb))
    headline = "bf16" if device.type == "cuda" else "fp32"
    headline = headline if headline in dtypes else next(iter(dtypes))
    serving_name = "bf16" if "bf16" in dtypes else next(iter(dtypes))
    serving = dtypes[serving_name]  # batching, the second turn and the engine: the serving dtype
    return {
        "config": config_name,
        "model_config": config,
        "device": device_name,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "fast_path": serving["fast_path"],
        "baseline": serving["baseline"],
        "batch_sizes": [1, *options.batch_sizes],
        **decode_speed.ratios(dtypes, max(bandwidths), headline, serving_name),
        "int4_over_bf16_decode": None if in_turns is None else in_turns["int4_over_bf16"],
        "int4_against_bf16_in_turns": in_turns,
        **first_token.ratios(dtypes, serving_name),
        **engine_speed.ratios(serving),
        "memory_bandwidth_bytes_per_s": max(bandwidths),
        "memory_bandwidth_before_and_after_bytes_per_s": bandwidths,
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in dtypes.values()),
        "other_processes_cores": other_load.cores(),
        "checkpoint": checkpoint_load(config, loaded, device) if load_time else None,
        "dtypes": dtypes,
    }


# -- report -----------------------------------------------------------------------------------------

RATIOS = (
    (
        "decode_speedup_vs_baseline",
        "decode, fast path over baseline (batch 1, {decode_speedup_vs_baseline_dtype})",
    ),
    ("bf16_over_fp32_decode", "decode, bf16 over fp32 (batch 1, fast path)"),
    ("int4_over_bf16_decode", "decode, Int4 over bf16 (batch 1, fast path, in turns)"),
    ("int4_over_bf16_decode_separate_runs", "decode, Int4 over bf16 (batch 1, fast path, runs apart)"),
    ("batch{b}_over_batch1_throughput", "decode tokens/s, batch {b} over batch 1 (bf16)"),
    ("decode_roofline_fraction", "decode roofline fraction (batch 1, bf16)"),
    ("first_token_speedup_vs_baseline", "time to first token, fast path over baseline (bf16)"),
    ("second_turn_speedup", "turn 2's first token in the engine, whole prompt over prefix reused"),
    ("chat_second_turn_speedup", "model.chat turn 2, whole prompt over PrefixCache"),
    ("engine_over_generate_decode", "one request's decode, engine over generate"),
    ("engine_graphs_speedup", "one request's decode in the engine, CUDA graphs over none"),
)


def ratio_rows(results: dict) -> list[list]:
    rows = []
    for key, label in RATIOS:
        for b in results["batch_sizes"][1:] if "{b}" in key else [None]:
            value = results.get(key.format(b=b))
            rows.append([label.format(b=b, **results), "not measured" if value is None else value])
    for name, value in results["decode_speedup_vs_baseline_per_dtype"].items():
        rows.append([f"decode, fast path over baseline, {name}", value])
    rows += [
        ["memory bandwidth, tensor copy (GB/s)", results["memory_bandwidth_bytes_per_s"] / 1e9],
        ["peak RSS, the larger process (MiB)", results["peak_rss_bytes"] / MIB],
        ["other processes' load during the run (cores)", results["other_processes_cores"]],
        ["greedy tokens equal (every dtype)", str(results["greedy_tokens_equal"])],
    ]
    return rows


def dtype_rows(r: dict, bandwidth: float) -> list[tuple[str, float]]:
    rows = [
        *first_token.table_rows(r),
        *decode_speed.table_rows(r, bandwidth),
        *engine_speed.table_rows(r),
    ]
    if "peak_gpu_memory_bytes" in r:
        rows.append(("peak GPU memory (MiB)", r["peak_gpu_memory_bytes"] / MIB))
    rows.append(("loaded model: parameters and buffers (MiB)", r["model_bytes"] / MIB))
    rows.append(("peak RSS of its process (MiB)", r["peak_rss_bytes"] / MIB))
    return rows


def report(results: dict) -> str:
    bandwidth = results["memory_bandwidth_bytes_per_s"]
    columns = {name: dict(dtype_rows(r, bandwidth)) for name, r in results["dtypes"].items()}
    if results["checkpoint"] is not None:
        for name, column in columns.items():
            if name in results["checkpoint"]["seconds"]:  # not for the Int4 model, quantized in memory
                column["checkpoint load, bf16 .bin shards in the page cache (s)"] = results["checkpoint"][
                    "seconds"
                ][name]
    labels = list(dict.fromkeys(label for column in columns.values() for label in column))
    rows = [[label, *(column.get(label, "") for column in columns.values())] for label in labels]
    parameters = next(iter(results["dtypes"].values()))["parameters"]
    settings = results["fast_path"]["kernel_settings"]
    lines = [
        f"Config {results['config']} on {results['device_name'] or results['device']}: "
        f"{parameters / 1e6:.1f}M parameters; fast path {describe(results['fast_path'])}, "
        f"baseline {describe(results['baseline'])}",
        *([f"kernel settings: {settings}"] if settings else []),
        "",
        markdown_table(["figure", *columns], rows),
        "",
        markdown_table(["ratio", "value"], ratio_rows(results)),
    ]
    return "\n".join(lines)


def kernel_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> KernelSettings | None:
    """--settings, changed by the flags; None: the device's own (`KernelSettings.for_device`)."""
    changes = {
        name: False
        for name, off in (("flash_decoding", args.sdpa_decode), ("matvec", args.no_matvec),
                          ("dependent_launch", args.no_dependent_launch))
        if off
    }  # fmt: skip
    if args.settings is None and not changes:
        return None
    try:
        settings = (
            KernelSettings.load(args.settings) if args.settings else KernelSettings.for_device(args.device)
        )
    except ValueError as error:
        parser.error(f"--settings: {error}")
    return settings.with_changes(**changes)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS, default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    modes = [m for m in DECODE_MODES if m != "plain"]
    parser.add_argument("--mode", choices=modes, default="auto", help="the fast path's decode mode")
    parser.add_argument(
        "--ops", choices=BACKENDS, default=None, help="the fast path's backend (default: the device's)"
    )
    parser.add_argument(
        "--settings", type=Path, default=None, help="the Triton kernels' KernelSettings (JSON)"
    )
    parser.add_argument(
        "--sdpa-decode", action="store_true", help="decode attention through SDPA, not the kernel"
    )
    parser.add_argument(
        "--no-matvec", action="store_true", help="batch-1 products through cuBLAS, not the kernel"
    )
    parser.add_argument(
        "--no-dependent-launch", action="store_true", help="kernels launched as usual, not early"
    )
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument(
        "--int4", action="store_true",
        help="also the Int4 model (bf16 with its LLM Linears in 4 bits): int4_over_bf16_decode",
    )  # fmt: skip
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32, 64], help="besides batch 1")
    parser.add_argument("--decode-steps", type=int, default=16, help="timed greedy steps per measurement")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs of encode, first token, turn 2, engine"
    )
    parser.add_argument("--engine-tokens", type=int, default=64, help="new tokens of the engine's request")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--load-time",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time loading a checkpoint of the config (default: on but for real, whose 19 GB take minutes)",
    )
    add_json_option(
        parser, "run_{config}_{device}.json (with the GPU's model on CUDA: run_real_cuda_h200.json)"
    )
    args = parser.parse_args(argv)
    if args.config == "real" and args.device != "cuda":
        parser.error("config 'real' (the real Qwen-VL-Chat shapes, 9.6B parameters) needs --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.int4 and "bf16" not in args.dtypes:
        parser.error("--int4 compares the Int4 model with bf16: keep bf16 in --dtypes")
    if any(b < 2 for b in args.batch_sizes):
        parser.error("--batch-sizes: each must be at least 2 (batch 1 is always measured)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    fast = DecodePath(args.mode, args.ops, kernel_settings(parser, args))
    options = Options(
        fast, tuple(sorted(set(args.batch_sizes))), args.decode_steps, repeats=args.repeats,
        engine_tokens=args.engine_tokens, threads=torch.get_num_threads(),
    )  # fmt: skip
    load_time = args.config != "real" if args.load_time is None else args.load_time
    dtype_names = [*args.dtypes, *([INT4] if args.int4 else [])]
    results = measure(args.config, args.device, options, dtype_names=dtype_names, load_time=load_time)
    print(report(results))
    name = f"run_{args.config}_{device_kind(args.device)}"
    path = json_path(args, name + ".json")
    save_record(path, name, results, args.device)
    print(f"\nsaved {path}")
    if not results["greedy_tokens_equal"]:
        sys.exit("the fast path's greedy tokens differ from the baseline's")


if __name__ == "__main__":
    main()
