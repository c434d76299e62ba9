"""The fused decode kernels (Triton) do what the eager layers do, checked on CPU by Triton's interpreter.

conftest.py turns the interpreter on when Triton is installed and no GPU is present. The
interpreter rounds fp32 to bf16 by truncation where a GPU rounds to nearest, so fp32 must match
the eager layers to float noise, while bf16 is held to a bf16 step.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qwenvl import QwenVLConfig, QwenVLForCausalLM, fused_decode
from qwenvl.cache import KVCache
from qwenvl.config import LLMConfig
from qwenvl.demo_model import DEMO_CONFIG
from qwenvl.generation import decode_step, prefill
from qwenvl.model.llm import visible_keys
from qwenvl.static_decode import DecodeRunner, static_decode_step

from .conftest import NEEDS_TRITON

pytestmark = NEEDS_TRITON


def small_model(rotary_pct: float, dtype: torch.dtype) -> QwenVLForCausalLM:
    config = dict(DEMO_CONFIG, rotary_pct=rotary_pct, vocab_size=1000, num_hidden_layers=2, seq_length=8)
    config["visual"] = dict(DEMO_CONFIG["visual"], image_start_id=900)
    torch.manual_seed(0)
    model = QwenVLForCausalLM(QwenVLConfig.from_dict(config)).eval().to(dtype)
    with torch.no_grad():  # the fresh model's zeroed branches would hide mistakes in the blocks
        for p in model.transformer.h.parameters():
            p.normal_(0, 0.05)
    return model


def prefilled(model, lengths: list[int]) -> KVCache:
    """A cache of rows with different lengths (past seq_length: log-n scaling at work)."""
    cache = KVCache(model.transformer.llm_config, len(lengths), max(lengths) + 4, model.dtype)
    rows = [[(7 * i + j) % 800 for j in range(n)] for i, n in enumerate(lengths)]
    with torch.inference_mode():
        prefill(model, rows, cache)
    return cache


def copy(cache: KVCache) -> KVCache:
    return cache.select(list(range(cache.batch_size)))


# matvec's blocks under the interpreter, a function of k as matvec_config is: its 4 rows of 1024
# columns make 256 programs of the small model's packed w1 and w2, each a Python loop here (an
# fp32 step took 5 s); 64 rows of 64 make 16, and walk the columns in several tiles, through
# AHEAD's reads (the tests of matvec alone run the GPU's own blocks)
INTERPRETER_BLOCKS = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3, "AHEAD": True}


@pytest.fixture
def matvec(monkeypatch):
    """The layers' one-row products through fused_decode.matvec, as on a GPU."""
    monkeypatch.setattr(fused_decode, "MATVEC", True)
    monkeypatch.setattr(fused_decode, "matvec_config", lambda k: dict(INTERPRETER_BLOCKS))


@pytest.mark.parametrize("rotary_pct", [1.0, 0.5])
@pytest.mark.parametrize(
    "lengths, first_tokens",
    [([5, 11, 8], [3, 500, 42]), ([11], [3])],  # one row: the layers' products through matvec
)
def test_fused_step_matches_the_eager_layers_in_fp32(matvec, rotary_pct, lengths, first_tokens):
    model = small_model(rotary_pct, torch.float32)
    if len(lengths) == 1:  # as the runners do: the MLP's two matvec calls, the gate inside the second
        fused_decode.pack_gate_weights(model)
    cache = prefilled(model, lengths)
    eager_cache, fused_cache = copy(cache), copy(cache)
    tokens = torch.tensor(first_tokens)
    with torch.inference_mode():
        for _ in range(3):
            eager = static_decode_step(model, tokens, eager_cache, fused=False)
            fused = static_decode_step(model, tokens, fused_cache, fused=True)
            torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
            tokens = eager.argmax(-1)
    # the norms' sums add up in another order: float noise, from the first layer on
    torch.testing.assert_close(fused_cache.keys, eager_cache.keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_cache.values, eager_cache.values, rtol=1e-5, atol=1e-6)
    assert fused_cache.lengths.tolist() == eager_cache.lengths.tolist() == [n + 3 for n in lengths]


