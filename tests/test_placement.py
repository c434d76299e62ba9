"""Spreading a model over several devices (`device_map`, `max_memory`): the plans as pure functions
over fake memory sizes (the real Qwen-VL-Chat's units on the meta device, tiny configs), the maps
that are refused and why, a map of the CPU alone loading and decoding as the unsplit model, and on
GPUs a model split over two devices choosing the one-device model's tokens."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from qwenvl import QwenVLConfig, QwenVLForCausalLM
from qwenvl.cache import KVCache
from qwenvl.chat_format import make_context
from qwenvl.config import LLMConfig
from qwenvl.decode import Decoder
from qwenvl.decode.decoder import resolve_mode
from qwenvl.generation import SamplingParams, generate_tokens
from qwenvl.loading import load_config
from qwenvl.placement import (
    PlacementError,
    first_device,
    memory_budgets,
    model_devices,
    place,
    placement_groups,
    plan,
    unit_of,
    unit_sizes,
    units,
)

REAL = Path(__file__).parent / "data" / "real-qwen-vl-chat"
GIB = 2**30
CUDA0, CUDA1, CPU = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")


@pytest.fixture(scope="module")
def real_meta_model() -> QwenVLForCausalLM:
    with torch.device("meta"):
        return QwenVLForCausalLM(load_config(str(REAL)))


@pytest.fixture(scope="module")
def real_sizes(real_meta_model) -> dict[str, int]:
    return unit_sizes(real_meta_model, torch.bfloat16)


def tiny_meta_model(tiny_config: dict, **overrides) -> QwenVLForCausalLM:
    with torch.device("meta"):
        return QwenVLForCausalLM(QwenVLConfig.from_dict(dict(tiny_config, **overrides)))


@pytest.fixture
def two_gpus(monkeypatch):
    """Two CUDA devices, as far as placement asks (whether CUDA is there, and how many)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def blocks(start: int, stop: int) -> list[str]:
    return [f"transformer.h.{i}" for i in range(start, stop)]


def names_on(placed: dict[str, torch.device], device: torch.device) -> list[str]:
    return [name for name, where in placed.items() if where == device]


def bytes_on(placed: dict[str, torch.device], sizes: dict[str, int], device: torch.device) -> int:
    return sum(sizes[name] for name in names_on(placed, device))


# -- the units and their sizes -------------------------------------------------------------------------


def test_the_units_hold_every_tensor_of_the_real_checkpoint_at_its_size(real_meta_model, real_sizes):
    names = [name for name, _ in units(real_meta_model)]
    assert names == ["transformer.visual", "transformer.wte", *blocks(0, 32), "transformer.ln_f", "lm_head"]
    assert {unit_of(key) for key in real_meta_model.state_dict()} == set(names)
    index = json.loads((REAL / "pytorch_model.bin.index.json").read_text())
    assert sum(real_sizes.values()) == index["metadata"]["total_size"]  # bf16, as published


def test_a_tied_head_counts_once_and_follows_the_embedding(tiny_config, two_gpus):
    model = tiny_meta_model(tiny_config, tie_word_embeddings=True)
    sizes = unit_sizes(model, torch.float32)
    assert sizes["lm_head"] == 0
    # cuda:0 holds the tower and the embedding alone: the blocks and the final norm go to cuda:1
    first = sizes["transformer.visual"] + sizes["transformer.wte"]
    where = place(model, "sequential", torch.float32, {0: first, 1: 10**9})
    assert where.units["transformer.ln_f"] == CUDA1
    assert where.units["lm_head"] == where.units["transformer.wte"] == CUDA0
    with pytest.raises(PlacementError, match="share one weight"):
        place(model, {"transformer": 0, "lm_head": 1}, torch.float32)


# -- plans over fake memory ----------------------------------------------------------------------------


def test_auto_spreads_the_real_model_over_two_12gib_gpus_about_evenly(real_sizes):
    """The published 19.3 GB in bf16 on two 12 GiB cards: the tower with the first blocks."""
    placed = plan(placement_groups(real_sizes), {CUDA0: 12 * GIB, CUDA1: 12 * GIB}, "auto")
    assert names_on(placed, CUDA0) == ["transformer.visual", "transformer.wte", *blocks(0, 12)]
    assert names_on(placed, CUDA1) == [*blocks(12, 32), "transformer.ln_f", "lm_head"]
    loads = [bytes_on(placed, real_sizes, device) for device in (CUDA0, CUDA1)]
    assert max(loads) <= 12 * GIB - 2 * GIB  # room on each for the KV cache and activations
    assert abs(loads[0] - loads[1]) < GIB
    # where one GPU holds it all, "auto" keeps it there (graphed steps); "balanced" spreads it still
    roomy = {CUDA0: 24 * GIB, CUDA1: 24 * GIB}
    assert set(plan(placement_groups(real_sizes), roomy, "auto").values()) == {CUDA0}
    assert set(plan(placement_groups(real_sizes), roomy, "balanced").values()) == {CUDA0, CUDA1}


