"""The benchmark run's eager baseline matches the fast path, and its record holds the five ratios
and the checkpoint's load time."""

from __future__ import annotations

import json

import pytest
import torch
from benchmarks.common import save_record
from benchmarks.model_speed import prompt_ids
from benchmarks.run import (
    LOAD_LABEL,
    FastPath,
    GrowingCache,
    decode_run,
    greedy_tokens_equal,
    measure,
    report,
)

from qwenvl.generation import prefill

pytestmark = pytest.mark.usefixtures("in_golden_dir", "one_thread")

RATIOS = (
    "decode_speedup_vs_eager",
    "bf16_over_fp32_decode",
    "batch8_over_batch1_throughput",
    "second_turn_speedup",
    "decode_roofline_fraction",
)


@pytest.fixture
def one_thread():
    """On a shared 2-core machine two threads stall behind any other busy process; one keeps this fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Triton's interpreter runs each of the kernel's programs as Python: 6 steps keep it to seconds
@pytest.mark.parametrize(("attention", "steps"), [("default", 16), ("flash_decoding", 6)])
def test_growing_cache_baseline_equals_static_fast_path(tiny_model, tokenizer, attention, steps, request):
    """One image + question (301 tokens, past seq_length 64: NTK and log-n in play), greedy steps.

    Also with every decode step's attention in fused_decode's kernel, as on a GPU (Triton's
    interpreter here).
    """
    if attention == "flash_decoding":
        request.getfixturevalue("flash_decoding")
    prompt = prompt_ids(tokenizer)
    with torch.inference_mode():
        size = tiny_model.transformer.vision_config.image_size
        pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        features = tiny_model.transformer.visual(pixels)
    capacity = len(prompt) + 20
    static = FastPath("static")
    equal, baseline, fast = greedy_tokens_equal(tiny_model, prompt, features, static, steps, capacity)
    assert equal and len(baseline) == steps + 1 and baseline == fast
    # batch 2 through the timed path: both rows of both paths agree with the batch-1 tokens
    timing = {"warmup": 1, "steps": 2, "capacity": capacity}
    _, baseline_rows = decode_run(tiny_model, prompt, features, 2, None, **timing)
    _, fast_rows = decode_run(tiny_model, prompt, features, 2, static, **timing)
    assert baseline_rows == fast_rows == [baseline[:4]] * 2


def test_growing_cache_grows_by_concatenation(tiny_model, tokenizer):
    llm = tiny_model.transformer.llm_config
    cache = GrowingCache(llm, 1)
    prompt = tokenizer.encode("a b c d")
    prefill(tiny_model, [prompt], cache)
    shape = (1, llm.num_attention_heads, len(prompt), llm.kv_channels)
    assert all(k.shape == shape for k in cache.keys) and cache.lengths.tolist() == [len(prompt)]
    assert cache.capacity == len(prompt) + 1 and cache.batch_size == 1


def test_tiny_record_has_the_five_ratios_as_numbers(tmp_path):
    # greedy equality over 16 steps is the first test's; here 2 steps keep the run short
    results = measure(
        "tiny",
        "cpu",
        batch_sizes=(3, 8),
        steps=1,
        warmup=0,
        repeats=1,
        bandwidth_mb=8,
        equal_steps=2,
        engine_tokens=3,
    )
    path = tmp_path / "run.json"
    save_record(path, "run_tiny_cpu", results)
    record = json.loads(path.read_text())["results"]
    for key in RATIOS:
        value = record[key]
        assert isinstance(value, float) and value > 0, key
    assert record["batch3_over_batch1_throughput"] > 0 and record["batch_sizes"] == [1, 3, 8]
    assert record["greedy_tokens_equal"] is True
    assert record["dtypes"]["bf16"]["second_turn_time_to_first_token"]["reuse"]["reused_tokens"] > 0
    assert record["engine_over_fast_path_decode"] > 0 and record["chat_second_turn_speedup"] > 0
    assert record["engine_graphs_speedup"] is None  # no graphs on CPU
    assert record["dtypes"]["bf16"]["engine_decode_batch1"]["auto"]["new_tokens"] == 3
    loaded = record["checkpoint"]  # a checkpoint of the config, loaded in each dtype
    assert loaded["shards"] == 10 and loaded["bytes"] > 0
    assert loaded["seconds"].keys() == {"fp32", "bf16"} and min(loaded["seconds"].values()) > 0
    assert LOAD_LABEL in report(results)


def test_one_dtype_leaves_the_cross_dtype_ratio_unmeasured():
    results = measure(
        "tiny",
        "cpu",
        dtype_names=("fp32",),
        batch_sizes=(2,),
        steps=1,
        warmup=0,
        repeats=1,
        bandwidth_mb=8,
        equal_steps=1,
        load_time=False,
        settings={"KEYS_PER_BLOCK": 32},  # benchmarks.tuned's; the CPU's steps have no use for it
    )
    assert results["settings"] == {"KEYS_PER_BLOCK": 32}
    assert results["bf16_over_fp32_decode"] is None and results["second_turn_speedup"] is None
    assert results["checkpoint"] is None and LOAD_LABEL not in report(results)
    assert results["decode_speedup_vs_eager_dtype"] == "fp32" and results["decode_roofline_fraction"] > 0
    assert "not measured" in report(results)
