"""Our CPU kernels (decode/cpu_kernels.c): products of a few rows over bf16 weights and over GPTQ's
packed codes, against exact references, the same bits at any thread count and batch, and PyTorch's
products where the kernels cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenvl.decode import cpu_kernels
from qwenvl.int4 import GPTQSettings
from qwenvl.int4.gptq import pack_rows
from qwenvl.int4.quantize import quantize_linear

KERNELS = cpu_kernels.kernels()
needs_kernels = pytest.mark.skipif(
    KERNELS is None, reason="our CPU kernels do not build here (no C compiler or AVX2)"
)


def sum_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What fp32 sums of x w^T in any order may differ from the exact sum by: at most one rounding
    (2^-24 relative) of each partial sum, K of them, each at most sum |x| |w|."""
    return (x.double().abs() @ weight.double().abs().t()) * weight.shape[1] * 2**-24


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_product_is_the_exact_product_within_fp32_sums(rows, bias):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(132, 96, generator=generator).bfloat16()
    b = torch.randn(132, generator=generator) if bias else None
    x = torch.randn(rows, 96, generator=generator)
    exact = x.double() @ weight.double().t() + (0 if b is None else b.double())
    got = KERNELS.bf16_product(x, weight, b)
    assert got.dtype == torch.float32
    assert ((got.double() - exact).abs() <= sum_bound(x, weight.float()) + exact.abs() * 2**-24).all()


@needs_kernels
def test_bf16_outputs_are_the_fp32_sums_rounded_as_torch_rounds():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 64, generator=generator).bfloat16()
    x = torch.randn(3, 64, generator=generator).bfloat16()
    rounded = KERNELS.bf16_product(x, weight, None)
    assert rounded.dtype == torch.bfloat16
    assert torch.equal(rounded, KERNELS.bf16_product(x.float(), weight, None).bfloat16())
    nan = x.clone()
    nan[1, 5] = float("nan")
    assert torch.isnan(KERNELS.bf16_product(nan, weight, None)[1]).all()


def quantized(in_features: int, out_features: int, bias: bool = True, checkpoint_format: str = "gptq"):
    generator = torch.Generator().manual_seed(in_features)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator))
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=generator))
    settings = GPTQSettings(group_size=32, checkpoint_format=checkpoint_format)
    return quantize_linear(linear, settings, torch.float32)


def int4_product(x, int4, bias=None, dot=None):
    """Our kernel over `int4`'s own codes, scales and zero points."""
    zeros = (int4.qzeros, int4.settings.zero_offset)
    return KERNELS.int4_product(x, int4.qweight, int4.scales, *zeros, 32, bias, dot=dot)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_int4_product_over_packed_codes_is_the_dequantized_product(rows, scale_dtype, checkpoint_format):
    """Codes, scales and zero points read as the layer holds them: zero points stored as zero - 1
    (v1) or as they are (v2), scales in fp32 or bf16."""
    int4 = quantized(128, 96, checkpoint_format=checkpoint_format)
    int4.scales = int4.scales.to(scale_dtype)
    weight = int4.dequantize()  # exact: scale * (code - zero) in fp32
    scales = int4.scales.float()
    offsets = -scales * int4.zeros().float()
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
    got = int4_product(x, int4, bias=int4.bias.float())
    exact = x.double() @ weight.double().t() + int4.bias.double()
    # each group's sum of x * code (codes up to 15) and of x are fp32 sums, then scaled once
    codes_bound = sum_bound(x, torch.full_like(weight, 15.0)) * scales.abs().max().double()
    zeros_bound = sum_bound(x, torch.ones_like(weight)) * offsets.abs().max().double()
    assert ((got.double() - exact).abs() <= codes_bound + zeros_bound + sum_bound(x, weight) + 1e-6).all()


needs_dot = pytest.mark.skipif(
    KERNELS is None or not KERNELS.bf16_dot, reason="this CPU has no AVX512-BF16 dot products"
)