def test_sequential_fills_the_first_gpu_and_low_0_leaves_it_as_empty_as_it_can(real_sizes):
    groups, budgets = placement_groups(real_sizes), {CUDA0: 12 * GIB, CUDA1: 12 * GIB}
    sequential = plan(groups, budgets, "sequential")
    assert names_on(sequential, CUDA0)[2:] == blocks(0, 19)  # the 20th block would pass 12 GiB
    assert bytes_on(sequential, real_sizes, CUDA0) <= 12 * GIB
    low_0 = plan(groups, budgets, "balanced_low_0")
    assert names_on(low_0, CUDA0)[2:] == blocks(0, 4)
    assert bytes_on(low_0, real_sizes, CUDA1) <= 12 * GIB


def test_what_the_gpus_cannot_hold_goes_to_the_cpu_in_order(real_sizes):
    placed = plan(placement_groups(real_sizes), {CUDA0: 12 * GIB, CPU: 64 * GIB}, "auto")
    assert names_on(placed, CUDA0) == ["transformer.visual", "transformer.wte", *blocks(0, 19)]
    assert names_on(placed, CPU) == [*blocks(19, 32), "transformer.ln_f", "lm_head"]


def test_a_model_too_big_for_the_memory_offered_is_refused_naming_where_it_stops(real_sizes):
    with pytest.raises(PlacementError, match=r"do not fit .* transformer\.h\.29 and what follows"):
        plan(placement_groups(real_sizes), {CUDA0: 8 * GIB, CUDA1: 8 * GIB}, "balanced")
    with pytest.raises(PlacementError, match="unknown device_map strategy 'even'"):
        plan(placement_groups(real_sizes), {CUDA0: 8 * GIB, CUDA1: 8 * GIB}, "even")


def test_a_group_goes_past_a_device_too_small_for_it_and_never_back():
    groups = [(("first",), 6), (("a",), 2), (("b",), 2), (("last",), 3)]
    placed = plan(groups, {CUDA0: 4, CUDA1: 9, CPU: 0, torch.device("cuda", 2): 5}, "sequential")
    # cuda:0 cannot hold the first group; a later, smaller one does not go back to it
    assert placed == {
        "first": CUDA1,
        "a": CUDA1,
        "b": torch.device("cuda", 2),
        "last": torch.device("cuda", 2),
    }


def test_place_reads_max_memory_and_describes_its_plan(real_meta_model, two_gpus):
    where = place(real_meta_model, "balanced", torch.bfloat16, {1: "12GiB", 0: 12 * GIB})
    assert where.spread and where.devices == [CUDA0, CUDA1]
    assert where.device_of("transformer.h.12.mlp.w1.weight") == CUDA1
    assert where.device_of("transformer.visual.conv1.weight") == CUDA0
    assert where.describe() == (
        "cuda:0: transformer.visual, transformer.wte, transformer.h.0-11\n"
        "cuda:1: transformer.h.12-31, transformer.ln_f, lm_head"
    )
    assert first_device("auto", {"cpu": "1GiB", 1: "2GiB"}) == CUDA1  # the dtype is chosen for it
    assert first_device({"transformer": "cpu", "lm_head": 1}) == CUDA1


def test_memory_sizes_are_read_as_written_and_the_gpus_filled_first(real_meta_model, two_gpus):
    budgets = memory_budgets({"cpu": 1024, 1: "500MiB", 0: "1.5 GB"})
    assert list(budgets.items()) == [(CUDA0, 1_500_000_000), (CUDA1, 500 * 2**20), (CPU, 1024)]
    for size in ("12 parsecs", -1, 1.5, True):
        with pytest.raises(PlacementError, match=r"max_memory\[0\]=.* is not a size"):
            place(real_meta_model, "auto", torch.bfloat16, {0: size})
    with pytest.raises(PlacementError, match="offloading to 'disk' is not supported"):
        place(real_meta_model, "auto", torch.bfloat16, {0: "1GiB", "disk": "1TiB"})


# -- maps of module names --------------------------------------------------------------------------------