def test_fused_step_in_bf16_is_within_a_rounding_step():
    model = small_model(1.0, torch.bfloat16)
    cache = prefilled(model, [6, 10])
    eager_cache, fused_cache = copy(cache), copy(cache)
    tokens = torch.tensor([1, 2])
    with torch.inference_mode():
        eager = static_decode_step(model, tokens, eager_cache, fused=False).float()
        fused = static_decode_step(model, tokens, fused_cache, fused=True).float()
    assert (fused - eager).abs().max() <= 0.05 * eager.abs().max()
    written = (slice(None), [0, 1], slice(None), [6, 10])  # each row's new position, every layer
    keys_gap = (fused_cache.keys[written].float() - eager_cache.keys[written].float()).abs()
    assert keys_gap.max() <= 2**-6 * eager_cache.keys[written].float().abs().max()


def test_add_rms_norm_returns_the_sum_and_its_norm():
    norm = torch.nn.Module()
    norm.weight, norm.eps = torch.rand(40) + 0.5, 1e-6
    x, delta = torch.randn(3, 40), torch.randn(3, 40)
    total, normed = fused_decode.add_rms_norm(x, delta, norm)
    torch.testing.assert_close(total, x + delta)
    expected = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(normed, expected)
    same, _ = fused_decode.add_rms_norm(x, None, norm)
    assert same is x


def test_runner_uses_fused_kernels_only_where_they_run_by_default(tiny_model):
    cache = KVCache(tiny_model.transformer.llm_config, 1, 8)
    assert DecodeRunner(tiny_model, cache).fused is fused_decode.available(cache.keys.device)
    assert DecodeRunner(tiny_model, cache, fused=True).fused is True
    assert DecodeRunner(tiny_model, cache, "compile").fused is False


def masked_attention(query: torch.Tensor, cache: KVCache, layer: int, positions: torch.Tensor):
    """The eager static step's attention: SDPA over the whole capacity under the visibility mask."""
    visible = visible_keys(positions, cache.capacity, query.dtype)
    keys, values = cache.view(layer, cache.capacity)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=visible)[:, :, 0]


def random_cache(dtype: torch.dtype, capacity: int) -> KVCache:
    config = LLMConfig(num_attention_heads=4, kv_channels=32, num_hidden_layers=2)
    cache = KVCache(config, 3, capacity, dtype)
    torch.manual_seed(1)
    cache.keys.normal_(0, 2)  # scores of a few units: a softmax far from uniform
    cache.values.normal_()
    return cache


@pytest.mark.parametrize("splits", [1, 2, 3, 8, 64])
def test_decode_attention_sees_each_rows_keys_in_any_number_of_shares(splits):
    cache = random_cache(torch.float32, 150)
    positions = torch.tensor([[0], [37], [149]])  # a lone key, a short row, the whole capacity
    # a strided view, as the eager layers hand it over: [B, 1, 2, heads, d] -> [B, heads, 1, d]
    query = torch.randn(3, 1, 2, cache.keys.shape[2], cache.keys.shape[4])[:, :, 0].transpose(1, 2)
    step = SimpleNamespace(cache=cache, positions=positions)
    out = fused_decode.decode_attention(query, step, 1, splits=splits)
    torch.testing.assert_close(out, masked_attention(query, cache, 1, positions), rtol=1e-5, atol=1e-5)


def test_decode_attention_in_bf16_is_within_a_rounding_step():
    cache = random_cache(torch.bfloat16, 300)
    positions = torch.tensor([[5], [200], [299]])
    query = torch.randn(3, cache.keys.shape[2], 1, cache.keys.shape[4]).bfloat16()
    step = SimpleNamespace(cache=cache, positions=positions)
    expected = masked_attention(query.float(), random_cache(torch.float32, 300), 1, positions)
    for splits in (1, 4):
        out = fused_decode.decode_attention(query, step, 1, splits=splits).float()
        assert (out - expected).abs().max() <= 2**-6 * expected.abs().max()


