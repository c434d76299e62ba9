"""The CPU backend: the weights' faster layouts give the same products, made when it is built."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from qwenvl.decode import Decoder, cpu_kernels
from qwenvl.decode import cpu_ops as cpu_ops_module
from qwenvl.decode.backends import ops_for
from qwenvl.decode.cpu_ops import CpuOps

pytestmark = pytest.mark.usefixtures("in_golden_dir")
NEEDS_PACKING = pytest.mark.skipif(not cpu_ops_module.onednn_bf16(), reason="needs oneDNN's bf16 kernels")


@pytest.fixture
def bf16_model(tiny_model):
    return copy.deepcopy(tiny_model).to(torch.bfloat16)


def llm_linears(model):
    for block in model.transformer.h:
        yield from (block.attn.c_attn, block.attn.c_proj, block.mlp.w1, block.mlp.w2, block.mlp.c_proj)
    yield model.lm_head


@NEEDS_PACKING
@pytest.mark.parametrize("rows", [1, 2, 8, 33])
def test_packed_bf16_products_give_the_bits_of_f_linear(bf16_model, rows):
    ops = CpuOps(bf16_model, pack_bf16=True, own_kernels=False)
    assert ops.copies == len(list(llm_linears(bf16_model)))
    generator = torch.Generator().manual_seed(rows)
    with torch.no_grad():
        for linear in llm_linears(bf16_model):
            x = torch.randn(rows, 1, linear.in_features, generator=generator).to(torch.bfloat16) * 3
            assert torch.equal(ops.project(linear, x), F.linear(x, linear.weight, linear.bias))


@NEEDS_PACKING
@pytest.mark.skipif(cpu_kernels.kernels() is None, reason="our CPU kernels do not build here")
def test_with_packed_copies_decode_steps_still_take_our_kernel(bf16_model):
    ops = CpuOps(bf16_model, pack_bf16=True)
    linear = bf16_model.transformer.h[0].mlp.w1
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for rows in (1, cpu_ops_module.OWN_KERNEL_ROWS, cpu_ops_module.OWN_KERNEL_ROWS + 1):
            x = torch.randn(rows, linear.in_features, generator=generator).bfloat16()
            ours = cpu_kernels.kernels().bf16_product(x, linear.weight, None)
            want = ours if rows <= cpu_ops_module.OWN_KERNEL_ROWS else F.linear(x, linear.weight)
            assert torch.equal(ops.project(linear, x), want)


@NEEDS_PACKING
def test_packed_bf16_decoding_gives_the_same_logits(bf16_model, tokenizer):
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode("a b c d e f g h i j " * 7)]

    def decode(mode: str, ops) -> torch.Tensor:
        decoder = Decoder(bf16_model, 2, 90, mode=mode, ops=ops)
        logits, outputs = decoder.prefill(prompts), []
        for _ in range(6):
            outputs.append(logits)
            logits = decoder.step(logits.argmax(-1))
        return torch.stack(outputs)

    packed = decode("static", CpuOps(bf16_model, pack_bf16=True, own_kernels=False))
    unpacked = decode("static", CpuOps(bf16_model, pack_bf16=False, own_kernels=False))
    assert torch.equal(packed, unpacked)


def test_the_fp32_head_copy_gives_the_heads_logits(tiny_model):
    head = tiny_model.lm_head
    ops = CpuOps(tiny_model)
    assert ops.copies == 1  # fp32 blocks keep their weights: only the head is copied
    x = torch.randn(2, head.in_features)
    with torch.no_grad():
        torch.testing.assert_close(ops.logits(head, x), head(x))


def test_a_backend_whose_weights_changed_is_built_again(tiny_model):
    model = copy.deepcopy(tiny_model)
    ops = ops_for(model)
    assert ops_for(model) is ops and ops.current()
    with torch.no_grad():
        model.lm_head.weight[0].add_(1.0)  # an in-place update, as an optimizer step makes
    assert not ops.current()
    rebuilt = ops_for(model)
    assert rebuilt is not ops and rebuilt.current()
    x = torch.randn(1, model.lm_head.in_features)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.logits(model.lm_head, x), model.lm_head(x))


@NEEDS_PACKING
def test_bf16_copies_only_when_memory_allows(bf16_model, monkeypatch):
    monkeypatch.setattr(cpu_ops_module, "free_memory", lambda: 0)
    # our kernels take decode steps without a copy: off here, so that only oneDNN's copies count
    assert CpuOps(bf16_model, own_kernels=False).copies == 0
    assert CpuOps(bf16_model, pack_bf16=True, own_kernels=False).copies == len(list(llm_linears(bf16_model)))
    assert CpuOps(bf16_model, pack_bf16=False, own_kernels=False).copies == 0


def test_wrapped_linears_keep_their_own_forward(bf16_model):
    class Wrapped(torch.nn.Module):  # what an adapter library puts in a Linear's place
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.in_features = inner.in_features

        def forward(self, x):
            return self.inner(x) + 1

    mlp = bf16_model.transformer.h[0].mlp
    mlp.w1 = Wrapped(mlp.w1)
    ops = CpuOps(bf16_model, pack_bf16=True)
    x = torch.randn(1, 1, mlp.w1.in_features).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ops.project(mlp.w1, x), mlp.w1(x))


@NEEDS_PACKING
def test_products_with_gradients_take_the_module(bf16_model):
    ops = CpuOps(bf16_model, pack_bf16=True)
    linear = bf16_model.transformer.h[0].mlp.w1
    out = ops.project(linear, torch.randn(1, 1, linear.in_features).to(torch.bfloat16))
    assert out.requires_grad  # the module's own forward, which autograd follows


def test_free_memory_is_known_here():
    assert cpu_ops_module.free_memory() > 0


def test_without_native_bf16_products_wide_products_compute_in_fp32(bf16_model, monkeypatch):
    """An emulated bf16 product of a prompt's rows took 3-5x its fp32 one (cpu_ops' docstring)."""
    monkeypatch.setattr(cpu_ops_module, "onednn_bf16", lambda: False)
    linear = bf16_model.transformer.h[0].mlp.w1
    prompt = torch.randn(1, cpu_ops_module.KERNEL_ROWS + 1, linear.in_features).bfloat16()
    wide, narrow = prompt[:, : cpu_ops_module.FP32_ROWS], prompt[:, :8]
    with torch.no_grad():

        def in_fp32(x):
            return F.linear(x.float(), linear.weight.float()).bfloat16()

        for own_kernels in (False, True):
            ops = CpuOps(bf16_model, own_kernels=own_kernels)
            assert torch.equal(ops.project(linear, prompt), in_fp32(prompt))
            if ops.kernels is None:  # PyTorch's products: bf16 for a step, fp32 from FP32_ROWS rows
                assert torch.equal(ops.project(linear, wide), in_fp32(wide))
                assert torch.equal(ops.project(linear, narrow), F.linear(narrow, linear.weight))
            else:  # ours up to KERNEL_ROWS rows
                expected = ops.kernels.bf16_product(wide[0], linear.weight, None)
                assert torch.equal(ops.project(linear, wide), expected[None])


def test_asking_for_bf16_on_such_a_cpu_says_what_it_costs(tiny_checkpoint, monkeypatch, capsys):
    import argparse

    from qwenvl import frontend

    parser = argparse.ArgumentParser()
    frontend.add_model_arguments(parser)
    monkeypatch.setattr(cpu_ops_module, "onednn_bf16", lambda: False)
    frontend.load_from_args(parser.parse_args(["--model", str(tiny_checkpoint), "--bf16"]))
    assert "no native bf16 matrix products" in capsys.readouterr().err
    frontend.load_from_args(parser.parse_args(["--model", str(tiny_checkpoint), "--fp32"]))
    assert capsys.readouterr().err == ""