def test_the_longest_name_decides_and_the_original_weightless_modules_are_accepted(tiny_config, two_gpus):
    model = tiny_meta_model(tiny_config)
    where = place(model, {"": 1, "transformer.h.0": 0, "transformer.visual": "cuda:0"}, torch.float32)
    assert names_on(where.units, CUDA0) == ["transformer.visual", "transformer.h.0"]
    assert where.units["lm_head"] == CUDA1
    # maps written for the original implementation name its dropout and rotary modules
    where = place(model, {"transformer.drop": 0, "transformer.rotary_emb": 0, "": "cpu"}, torch.float32)
    assert not where.spread and where.devices == [CPU]


@pytest.mark.parametrize(
    ("device_map", "message"),
    [
        ({"": "disk"}, "offloading to 'disk' is not supported"),
        ({"transformer": "meta", "lm_head": "cpu"}, "offloading to 'meta' is not supported"),
        ({"transformer.h.7": 0, "": "cpu"}, "names 'transformer.h.7': this model has no such module"),
        ({"transformer": "cpu"}, "leaves lm_head.weight unplaced"),
        ({"": "cpu", "transformer.h.1.mlp": 0}, "puts parts of transformer.h.1 on cpu and cuda:0"),
        ({"": 2, "lm_head": 0}, r"device_map\[''\]=2: there are 2 CUDA devices"),
        ({"": "cpu", "lm_head": "tpu"}, r"device_map\['lm_head'\]='tpu' is not a device"),
    ],
)
def test_a_map_that_cannot_place_the_model_is_refused_naming_why(tiny_config, two_gpus, device_map, message):
    with pytest.raises(PlacementError, match=message):
        place(tiny_meta_model(tiny_config), device_map, torch.float32)


def test_a_map_naming_a_gpu_without_cuda_is_refused(tiny_config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PlacementError, match=r"device_map\['lm_head'\]='cuda:0' asks for CUDA"):
        place(tiny_meta_model(tiny_config), {"transformer": "cpu", "lm_head": "cuda:0"}, torch.float32)


# -- the KV cache and the decoder ----------------------------------------------------------------------


def test_a_cache_keeps_a_tensor_per_layer_and_copies_rows_layer_by_layer():
    config = LLMConfig(num_attention_heads=2, kv_channels=4, num_hidden_layers=3)
    cache = KVCache(config, 2, 5, layer_devices=["cpu"] * 3)
    for layer, (keys, values) in enumerate(zip(cache.keys, cache.values, strict=True)):
        keys.copy_(torch.arange(keys.numel()).view(keys.shape) + 1000 * layer)
        values.copy_(-keys)
    cache.set_lengths([4, 2])
    picked = cache.select([1], capacity=3)
    assert [tuple(k.shape) for k in picked.keys] == [(1, 2, 3, 4)] * 3 and picked.held == [2]
    assert all(torch.equal(p, k[1:, :, :3]) for p, k in zip(picked.values, cache.values, strict=True))
    merged = KVCache.concat([picked, cache])
    assert merged.capacity == 5 and merged.held == [2, 4, 2]
    assert all(
        not k[0, :, 3:].any() and torch.equal(k[1:], c) for k, c in zip(merged.keys, cache.keys, strict=True)
    )
    fresh = KVCache(config, 1, 5)
    fresh.copy_prefix(picked, 2)
    assert all(
        torch.equal(f[:, :, :2], p[:, :, :2]) and not f[:, :, 2:].any()
        for f, p in zip(fresh.keys, picked.keys, strict=True)
    )
    assert fresh.layout == cache.layout
    with pytest.raises(ValueError, match="2 layer devices for 3 layers"):
        KVCache(config, 1, 5, layer_devices=["cpu", "cpu"])


def test_a_spread_model_decodes_without_graphs():
    gpu = torch.device("cuda", 0)
    assert resolve_mode("auto", gpu) == "cuda_graph"
    assert resolve_mode("auto", gpu, spread=True) == "static"
    assert resolve_mode("plain", gpu, spread=True) == "plain"
    for mode in ("cuda_graph", "compile"):
        with pytest.raises(ValueError, match=f"decode mode '{mode}' records the step on one device"):
            resolve_mode(mode, gpu, spread=True)


# -- loading -------------------------------------------------------------------------------------------

CPU_ONLY = {"transformer.visual": "cpu", "transformer.wte": "cpu", "transformer.h": "cpu", "": "cpu"}


