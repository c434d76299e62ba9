"""Int4 (GPTQ) checkpoints: the packing, loading such folders, their products, and that an Int4 model
computes, generates and chats exactly as its dequantized copy does; `qwenvl quantize`.

The folders are made here from the golden tiny checkpoint (groups of 64 inputs, so that every
layer has several groups), by `qwenvl quantize` itself and by hand in AutoGPTQ's own layouts.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qwenvl import QwenVLForCausalLM, make_context
from qwenvl.cli import main as cli_main
from qwenvl.decode import Decoder
from qwenvl.decode.cpu_ops import CpuOps
from qwenvl.int4 import GPTQSettings, Int4Linear, dequantize_model
from qwenvl.int4.gptq import pack_rows, pack_zeros, unpack_rows, unpack_zeros
from qwenvl.int4.quantize import quantize_linear
from qwenvl.loading import CheckpointError

from .conftest import NEEDS_TRITON

GROUP = 64
LAYER_NAMES = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
QUESTION = "Name three colours."  # text only: the vision tower is not quantized


def int4_layers(model) -> list[Int4Linear]:
    return [module for module in model.modules() if isinstance(module, Int4Linear)]


def hand_made(in_features: int, out_features: int, settings: GPTQSettings, g_idx=None) -> tuple:
    """An Int4Linear with codes, zeros and scales chosen here, and the weight they stand for."""
    generator = torch.Generator().manual_seed(in_features + out_features)
    groups = settings.groups(in_features)
    codes = torch.randint(0, 16, (in_features, out_features), generator=generator)
    zeros = torch.randint(0, 16, (groups, out_features), generator=generator)
    scales = (torch.rand(groups, out_features, generator=generator) * 0.02 + 0.001).half()
    g_idx = torch.arange(in_features) // settings.group_width(in_features) if g_idx is None else g_idx
    linear = Int4Linear(in_features, out_features, settings, bias=True, dtype=torch.float32)
    linear.qweight.copy_(pack_rows(codes))
    linear.qzeros.copy_(pack_zeros(zeros, settings.zero_offset))
    linear.scales.copy_(scales.float())
    linear.g_idx.copy_(g_idx)
    linear.bias.copy_(torch.randn(out_features, generator=generator) * 0.1)
    weight = scales.float()[g_idx] * (codes - zeros[g_idx]).float()  # [in, out], exact in fp32
    return linear, weight.t()


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def linked_copy(folder: Path, target: Path) -> Path:
    """`folder` with its weight files linked and its other files copied (to be edited)."""
    target.mkdir()
    for item in folder.iterdir():
        if item.is_dir():
            continue
        if item.suffix in (".safetensors", ".bin"):
            os.symlink(item, target / item.name)
        else:
            (target / item.name).write_bytes(item.read_bytes())
    return target


# -- the format -------------------------------------------------------------------------------------


def test_codes_and_zeros_pack_as_gptq_v1_stores_them():
    codes = torch.arange(16 * 8).reshape(16, 8) % 16  # [in 16, out 8]
    qweight = pack_rows(codes)
    assert qweight.shape == (2, 8) and qweight.dtype == torch.int32
    for r in range(2):
        for o in range(8):
            word = sum(int(codes[8 * r + j, o]) << (4 * j) for j in range(8))
            assert int(qweight[r, o]) & 0xFFFFFFFF == word  # input 8r + j in bits 4j
    zeros = torch.tensor([[8] * 8, [0, 1, 2, 3, 15, 14, 13, 12]])
    qzeros = pack_zeros(zeros, zero_offset=1)
    assert qzeros.shape == (2, 1)
    assert int(qzeros[0, 0]) & 0xFFFFFFFF == sum(7 << (4 * j) for j in range(8))  # stored as zero - 1
    assert int(qzeros[1, 0]) & 0xF == 15  # zero 0 wraps to 15, as AutoGPTQ's packing leaves it
    assert torch.equal(unpack_rows(qweight).long(), codes)
    assert torch.equal(unpack_zeros(qzeros, 1).long(), zeros)
    assert torch.equal(unpack_zeros(pack_zeros(zeros, 0), 0).long(), zeros)  # gptq_v2: as they are


@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_follows_each_inputs_group(act_order):
    settings = GPTQSettings(group_size=GROUP, desc_act=act_order)
    g_idx = torch.randperm(256, generator=torch.Generator().manual_seed(0)) // GROUP if act_order else None
    linear, weight = hand_made(256, 64, settings, g_idx)
    assert linear.ordered_groups() is not act_order
    assert torch.equal(linear.dequantize(), weight)
    x = torch.randn(3, 256)
    assert torch.equal(linear(x), F.linear(x, weight.contiguous(), linear.bias))


# the kernel and the reference (F.linear over the weights rounded to the dtype) both sum in fp32;
# they differ by roundings to the dtype (2^-9 in bf16, 2^-24 in fp32) of what a weight is computed
# from: (code - 8) * scale and the offset scale * (8 - zero), at most 16 scales each, and of the
# output, and by sums in another order (at most one fp32 rounding, 2^-24, per term summed):
# 4 roundings to the dtype and one fp32 rounding per input of sum |x| (|w| + 16 scale)
ROUNDING = {torch.bfloat16: 2**-9, torch.float32: 2**-24}


@pytest.mark.parametrize("own_kernels", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act_order", [False, True])
def test_cpu_backend_int4_products_stay_within_rounding(act_order, dtype, own_kernels):
    from qwenvl.decode.cpu_kernels import kernels
    from qwenvl.decode.int4_cpu import int4_product

    if own_kernels and kernels() is None:
        pytest.skip("our CPU kernels do not build here (no C compiler or no AVX2)")
    settings = GPTQSettings(group_size=GROUP, desc_act=act_order)
    g_idx = torch.randperm(256, generator=torch.Generator().manual_seed(1)) // GROUP if act_order else None
    linear, _ = hand_made(256, 128, settings, g_idx)
    linear = linear.to(dtype)
    product = int4_product(linear, dtype, kernels() if own_kernels else None)
    assert product is not None
    # act-order layers always take torch's kernel; in-order ones ours for up to 8 rows
    assert (product.few_rows is not None) is (own_kernels and not act_order)
    for rows in (1, 5, 9):
        x = torch.randn(rows, 1, 256).to(dtype)
        expected = linear(x).float()
        scales = linear.scales.float()[linear.g_idx.long()].t()  # [out, in]
        relative = 4 * ROUNDING[dtype] + 256 * 2**-24
        bound = (x.float().abs() @ (linear.dequantize().abs() + 16 * scales).t()) * relative
        assert ((product(x).float() - expected).abs() <= bound).all()


@NEEDS_TRITON
@pytest.mark.parametrize("rows", [1, 3])
def test_triton_int4_kernels_give_the_reference_product(rows):
    """fp32 throughout: the kernels sum the same products in another order (one row: x * code,
    then the group's scale and zero point), so they differ by fp32 roundings of sums of at most
    sum |x| * 16 scale: far below 2^-16 of it."""
    from qwenvl.decode.int4_kernels import int4_linear, takes

    linear, _ = hand_made(256, 64, GPTQSettings(group_size=128))
    assert takes(linear)
    x = torch.randn(rows, 1, 256, generator=torch.Generator().manual_seed(rows))
    scales = linear.scales.float()[linear.g_idx.long()].t()  # [out, in]
    bound = (x.abs() @ (16 * scales).t()) * 2**-16
    assert ((int4_linear(linear, x) - linear(x)).abs() <= bound).all()


def test_settings_refuse_what_cannot_load():
    with pytest.raises(ValueError, match="bits 8"):
        GPTQSettings.from_dict({"bits": 8, "group_size": 128})
    with pytest.raises(ValueError, match="checkpoint_format 'marlin'"):
        GPTQSettings.from_dict({"bits": 4, "group_size": 128, "checkpoint_format": "marlin"})
    with pytest.raises(ValueError, match="quant_method 'awq'"):
        GPTQSettings.from_dict({"bits": 4, "quant_method": "awq"})
    with pytest.raises(ValueError, match="group_size 0"):
        GPTQSettings.from_dict({"bits": 4, "group_size": 0})


# -- quantize and load ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int4_folder(tiny_checkpoint, tmp_path_factory) -> Path:
    """`qwenvl quantize` of the golden tiny checkpoint (fp16 scales and other weights, as official)."""
    target = tmp_path_factory.mktemp("int4") / "tiny-int4"
    assert (
        cli_main(["quantize", "--bits", "4", "--group-size", str(GROUP), str(tiny_checkpoint), str(target)])
        == 0
    )
    return target


@pytest.fixture(scope="module")
def int4_model(int4_folder) -> QwenVLForCausalLM:
    return QwenVLForCausalLM.from_pretrained(int4_folder, fp32=True)


@pytest.fixture(scope="module")
def dequantized(int4_model) -> QwenVLForCausalLM:
    """The model the Int4 one stands for: plain Linears holding the dequantized weights."""
    model = copy.deepcopy(int4_model)
    assert dequantize_model(model) == 10
    return model


def test_quantize_writes_a_gptq_folder(int4_folder, tiny_checkpoint):
    assert json.loads((int4_folder / "quantize_config.json").read_text())["group_size"] == GROUP
    config = json.loads((int4_folder / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4
    assert (int4_folder / "qwen.tiktoken").exists()  # the tokenizer comes along
    from safetensors import safe_open

    with safe_open(str(int4_folder / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("transformer.h.0.mlp.w1.qweight").get_dtype() == "I32"
        assert f.get_slice("transformer.h.0.mlp.w1.scales").get_dtype() == "F16"
        assert "transformer.h.0.mlp.w1.weight" not in f.keys()


def test_round_to_nearest_lands_within_half_a_step(tiny_model):
    linear = tiny_model.transformer.h[0].mlp.w1
    int4 = quantize_linear(linear, GPTQSettings(group_size=GROUP), torch.float16)
    step = int4.scales.float()[int4.g_idx.long()].t()  # [out, in]
    error = (int4.dequantize() - linear.weight.detach()).abs()
    # the largest weight of a group lies 7.5 steps out: fp16's rounding of the scale (2^-11) moves
    # its nearest point by up to 7.5 * 2^-11 steps
    assert (error <= step / 2 * (1 + 2**-6)).all()


def test_int4_folder_loads_packed(int4_model):
    layers = int4_layers(int4_model)
    assert len(layers) == 5 * len(int4_model.transformer.h)
    assert int4_model.transformer.h[1].mlp.c_proj is layers[-1]
    assert all(layer.qweight.dtype == torch.int32 for layer in layers)
    assert all(layer.scales.dtype == torch.float32 for layer in layers)  # the model's dtype
    assert not any(name.endswith(("w1.weight", "c_attn.weight")) for name, _ in int4_model.named_parameters())
    packed = sum(layer.qweight.nbytes for layer in layers)
    assert packed * 8 == sum(layer.in_features * layer.out_features * 4 for layer in layers)  # vs fp32


def test_auto_model_loads_an_int4_folder(int4_folder, int4_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(int4_folder, fp32=True)
    assert len(int4_layers(model)) == len(int4_layers(int4_model))
    assert torch.equal(
        model.transformer.h[0].attn.c_attn.qweight, int4_model.transformer.h[0].attn.c_attn.qweight
    )


def test_logits_equal_the_dequantized_models(int4_model, dequantized, tokenizer):
    """The same weights, rounded nowhere (fp32 holds scale * (code - zero) exactly), through the same
    F.linear calls: the same logits to the last bit, well within the 1e-3 asked of fp32."""
    _, prompt = make_context(tokenizer, QUESTION)
    with torch.no_grad():
        got = int4_model(torch.tensor([prompt])).logits
        expected = dequantized(torch.tensor([prompt])).logits
    assert torch.equal(got, expected)


def test_decoding_stays_within_1e_3_of_the_dequantized_model(int4_model, dequantized, tokenizer):
    """On CPU a decode step's fp32 int4 products go through the int4 kernel (the prompt's, of more
    rows, through the reference): they differ from the dequantized model's by fp32 roundings, far
    within the 1e-3 asked of the logits, and the greedy tokens of generate and chat are equal."""
    _, prompt = make_context(tokenizer, QUESTION)
    decoders = [Decoder(model, 1, len(prompt) + 1) for model in (int4_model, dequantized)]
    assert decoders[0].ops.copies - decoders[1].ops.copies == len(int4_layers(int4_model))
    first = [decoder.prefill([prompt]) for decoder in decoders]
    torch.testing.assert_close(first[0], first[1], rtol=0, atol=1e-3)
    second = [decoder.step(first[1].argmax(-1)) for decoder in decoders]
    torch.testing.assert_close(second[0], second[1], rtol=0, atol=1e-3)
    ids = torch.tensor([prompt])
    options = {"do_sample": False, "max_new_tokens": 8}
    assert torch.equal(int4_model.generate(ids, **options), dequantized.generate(ids, **options))
    assert int4_model.chat(tokenizer, QUESTION, **options) == dequantized.chat(tokenizer, QUESTION, **options)


def test_bf16_decoding_runs_on_the_packed_products(int4_folder, tokenizer):
    model = QwenVLForCausalLM.from_pretrained(int4_folder, bf16=True)
    # every Int4 layer through the int4 kernels (ours also takes the bf16 head where it builds)
    assert CpuOps(model, pack_bf16=False, own_kernels=False).copies == len(int4_layers(model))
    ops = CpuOps(model, pack_bf16=False)
    assert ops.copies == len(int4_layers(model)) + (ops.kernels is not None)
    _, prompt = make_context(tokenizer, "What is 2+2?")
    decoder = Decoder(model, 1, len(prompt) + 4, ops=ops)
    logits = decoder.prefill([prompt])
    for _ in range(3):
        logits = decoder.step(logits.argmax(-1))
    assert torch.isfinite(logits).all()


# -- AutoGPTQ's own layouts -------------------------------------------------------------------------


def test_autogptq_layout_with_zero_biases_in_a_bin_loads(int4_folder, int4_model, tmp_path, tokenizer):
    """As AutoGPTQ before 0.8 saved Qwen-VL-Chat-Int4: a bias for every quantized layer (zeros
    where the model has none), quantize_config.json alone, here in a .bin file."""
    from safetensors.torch import load_file

    state = load_file(str(int4_folder / "model.safetensors"))
    for index in range(len(int4_model.transformer.h)):
        for name in LAYER_NAMES:
            key = f"transformer.h.{index}.{name}.bias"
            state.setdefault(
                key, torch.zeros(state[key.replace(".bias", ".scales")].shape[1], dtype=torch.float16)
            )
    folder = tmp_path / "autogptq"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    config = json.loads((int4_folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "quantize_config.json").write_text((int4_folder / "quantize_config.json").read_text())
    model = QwenVLForCausalLM.from_pretrained(folder, fp32=True)
    assert all(layer.bias is not None for layer in int4_layers(model))
    _, prompt = make_context(tokenizer, QUESTION)
    with torch.no_grad():
        got, expected = model(torch.tensor([prompt])).logits, int4_model(torch.tensor([prompt])).logits
    # a zero bias makes F.linear an addmm, which may sum in another order: fp32 rounding only
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_sharded_save_round_trip(int4_model, tmp_path):
    int4_model.save_pretrained(tmp_path / "saved", max_shard_size=8 * 2**20)
    assert (tmp_path / "saved" / "model.safetensors.index.json").exists()
    again = QwenVLForCausalLM.from_pretrained(tmp_path / "saved", fp32=True)
    for a, b in zip(int4_layers(again), int4_layers(int4_model), strict=True):
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)


# -- bad folders ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, changes, culprit",
    [
        ("quantize_config.json", {"bits": 8}, "bits 8"),
        ("quantize_config.json", {"checkpoint_format": "marlin"}, "marlin"),
        ("quantize_config.json", {"group_size": 32}, "disagree"),
        ("config.json", {"quantization_config": {"bits": 3}}, "quantization_config: bits 3"),
    ],
)
def test_bad_quantization_configs_are_named(int4_folder, tmp_path, where, changes, culprit):
    folder = linked_copy(int4_folder, tmp_path / "bad")
    edit_json(folder / where, **changes)
    with pytest.raises(CheckpointError, match=culprit):
        QwenVLForCausalLM.from_pretrained(folder, fp32=True)


def test_unquantized_folder_marked_quantized_is_refused(tiny_checkpoint, tmp_path):
    folder = linked_copy(tiny_checkpoint, tmp_path / "marked")
    edit_json(folder / "quantize_config.json", bits=4, group_size=128)
    with pytest.raises(CheckpointError, match="marked quantized but holds none"):
        QwenVLForCausalLM.from_pretrained(folder, fp32=True)


def test_float_codes_are_refused(int4_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(int4_folder / "model.safetensors"))
    state["transformer.h.0.mlp.w2.qweight"] = state["transformer.h.0.mlp.w2.qweight"].float()
    folder = linked_copy(int4_folder, tmp_path / "float")
    os.remove(folder / "model.safetensors")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="transformer.h.0.mlp.w2.qweight is torch.float32"):
        QwenVLForCausalLM.from_pretrained(folder, fp32=True)


def test_the_benchmarks_int4_model_and_ratio():
    from benchmarks import run
    from benchmarks.decode_speed import ratios
    from benchmarks.models import INT4, build_measured_model, llm_weight_bytes, model_bytes, model_config

    config = dict(model_config("tiny"), vocab_size=2048)  # a small vocabulary: faster to build
    int4, bf16 = build_measured_model(config, INT4), build_measured_model(config, "bf16")
    assert len(int4_layers(int4)) == 5 * len(int4.transformer.h) and not int4_layers(bf16)
    assert model_bytes(int4) < model_bytes(bf16) and llm_weight_bytes(int4) < llm_weight_bytes(bf16)
    record = {"decode_tokens_per_s_fast_batch1": 3.0, "decode_tokens_per_s_baseline_batch1": 1.0}
    record |= {"llm_weight_bytes_per_step": 1, "batch_sizes": [1], "greedy_tokens_equal": True}
    figures = ratios(
        {"bf16": record, INT4: dict(record, decode_tokens_per_s_fast_batch1=4.5)}, 1.0, "bf16", "bf16"
    )
    assert figures["int4_over_bf16_decode_separate_runs"] == 1.5
    assert {"int4_over_bf16_decode", "int4_over_bf16_decode_separate_runs"} <= dict(run.RATIOS).keys()