@needs_dot
@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_int4_product_through_bf16_dot_products(rows, scale_dtype, checkpoint_format):
    """bf16 rows through AVX512-BF16 dot products, which read each code as 128 + code and take
    128 * sum(x) back with the zero point: exact products, fp32 sums of terms up to 143 |x|, then
    the outputs rounded once to bf16."""
    int4 = quantized(128, 96, checkpoint_format=checkpoint_format)
    int4.scales = int4.scales.to(scale_dtype)
    weight = int4.dequantize()
    scales = int4.scales.float()
    shifted = scales * (int4.zeros().float() + 128)  # the zero point's term, with the codes' 128
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)).bfloat16()
    got = int4_product(x, int4, bias=int4.bias.float(), dot=True)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, int4_product(x, int4, bias=int4.bias.float()))  # where it has them, the default
    exact = x.double() @ weight.double().t() + int4.bias.double()
    codes_bound = sum_bound(x, torch.full_like(weight, 143.0)) * scales.abs().max().double()
    # sum(x) in fp32, times scale * (zero + 128) rounded once (exact with bf16 scales)
    x_total = x.double().abs().sum(-1, keepdim=True)
    zeros_bound = (sum_bound(x, torch.ones_like(weight)) + x_total * 2**-24) * shifted.abs().max().double()
    error = codes_bound + zeros_bound + sum_bound(x, weight)
    # and one rounding to bf16: half a unit in the last of its 8 significant bits
    assert ((got.double() - exact).abs() <= error + (exact.abs() + error) * 2**-8).all()


@needs_kernels
def test_dot_products_are_refused_where_they_cannot_be():
    int4 = quantized(128, 96)
    with pytest.raises(ValueError, match="bf16 rows"):
        int4_product(torch.randn(1, 128), int4, dot=True)  # fp32 rows
    if not KERNELS.bf16_dot:
        with pytest.raises(ValueError, match="bf16 rows"):
            int4_product(torch.randn(1, 128).bfloat16(), int4, dot=True)


@needs_kernels
def test_codes_at_every_bit_position_count():
    """A code of 15 at each of the eight positions of a word, the top one included (whose bits
    reach the sign bit of the int32)."""
    codes = torch.zeros(64, 32, dtype=torch.uint8)
    codes[torch.arange(64), torch.arange(64) % 32] = 15
    qweight = pack_rows(codes)
    scales, qzeros = torch.ones(2, 32), torch.zeros(2, 4, dtype=torch.int32)  # zero points 0 (v2)
    x = torch.eye(64)
    got = torch.cat([KERNELS.int4_product(rows, qweight, scales, qzeros, 0, 32, None) for rows in x.split(8)])
    assert torch.equal(got, codes.float())
    with pytest.raises(ValueError, match="at most 8 rows"):
        KERNELS.int4_product(x[:9], qweight, scales, qzeros, 0, 32, None)