def test_a_map_of_the_cpu_alone_loads_and_decodes_as_the_unsplit_model(
    tiny_checkpoint, tiny_model, tokenizer
):
    model = QwenVLForCausalLM.from_pretrained(tiny_checkpoint, fp32=True, device_map=CPU_ONLY)
    assert model_devices(model) == [CPU]
    assert KVCache.for_model(model, 1, 8).layer_devices == [CPU, CPU]
    prompts = [tokenizer.encode("The capital of France is")]
    params = SamplingParams(max_new_tokens=4)
    assert generate_tokens(model, prompts, params) == generate_tokens(tiny_model, prompts, params)


def test_a_plan_over_the_cpu_alone_loads_the_unsplit_models_weights(tiny_checkpoint, tiny_model):
    model = QwenVLForCausalLM.from_pretrained(
        tiny_checkpoint, fp32=True, device_map="sequential", max_memory={"cpu": "2GiB"}
    )
    assert model_devices(model) == [CPU]
    expected = tiny_model.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())


def test_from_pretrained_refuses_a_plan_that_does_not_fit_before_reading_weights(tiny_checkpoint):
    with pytest.raises(PlacementError, match=r"do not fit in the memory offered \(cpu: 0.01 GiB\)"):
        QwenVLForCausalLM.from_pretrained(tiny_checkpoint, device_map="auto", max_memory={"cpu": "10MiB"})


# -- on GPUs -------------------------------------------------------------------------------------------

IMAGE_QUERY = "Picture 1: <img>images/shapes.png</img>\nWhat is this?"


def greedy(model, prompts: list[list[int]], features, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [B, steps] and every step's logits [steps, B, V] (on the host), through one
    decoder of static steps in plain PyTorch: what a spread model's "auto" decodes with."""
    decoder = Decoder(model, len(prompts), max(map(len, prompts)) + steps + 1, mode="static", ops="torch")
    logits, tokens, seen = decoder.prefill(prompts, features), [], []
    for _ in range(steps):
        seen.append(logits.cpu())
        tokens.append(logits.argmax(-1))
        logits = decoder.step(tokens[-1])
    return torch.stack(tokens, 1).cpu(), torch.stack(seen)


def compare_with_one_gpu(spread, tiny_model, tokenizer, tolerance: float) -> None:
    """`spread` (the tiny model loaded over several devices) and the tiny model on cuda:0 alone
    choose the same greedy tokens, with logits within `tolerance`, for a prompt with an image and
    one past seq_length; and the spread model's `generate` decodes as its decoder does."""
    alone = copy.deepcopy(tiny_model).to("cuda:0")
    prompts = [make_context(tokenizer, IMAGE_QUERY)[1], tokenizer.encode("a b c d e f g h i j " * 7)]
    tokens, logits = greedy(spread, prompts, spread.encode_images(["images/shapes.png"]), 8)
    expected_tokens, expected_logits = greedy(alone, prompts, alone.encode_images(["images/shapes.png"]), 8)
    torch.testing.assert_close(logits, expected_logits, rtol=tolerance, atol=tolerance)
    assert torch.equal(tokens, expected_tokens)
    ids = torch.tensor(prompts[1:])
    new = spread.generate(ids, do_sample=False, max_new_tokens=8)[0, ids.shape[1] :].tolist()
    assert new == tokens[1, : len(new)].tolist()  # generate stops at an end-of-text, if one comes


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_split_over_two_gpus_decodes_as_on_one_gpu(
    tiny_checkpoint, tiny_model, tokenizer, in_golden_dir
):
    device_map = {"transformer.visual": 0, "transformer.wte": 0, "transformer.h.0": 0, "": 1}
    model = QwenVLForCausalLM.from_pretrained(tiny_checkpoint, fp32=True, device_map=device_map)
    assert model_devices(model) == [CUDA0, CUDA1]
    assert KVCache.for_model(model, 1, 8).layer_devices == [CUDA0, CUDA1]
    # the same kernels over the same shapes on GPUs of one kind: equal but for float noise
    compare_with_one_gpu(model, tiny_model, tokenizer, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_model_split_over_a_gpu_and_the_cpu_decodes_as_on_the_gpu(
    tiny_checkpoint, tiny_model, tokenizer, in_golden_dir
):
    # a boundary each way, and the final norm apart from the head: the second block and the
    # final norm on the CPU, the head back on the GPU
    device_map = {"transformer.h.1": "cpu", "transformer.ln_f": "cpu", "": 0}
    model = QwenVLForCausalLM.from_pretrained(tiny_checkpoint, fp32=True, device_map=device_map)
    assert model_devices(model) == [CUDA0, CPU]
    assert Decoder(model, 1, 8).mode == "static"
    # fp32 sums on two kinds of processor round apart (1e-6 relative), far below the top tokens' gaps
    compare_with_one_gpu(model, tiny_model, tokenizer, 1e-4)
