"""The CPU's layouts of the weights: the same products, copies that follow their weights."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn.functional as F

from qwenvl import cpu_weights
from qwenvl.cache import KVCache
from qwenvl.cpu_weights import cpu_products
from qwenvl.generation import decode_step, prefill
from qwenvl.static_decode import DecodeRunner

pytestmark = pytest.mark.usefixtures("in_golden_dir")
PACKS = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
NEEDS_PACKING = pytest.mark.skipif(not PACKS, reason="needs oneDNN's bf16 kernels")


@pytest.fixture
def bf16_model(tiny_model):
    return copy.deepcopy(tiny_model).to(torch.bfloat16)


def products(model, packed=True):
    return cpu_products(model.transformer, model.lm_head, packed)


@pytest.fixture
def packed_calls(monkeypatch):
    """A list that grows by one at every call of a packed product."""
    calls = []
    original = cpu_weights._PackedBF16.__call__
    monkeypatch.setattr(
        cpu_weights._PackedBF16, "__call__", lambda self, x: calls.append(1) or original(self, x)
    )
    return calls


def llm_linears(model):
    for block in model.transformer.h:
        yield from (block.attn.c_attn, block.attn.c_proj, block.mlp.w1, block.mlp.w2, block.mlp.c_proj)
    yield model.lm_head


@NEEDS_PACKING
@pytest.mark.parametrize("rows", [1, 2, 8, 33])
def test_packed_bf16_products_give_the_bits_of_f_linear(bf16_model, rows):
    made = products(bf16_model)
    linears = list(llm_linears(bf16_model))
    assert set(made) == set(linears)
    generator = torch.Generator().manual_seed(rows)
    for linear in linears:
        x = torch.randn(rows, 1, linear.in_features, generator=generator).to(torch.bfloat16) * 3
        assert torch.equal(made[linear](x), F.linear(x, linear.weight, linear.bias))


@NEEDS_PACKING
def test_packed_bf16_decoding_gives_the_same_logits(bf16_model, tokenizer, monkeypatch):
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode("a b c d e f g h i j " * 7)]

    def decode(make_advance):
        cache = KVCache(bf16_model.transformer.llm_config, 2, 90, torch.bfloat16)
        logits, outputs = prefill(bf16_model, prompts, cache), []
        advance = make_advance(cache)
        with torch.inference_mode():
            for _ in range(6):
                outputs.append(logits)
                logits = advance(logits.argmax(-1))
        return torch.stack(outputs)

    def runner(cache):
        return DecodeRunner(bf16_model, cache, "static")

    packed = decode(runner)
    monkeypatch.setattr(cpu_weights, "PACK_BF16", False)
    unpacked = decode(runner)
    plain = decode(lambda cache: lambda tokens: decode_step(bf16_model, tokens, cache))
    assert torch.equal(packed, unpacked)
    assert torch.equal(packed.argmax(-1), plain.argmax(-1))


def test_the_fp32_head_copy_follows_the_weight(tiny_model):
    head = tiny_model.lm_head
    product = products(tiny_model)[head]
    x = torch.randn(2, head.in_features)
    torch.testing.assert_close(product(x), head(x))
    assert set(products(tiny_model)) == {head}  # fp32 blocks keep their weights
    assert products(tiny_model)[head] is product  # built once
    original = head.weight.detach().clone()
    try:
        with torch.no_grad():
            head.weight[0].add_(1.0)  # an in-place update, as an optimizer step makes
        rebuilt = products(tiny_model)[head]
        assert rebuilt is not product
        torch.testing.assert_close(rebuilt(x), head(x))
    finally:
        with torch.no_grad():
            head.weight.copy_(original)


@NEEDS_PACKING
def test_packed_copies_follow_new_storage_and_go_with_their_weights(tiny_model):
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    linear = model.transformer.h[0].mlp.w1
    product = products(model)[linear]
    with torch.no_grad():
        linear.weight.data = linear.weight.data * 2  # new storage, as loading or packing makes
    rebuilt = products(model)[linear]
    assert rebuilt is not product
    x = torch.randn(1, linear.in_features).to(torch.bfloat16)
    assert torch.equal(rebuilt(x), F.linear(x, linear.weight))
    copies = len(cpu_weights._COPIES)
    del model, linear, product, rebuilt
    gc.collect()
    assert len(cpu_weights._COPIES) == copies - len(list(llm_linears(tiny_model)))


@NEEDS_PACKING
def test_bf16_copies_only_when_memory_allows(bf16_model, monkeypatch):
    monkeypatch.setattr(cpu_weights, "_free_memory", lambda: 0)
    assert set(products(bf16_model)) == set()
    monkeypatch.setattr(cpu_weights, "PACK_BF16", True)
    assert len(products(bf16_model)) == len(list(llm_linears(bf16_model)))
    monkeypatch.setattr(cpu_weights, "PACK_BF16", False)
    assert products(bf16_model) == {}
    monkeypatch.setattr(cpu_weights, "PACK_BF16", None)
    assert len(products(bf16_model)) > 0  # made already: they cost nothing more


def test_wrapped_linears_and_other_devices_keep_their_own_forward(bf16_model):
    class Wrapped(torch.nn.Module):  # what an adapter library puts in a Linear's place
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.in_features = inner.in_features

        def forward(self, x):
            return self.inner(x)

    mlp = bf16_model.transformer.h[0].mlp
    mlp.w1 = Wrapped(mlp.w1)
    assert mlp.w1 not in products(bf16_model)
    assert products(bf16_model, packed=False) == {}
    meta = copy.deepcopy(bf16_model).to("meta")
    assert products(meta) == {}


@NEEDS_PACKING
def test_prefills_use_the_packed_products_without_gradients_only(
    bf16_model, tokenizer, monkeypatch, packed_calls
):
    ids = torch.tensor([tokenizer.encode("a b c d e f g h i j " * 4)])
    calls = packed_calls

    def hidden():
        with torch.no_grad():
            return bf16_model.transformer(bf16_model.transformer.embed(ids))

    packed = hidden()
    assert len(calls) == 5 * len(bf16_model.transformer.h)
    monkeypatch.setattr(cpu_weights, "PACK_BF16", False)
    assert torch.equal(packed, hidden())
    monkeypatch.setattr(cpu_weights, "PACK_BF16", None)
    calls.clear()
    bf16_model.transformer(bf16_model.transformer.embed(ids)).float().sum().backward()
    assert not calls and bf16_model.transformer.h[0].mlp.w1.weight.grad is not None


def test_free_memory_is_known_here():
    assert cpu_weights._free_memory() > 0


@NEEDS_PACKING
def test_prefill_logits_take_the_packed_head(bf16_model, packed_calls):
    hidden = torch.randn(3, bf16_model.config.hidden_size).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(cpu_weights.head_logits(bf16_model, hidden), bf16_model.lm_head(hidden))
    assert packed_calls == [1]
    assert cpu_weights.head_logits(bf16_model, hidden).requires_grad  # with gradients: the module
