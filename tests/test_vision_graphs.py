"""The vision tower replayed as a CUDA graph, and the prefill that does not wait for it.

On CPU: where the graphs stay out of the way, and the host-side knowledge (`KVCache.empty`, ids
on the host) the prefill relies on. On a GPU (benchmarks/gpu_checks.sh runs these): the replay
gives the tower's features, captures again when the weights move, and a prefill into a fresh
cache asks the GPU nothing before its logits.
"""

from __future__ import annotations

import copy

import pytest
import torch

from qwenvl import vision_graphs
from qwenvl.cache import KVCache
from qwenvl.chat_format import make_context
from qwenvl.decode import Decoder
from qwenvl.model.llm import Step
from qwenvl.transfers import to_device

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def pixels_for(model, n: int, device="cpu") -> torch.Tensor:
    size = model.transformer.vision_config.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n)).to(device)


def image_prompt(tokenizer) -> list[int]:
    return make_context(tokenizer, "Picture 1: <img>images/shapes.png</img>\nWhat is this?")[1]


def test_the_tower_runs_its_forward_wherever_no_graph_serves(tiny_model):
    visual = tiny_model.transformer.visual
    pixels = pixels_for(tiny_model, 2)
    with torch.no_grad():
        assert not vision_graphs.graphable(visual, pixels)  # CPU
        assert torch.equal(vision_graphs.encode_pixels(visual, pixels), visual(pixels))


def test_a_fresh_cache_is_known_empty_until_something_writes_it(tiny_model, tokenizer):
    llm = tiny_model.transformer.llm_config
    cache = KVCache(llm, 1, 400)
    assert cache.empty
    with torch.inference_mode():
        Decoder(tiny_model, cache=cache).prefill([tokenizer.encode("a b c")])
    assert not cache.empty and cache.lengths.tolist() == [3]
    assert not cache.select([0]).empty and not KVCache.concat([cache, cache]).empty
    # a cache written behind the flag's back (flag left False) is asked on the device: still right
    unflagged = KVCache(llm, 1, 400)
    unflagged.empty = False
    step = Step.build(llm, 1, 3, unflagged, [3])
    assert step.fresh


def test_prefill_from_host_ids_writes_each_image_span(tiny_model, tokenizer):
    """The ids stay on the host for the spans; the features land where the device ids would put them."""
    prompt = image_prompt(tokenizer)
    visual = tiny_model.transformer.visual
    with torch.inference_mode():
        features = visual(pixels_for(tiny_model, 1))
        host = tiny_model.transformer.embed(torch.tensor([prompt]), features)
        ids = torch.tensor([prompt], device=tiny_model.device)
        assert torch.equal(host, tiny_model.transformer.embed(ids, features))
        cache = KVCache(tiny_model.transformer.llm_config, 1, len(prompt) + 1)
        logits = Decoder(tiny_model, cache=cache).prefill([prompt], features)
        whole = tiny_model(input_ids=torch.tensor([prompt]), image_features=features).logits[:, -1]
    torch.testing.assert_close(logits, whole)


def test_to_device_copies_on_the_host():
    values = torch.tensor([3, 4])
    moved = to_device(values, torch.device("cpu"))
    assert torch.equal(moved, values)


@NEEDS_CUDA
def test_replayed_tower_gives_the_eager_features_and_follows_its_weights(tiny_model):
    model = copy.deepcopy(tiny_model).cuda().eval()
    visual = model.transformer.visual
    with torch.inference_mode():
        for n in (1, 2, 1):  # a graph per batch size, replayed again
            pixels = pixels_for(model, n, "cuda")
            torch.testing.assert_close(vision_graphs.encode_pixels(visual, pixels), visual(pixels))
    visual.to(torch.bfloat16)  # the weights move: the graph of 1 image is captured again
    with torch.inference_mode():
        pixels = pixels_for(model, 1, "cuda")
        torch.testing.assert_close(vision_graphs.encode_pixels(visual, pixels), visual(pixels))
    with torch.no_grad():  # out of inference mode: the features are the caller's to change
        features = vision_graphs.encode_pixels(visual, pixels)
        features.add_(1)
    pixels = pixels_for(model, 1, "cuda").requires_grad_(True)
    assert vision_graphs.encode_pixels(visual, pixels).requires_grad  # with gradients: the forward