def test_attention_shares_fill_the_machine_and_many_queries_take_their_own_blocks():
    cpu = torch.device("cpu")  # the interpreter counts 8 multiprocessors
    few = (fused_decode.KEYS_PER_BLOCK, fused_decode.ATTENTION_WARPS)
    assert fused_decode.attention_blocks(1, cpu) == (*few, 64)  # 8 programs a multiprocessor
    assert fused_decode.attention_blocks(5, cpu) == (*few, 13)
    assert fused_decode.attention_blocks(8, cpu) == (64, 4, 2)  # a query per multiprocessor: 2 programs
    assert fused_decode.attention_blocks(32, cpu) == (64, 4, 1)


def test_silu_gate_is_the_mlps_gate():
    up, gate = torch.randn(2, 3000), torch.randn(2, 3000) * 4
    torch.testing.assert_close(fused_decode.silu_gate(up, gate), up * F.silu(gate))
    up, gate = up.bfloat16(), gate.bfloat16()
    expected = (up * F.silu(gate)).float()
    gap = (fused_decode.silu_gate(up, gate).float() - expected).abs()
    assert (gap <= 2**-6 * expected.abs()).all()  # two roundings (the interpreter's truncate): two bf16 steps


def test_silu_gate_reads_the_halves_of_one_product():
    both = torch.randn(3, 2 * 1500)
    up, gate = both[:, :1500], both[:, 1500:]
    assert torch.equal(
        fused_decode.silu_gate(up, gate), fused_decode.silu_gate(up.contiguous(), gate.contiguous())
    )
    with pytest.raises(ValueError, match="contiguous rows"):
        fused_decode.silu_gate(up.t(), gate.t())


def test_packed_gate_weights_keep_their_parameters_and_values():
    model = small_model(1.0, torch.float32)
    mlps = [block.mlp for block in model.transformer.h]
    params = [(mlp.w1.weight, mlp.w2.weight) for mlp in mlps]
    values = [(w1.clone(), w2.clone()) for w1, w2 in params]
    assert all(fused_decode.gate_weights(mlp) is None for mlp in mlps)
    with torch.inference_mode():  # as a decode runner may be made: the weights must stay trainable
        assert fused_decode.pack_gate_weights(model) == len(mlps)
    for mlp, (w1, w2), (v1, v2) in zip(mlps, params, values, strict=True):
        assert mlp.w1.weight is w1 and mlp.w2.weight is w2
        assert torch.equal(w1, v1) and torch.equal(w2, v2) and not w1.is_inference()
        assert torch.equal(fused_decode.gate_weights(mlp), torch.cat([v1, v2]))
    storage = mlps[0].w1.weight.data_ptr()
    assert fused_decode.pack_gate_weights(model) == len(mlps)  # already packed: nothing moves
    assert mlps[0].w1.weight.data_ptr() == storage

    # training goes on in the packed storage
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    assert not torch.equal(mlps[0].w1.weight, values[0][0])
    assert torch.equal(fused_decode.gate_weights(mlps[0])[: len(values[0][0])], mlps[0].w1.weight)

    model.double()  # moving a model lays its tensors apart again: two products, no stale view
    assert all(fused_decode.gate_weights(mlp) is None for mlp in mlps)


def test_weights_made_in_inference_mode_pack_too():
    with torch.inference_mode():  # a model loaded under inference mode has inference weights
        model = small_model(1.0, torch.float32)
    mlp = model.transformer.h[0].mlp
    expected = torch.cat([mlp.w1.weight, mlp.w2.weight])
    fused_decode.pack_gate_weights(model)
    with torch.no_grad():
        assert torch.equal(fused_decode.gate_weights(mlp), expected)