@needs_kernels
def test_products_do_not_depend_on_threads_or_the_other_rows():
    weight = torch.randn(300, 64).bfloat16()
    int4 = quantized(64, 64)
    x = torch.randn(5, 64)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(
                (
                    KERNELS.bf16_product(x, weight, None),
                    int4_product(x, int4),
                    int4_product(x.bfloat16(), int4),  # through dot products where the CPU has them
                )
            )
            alone = (
                KERNELS.bf16_product(x[3:4], weight, None),
                int4_product(x[3:4], int4),
                int4_product(x[3:4].bfloat16(), int4),
            )
            assert all(torch.equal(a, b[3:4]) for a, b in zip(alone, results[-1], strict=True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_without_a_compiler_the_products_stay_pytorchs(tiny_model, monkeypatch, tmp_path):
    import copy

    from qwenvl.decode import cpu_ops

    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built before
    monkeypatch.setattr(cpu_ops, "onednn_bf16", lambda: False)
    cpu_kernels.kernels.cache_clear()
    try:
        assert cpu_kernels.kernels() is None
        ops = cpu_ops.CpuOps(copy.deepcopy(tiny_model).to(torch.bfloat16))
        assert ops.kernels is None and ops.copies == 0  # every product PyTorch's own
    finally:
        cpu_kernels.kernels.cache_clear()


def test_the_switch_turns_them_off(monkeypatch):
    monkeypatch.setenv("QWENVL_CPU_KERNELS", "0")
    cpu_kernels.kernels.cache_clear()
    try:
        assert cpu_kernels.kernels() is None
    finally:
        cpu_kernels.kernels.cache_clear()


@needs_kernels
@pytest.mark.parametrize("pack_bf16", [False, True])
def test_a_bf16_model_decodes_through_them_as_accurately_as_through_pytorch(
    tiny_model, tokenizer, in_golden_dir, pack_bf16
):
    """Both round each product's fp32 sums once to bf16 and differ only in the order of the sums,
    so against the same model computed in fp32 their logits err alike: bf16 roundings, layer
    after layer. Ours may not err more than twice PyTorch's. With oneDNN's copies (CPUs with
    native bf16), decode steps still take our kernels."""
    import copy

    from qwenvl.decode import Decoder
    from qwenvl.decode.cpu_ops import CpuOps, onednn_bf16

    if pack_bf16 and not onednn_bf16():
        pytest.skip("oneDNN's bf16 copies need native bf16 products")

    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    in_fp32 = copy.deepcopy(model).float()  # the same (bf16) weights, computed in fp32
    prompt = tokenizer.encode("The capital of France is")
    fed = [13, 576, 6722, 315, 9625]  # the same tokens fed to every decoder

    def logits(target, ops) -> torch.Tensor:
        decoder = Decoder(target, 1, len(prompt) + len(fed), ops=ops)
        steps = [decoder.prefill([prompt])]
        steps += [decoder.step(torch.tensor([token])) for token in fed[:-1]]
        return torch.stack(steps).float()

    with torch.no_grad():
        exact = logits(in_fp32, "torch")
        ours = logits(model, CpuOps(model, pack_bf16=pack_bf16))
        pytorchs = logits(model, CpuOps(model, pack_bf16=False, own_kernels=False))
    assert (ours - exact).abs().max() <= 2 * (pytorchs - exact).abs().max()


@needs_kernels
@pytest.mark.parametrize("width", [64, 128, 40])  # the two head sizes it has its own code for, and another
def test_one_query_attention_over_a_strided_cache_with_hidden_keys(width):
    """Against fp32 attention over the same bf16 values: the kernel sums in fp32 and rounds once to
    bf16 (2^-9 relative, of values at most max |v|), while fp32 sums and its exp (within a few units
    in the last place of fp32) err by far less."""
    generator = torch.Generator().manual_seed(0)
    cache = torch.randn(
        2, 2, 3, 40, width, generator=generator
    ).bfloat16()  # [keys/values, B, H, capacity, D]
    keys, values = cache[0, :, :, :29], cache[1, :, :, :29]  # a view of the first 29 positions
    query = torch.randn(2, 3, 1, width, generator=generator).bfloat16()
    mask = torch.zeros(2, 1, 1, 29)
    mask[0, ..., 20:] = float("-inf")  # row 0 sees 20 keys, row 1 all 29
    mask[1, ..., 3] = float("-inf")
    mask = mask.bfloat16()
    got = KERNELS.attend_one_query(query, keys, values, mask)
    expected = F.scaled_dot_product_attention(
        query.float(), keys.float(), values.float(), attn_mask=mask.float()
    )
    assert got.dtype == torch.bfloat16 and got.shape == query.shape
    bound = 2**-9 * values.float().abs().amax() + 1e-5
    assert ((got.float() - expected).abs() <= bound).all()
    poisoned = values.clone()
    poisoned[0, :, 25] = float("nan")  # a hidden position is never read
    assert torch.equal(KERNELS.attend_one_query(query, keys, poisoned, mask)[0], got[0])
    # as softmax gives them: NaN for a row that sees no key, and for one that sees a NaN
    assert torch.isnan(KERNELS.attend_one_query(query, keys, values, torch.full_like(mask, -torch.inf))).all()
    broken = keys.clone()
    broken[1, :, 5] = float("nan")  # row 1 sees position 5
    assert torch.isnan(KERNELS.attend_one_query(query, broken, values, mask)[1]).all()


@needs_kernels
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm_rounds_where_the_modules_norm_rounds(with_delta):
    """Ours against RMSNorm's PyTorch spelling, in bf16. The sum x + delta is one bf16 rounding of an
    exact fp32 sum, so it is equal bit for bit. The norm's mean of squares sums in another order, so
    its scale may differ in the last fp32 bits (relative 2^-24 times a few hundred partial sums, far
    below bf16's 2^-8): each of the two bf16 roundings after it may then go the other way, one bf16
    step (2^-8 relative) each, and almost all values are equal."""
    from qwenvl.model.llm import RMSNorm
    from qwenvl.model.ops import TORCH_OPS

    generator = torch.Generator().manual_seed(3)
    norm = RMSNorm(1024, eps=1e-6).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(1024, generator=generator))
    x = (torch.randn(3, 1024, generator=generator) * 4).bfloat16()
    delta = torch.randn(3, 1024, generator=generator).bfloat16() if with_delta else None
    with torch.no_grad():
        want_sum, want = TORCH_OPS.add_norm(x, delta, norm)
    got_sum, got = KERNELS.add_rms_norm(x, delta, norm.weight.detach(), norm.eps)
    assert torch.equal(got_sum, want_sum)
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2**-7).all()
    assert (got == want).float().mean() > 0.99