@NEEDS_CUDA
def test_prefill_into_a_fresh_cache_does_not_wait_for_the_gpu(tiny_model, tokenizer):
    model = copy.deepcopy(tiny_model).cuda().eval()
    visual = model.transformer.visual
    prompt = image_prompt(tokenizer)
    pixels = pixels_for(model, 1, "cuda")
    llm = model.transformer.llm_config
    with torch.inference_mode():
        expected = Decoder(model, cache=KVCache(llm, 1, 400, device="cuda")).prefill([prompt], visual(pixels))
        vision_graphs.encode_pixels(visual, pixels)  # captured here: capturing waits
        decoder = Decoder(model, cache=KVCache(llm, 1, 400, device="cuda"))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = decoder.prefill([prompt], vision_graphs.encode_pixels(visual, pixels))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(logits, expected)


def test_the_host_knows_each_rows_length(tiny_model, tokenizer):
    """What lets a prefill into a cache that holds a conversation (and a plain step) launch its
    kernels without asking the device how long the rows are."""
    from qwenvl.prefix_cache import PrefixCache

    cache = KVCache(tiny_model.transformer.llm_config, 2, 40)
    decoder = Decoder(tiny_model, cache=cache)
    decoder.prefill([[1, 2, 3], [4, 5]])
    assert cache.held == cache.lengths.tolist() == [3, 2]
    decoder.step(torch.tensor([6, 7]))
    Decoder(tiny_model, cache=cache, mode="plain").step(torch.tensor([8, 9]))
    assert cache.held == cache.lengths.tolist() == [5, 4]
    assert cache.select([1]).held == [4] and KVCache.concat([cache, cache.select([0])]).held == [5, 4, 5]
    kept = PrefixCache()
    kept.keep([1, 2, 3, 6], cache.select([0]))
    restored = KVCache(tiny_model.transformer.llm_config, 1, 40)
    assert kept.restore(tiny_model, [1, 2, 3, 6, 10, 11], restored) == 4
    assert restored.held == restored.lengths.tolist() == [4]


@NEEDS_CUDA
def test_a_second_turns_prefill_does_not_wait_for_the_gpu(tiny_model, tokenizer):
    from qwenvl.prefix_cache import PrefixCache

    model = copy.deepcopy(tiny_model).cuda().eval()
    llm = model.transformer.llm_config
    first = tokenizer.encode("a b c d e f g h")
    with torch.inference_mode():
        cache = KVCache(llm, 1, 40, device="cuda")
        Decoder(model, cache=cache).prefill([first])
        kept = PrefixCache()
        kept.keep(first, cache)
        second = KVCache(llm, 1, 40, device="cuda")
        start = kept.restore(model, [*first, 5, 6, 7], second)
        decoder = Decoder(model, cache=second)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            decoder.prefill([[*first, 5, 6, 7][start:]])
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_without_native_bf16_a_bf16_tower_computes_in_fp32(tiny_model, monkeypatch):
    """Emulated bf16 products took the mid-size tower 7x its fp32 time (vision_graphs' docstring)."""
    from qwenvl.decode import cpu_ops

    monkeypatch.setattr(cpu_ops, "onednn_bf16", lambda: False)
    bf16 = copy.deepcopy(tiny_model.transformer.visual).to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()  # the same weights, as fp32 copies hold them
    pixels = pixels_for(tiny_model, 1)
    with torch.no_grad():
        features = vision_graphs.encode_pixels(bf16, pixels)
        assert features.dtype == torch.bfloat16
        assert torch.equal(features, fp32(pixels).to(torch.bfloat16))
    assert next(bf16.parameters()).dtype == torch.bfloat16  # the module is left as it was