def test_a_packed_model_saves_and_loads(tmp_path):
    model = small_model(1.0, torch.float32)
    fused_decode.pack_gate_weights(model)
    model.save_pretrained(tmp_path)
    loaded = QwenVLForCausalLM.from_pretrained(tmp_path, fp32=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_gates_with_adapters_or_biases_are_left_alone():
    model = small_model(1.0, torch.float32)
    mlp = model.transformer.h[0].mlp
    mlp.w1 = torch.nn.Linear(mlp.w1.in_features, mlp.w1.out_features)  # with a bias
    mlp.w2 = torch.nn.Sequential(mlp.w2)  # stands for peft's wrapper
    assert fused_decode.pack_gate_weights(model) == len(model.transformer.h) - 1
    assert fused_decode.gate_weights(mlp) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_product_for_both_gate_weights_gives_the_same_step(dtype):
    model = small_model(0.5, dtype)
    cache = prefilled(model, [6, 13])
    apart_cache, packed_cache = copy(cache), copy(cache)
    tokens = torch.tensor([3, 500])
    with torch.inference_mode():
        apart = static_decode_step(model, tokens, apart_cache, fused=True)
        fused_decode.pack_gate_weights(model)
        packed = static_decode_step(model, tokens, packed_cache, fused=True)
    assert torch.equal(packed, apart)


def test_runners_pack_the_gate_weights_for_the_fused_step():
    model = small_model(1.0, torch.float32)
    mlp = model.transformer.h[0].mlp
    cache = KVCache(model.transformer.llm_config, 1, 8, model.dtype)
    DecodeRunner(model, cache, "static", fused=False)
    assert fused_decode.gate_weights(mlp) is None  # CPU, eager layers: left as they are
    DecodeRunner(model, cache, "static", fused=True)
    assert fused_decode.gate_weights(mlp) is not None


def test_flash_decoding_runs_only_on_cuda_unless_asked(monkeypatch):
    assert fused_decode.flash_decoding(torch.device("cpu")) is False
    monkeypatch.setattr(fused_decode, "FLASH_DECODING", True)
    assert fused_decode.flash_decoding(torch.device("cpu")) is True


def test_fused_step_with_flash_decoding_matches_the_eager_layers(flash_decoding):
    model = small_model(1.0, torch.float32)
    cache = prefilled(model, [70, 140])
    plain_cache, eager_cache, fused_cache = copy(cache), copy(cache), copy(cache)
    tokens = torch.tensor([3, 500])
    with torch.inference_mode():
        for _ in range(2):
            plain = sdpa_step(model, tokens, plain_cache)
            eager = static_decode_step(model, tokens, eager_cache, fused=False)
            fused = static_decode_step(model, tokens, fused_cache, fused=True)
            torch.testing.assert_close(eager, plain, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
            tokens = eager.argmax(-1)


def sdpa_step(model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_decode, "FLASH_DECODING", False)
        return static_decode_step(model, tokens, cache, fused=False)


@pytest.mark.parametrize(
    "lengths, first_tokens",
    [([9, 30, 17], [3, 500, 42]), ([21], [3])],  # one row: the layers' products through matvec
)
def test_eager_and_static_steps_round_alike_under_flash_decoding(
    flash_decoding, matvec, lengths, first_tokens
):
    """Why every decode step uses it: the eager step (keys up to the furthest row) and the static
    step (the whole capacity) then give the same bits, where SDPA's kernels may part in the last;
    so does matvec, which both take for one row, as on a GPU."""
    model = small_model(0.5, torch.bfloat16)
    cache = prefilled(model, lengths)
    eager_cache, static_cache = copy(cache), copy(cache)
    tokens = torch.tensor(first_tokens)
    with torch.inference_mode():
        for _ in range(3):
            eager = decode_step(model, tokens, eager_cache)
            static = static_decode_step(model, tokens, static_cache, fused=False)
            assert torch.equal(eager, static)
            tokens = eager.argmax(-1)


def test_kernels_compile_for_an_h100(tmp_path):
    """What the interpreter cannot show: that the kernels lower to sm_90 machine code (no GPU needed).

    In a process of its own: under TRITON_INTERPRET Triton's code generator cannot build kernels.
    """
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    script = Path(__file__).with_name("kernel_compilation.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    kernels = {name: [int(n) for n in facts] for name, *facts in map(str.split, done.stdout.splitlines())}
    assert {name for name in dir(fused_decode) if name.endswith("_kernel")} <= kernels.keys()
    wide_loads = {name: facts[0] for name, facts in kernels.items()}
    # the attention reads its keys and values sixteen bytes at a time
    assert wide_loads["_attention_split_kernel"] > 0
    assert wide_loads["_matvec_kernel"] > 0  # and the products their weights
    # DEPENDENT_LAUNCH: each kernel waits for the one before and lets the next start; matvec reads
    # weights before it waits, the others nothing
    for name, (_, waits, launches, load_first) in kernels.items():
        assert (waits, launches, load_first) == (1, 1, name == "_matvec_kernel"), name


@pytest.mark.parametrize("bias", [False, True])
def test_matvec_is_the_linear_layer(bias):
    # sizes that the blocks do not divide: the masked edges count
    linear = torch.nn.Linear(150, 37, bias=bias)
    x = torch.randn(1, 150)
    with torch.no_grad():
        expected = linear(x)
        bias_ = linear.bias if bias else None
        torch.testing.assert_close(fused_decode.matvec(x, linear.weight, bias_), expected)
    both = torch.randn(1, 300)  # the halves of one product's output, as mlp_output hands them
    up, gate = both[:, :150], both[:, 150:]
    with torch.no_grad():
        gated = fused_decode.matvec(up, linear.weight, bias_, gate=gate)
        torch.testing.assert_close(gated, linear(up * F.silu(gate)))


def test_matvec_reads_its_tiles_either_way_for_the_same_sums(monkeypatch):
    """matvec_config's ways of reading (the next tile ahead, or not) leave every bit as it is (on a
    GPU too: test_kernels_on_gpu), at ragged sizes, with the gate inside."""
    weight, x, gate = torch.randn(37, 150), torch.randn(1, 150), torch.randn(1, 150)
    small = {
        "BLOCK_N": 4,
        "BLOCK_K": 64,
        "num_warps": 4,
        "num_stages": 3,
        "AHEAD": False,
    }
    monkeypatch.setattr(fused_decode, "matvec_config", lambda k: small)
    plain, gated = fused_decode.matvec(x, weight), fused_decode.matvec(x, weight, gate=gate)
    monkeypatch.setattr(fused_decode, "matvec_config", lambda k: dict(small, AHEAD=True))
    assert torch.equal(fused_decode.matvec(x, weight), plain)
    assert torch.equal(fused_decode.matvec(x, weight, gate=gate), gated)


def test_matvec_in_bf16_is_within_a_rounding_step():
    weight, x = torch.randn(64, 1000).bfloat16(), torch.randn(1, 1000).bfloat16()
    expected = x.float() @ weight.float().T
    gap = (fused_decode.matvec(x, weight).float() - expected).abs()
    assert gap.max() <= 2**-7 * expected.abs().max()


def test_matvec_names_what_it_cannot_take():
    weight = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"one contiguous row of 16 .* got \(2, 16\) and \(8, 16\)"):
        fused_decode.matvec(torch.randn(2, 16), weight)
    with pytest.raises(ValueError, match="contiguous weight"):
        fused_decode.matvec(torch.randn(1, 8), weight.t())
    with pytest.raises(ValueError, match=r"gate must be shaped as x \(1, 16\), got \(1, 8\)"):
        fused_decode.matvec(torch.randn(1, 16), weight, gate=torch.randn(1, 8))


def test_matvec_runs_only_on_cuda_unless_asked(monkeypatch):
    assert fused_decode.matvec_runs(torch.device("cpu")) is False
    monkeypatch.setattr(fused_decode, "MATVEC", True)
    assert fused_decode.matvec_runs(torch.device("cpu")) is True


def test_dependent_launch_runs_only_where_asked_on_hopper_and_later(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(fused_decode, "available", lambda device: device.type == "cuda")
    monkeypatch.setattr(fused_decode, "capability", lambda device: (9, 0))
    assert fused_decode.dependent_launch(cuda)  # on by default
    monkeypatch.setattr(fused_decode, "DEPENDENT_LAUNCH", False)
    assert not fused_decode.dependent_launch(cuda)
    monkeypatch.setattr(fused_decode, "DEPENDENT_LAUNCH", True)
    assert not fused_decode.dependent_launch(torch.device("cpu"))  # the interpreter has no grids to wait on
    monkeypatch.setattr(fused_decode, "capability", lambda device: (8, 0))
    assert not fused_decode.dependent_launch(cuda)


def test_dependent_launch_launches_every_kernel_early(monkeypatch):
    """The flags each launch gets where dependent launch runs (the kernels' code: kernel_compilation)."""
    launches = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **flags: launches.setdefault(self.name, flags)

    kernels = [name for name in dir(fused_decode) if name.endswith("_kernel")]
    for name in kernels:
        monkeypatch.setattr(fused_decode, name, Recorder(name))
    monkeypatch.setattr(fused_decode, "dependent_launch", lambda device: True)
    norm = SimpleNamespace(weight=torch.ones(16), eps=1e-6)
    fused_decode.add_rms_norm(torch.randn(1, 16), None, norm)
    fused_decode.matvec(torch.randn(1, 16), torch.randn(8, 16))
    fused_decode.silu_gate(torch.randn(1, 16), torch.randn(1, 16))
    cache = SimpleNamespace(keys=torch.zeros(1, 1, 2, 4, 8), values=torch.zeros(1, 1, 2, 4, 8))
    rotary = SimpleNamespace(cos=torch.ones(1, 8), signed_sin=torch.zeros(1, 8))
    step = SimpleNamespace(cache=cache, rotary=rotary, logn=None, positions=torch.tensor([3]))
    query = fused_decode.rotary_to_cache(torch.randn(1, 3 * 2 * 8), step, 0, 2, 8)
    fused_decode.decode_attention(query, step, 0, splits=2)
    assert launches.keys() == set(kernels)
    for name, flags in launches.items():
        assert flags["EARLY"] and flags["launch_pdl"], name


def test_projections_take_matvec_for_one_row_only(matvec, monkeypatch):
    calls = []
    real = fused_decode.matvec
    monkeypatch.setattr(fused_decode, "matvec", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    linear = torch.nn.Linear(16, 8)
    with torch.no_grad():
        fused_decode.project(linear, torch.randn(1, 16))
        fused_decode.project(linear, torch.randn(3, 16))  # a batch: cuBLAS's matrix kernels
        fused_decode.project(torch.nn.Sequential(linear), torch.randn(1, 16))  # stands for an adapter
    assert calls == [(8, 16)]


def test_eager_steps_of_one_row_take_matvec_too(matvec, monkeypatch):
    """So that eager and fused decode steps round alike; batches, training and prefills of several
    tokens keep the modules' products."""
    model = small_model(1.0, torch.float32)
    calls = []
    real = fused_decode.matvec
    monkeypatch.setattr(fused_decode, "matvec", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    one, two = prefilled(model, [7]), prefilled(model, [7, 9])
    assert calls == []  # the prefills: several tokens a row
    with torch.inference_mode():
        decode_step(model, torch.tensor([5, 6]), two)
        assert calls == []
        decode_step(model, torch.tensor([5]), one)
    # per layer: c_attn, c_proj, and the MLP's w1, w2 (not packed here) and c_proj
    assert len(calls) == 5 * len(model.transformer.h)
    calls.clear()
    model(input_ids=torch.tensor([[5]])).logits.sum().backward()  # with gradients: the modules
    assert calls == []


def test_matvec_gives_a_row_the_same_bits_packed_or_alone(matvec):
    """The eager steps of a model whose gate weights are apart and the fused steps of the packed
    model choose the same bits: one product for w1 and w2 (and the gate inside c_proj's) or three."""
    model = small_model(0.5, torch.bfloat16)
    cache = prefilled(model, [12])
    apart_cache, packed_cache = copy(cache), copy(cache)
    tokens = torch.tensor([3])
    with torch.inference_mode():
        apart = decode_step(model, tokens, apart_cache)
        fused_decode.pack_gate_weights(model)
        packed = static_decode_step(model, tokens, packed_cache, fused=False)
    assert torch.equal(packed, apart)


def test_model_runs_make_their_device_current_for_triton(monkeypatch):
    """Triton launches on CUDA's current device: a model on another GPU must make its own current."""
    assert isinstance(fused_decode.launching_on(torch.device("cpu")), contextlib.nullcontext)
    entered = []
    real = fused_decode.launching_on
    monkeypatch.setattr(fused_decode, "launching_on", lambda device: entered.append(device) or real(device))
    model = small_model(1.0, torch.float32)
    cache = prefilled(model, [5])  # the eager layers' run
    with torch.inference_mode():
        static_decode_step(model, torch.tensor([3]), cache, fused=True)  # the fused one's
    assert entered == [torch.device("cpu")] * 2