@needs_kernels
@pytest.mark.parametrize("logn", [True, False])
def test_rotary_and_cache_write_give_pytorchs_bits(tiny_model, logn):
    """One token per row, one row past seq_length (where the log-n scale is not 1), rows with
    different NTK alphas: the queries and both caches hold the same bits as PyTorch's."""
    import copy
    import dataclasses

    from qwenvl.cache import KVCache
    from qwenvl.decode.cpu_ops import CpuOps
    from qwenvl.model.llm import Step, rotary_inv_freq
    from qwenvl.model.ops import TORCH_OPS

    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    cfg = model.transformer.llm_config
    heads, width = cfg.num_attention_heads, cfg.kv_channels
    capacity = cfg.seq_length + 16
    cache = KVCache.for_model(model, 2, capacity)
    cache.inv_freq = rotary_inv_freq([1.0, 3.0], cfg)
    cache.lengths = torch.tensor([5, capacity - 1])
    step = Step.static_decode(cfg, cache)
    if not logn:
        step = dataclasses.replace(step, logn=None)
    assert logn == (step.logn is not None and bool((step.logn != 1).any()))
    theirs = dataclasses.replace(step, cache=copy.deepcopy(cache))
    qkv = torch.randn(2, 1, 3 * heads * width, generator=torch.Generator().manual_seed(0)).bfloat16() * 3
    with torch.no_grad():
        ours_query, _, _ = CpuOps(model).rotate_and_store(qkv, step, 1, heads, width)
        their_query, _, _ = TORCH_OPS.rotate_and_store(qkv, theirs, 1, heads, width)
    assert torch.equal(ours_query, their_query)
    assert torch.equal(cache.keys[1], theirs.cache.keys[1]) and torch.equal(
        cache.values[1], theirs.cache.values[1]
    )
    assert cache.keys[1].abs().sum() > 0  # written


@needs_kernels
def test_a_position_outside_the_cache_is_refused():
    keys = torch.zeros(1, 2, 4, 8).bfloat16()
    qkv, table = torch.zeros(1, 3 * 2 * 8).bfloat16(), torch.ones(1, 8)
    with pytest.raises(IndexError, match="outside the cache"):
        KERNELS.rotate_to_cache(qkv, table, table, None, torch.tensor([4]), keys, keys.clone())
