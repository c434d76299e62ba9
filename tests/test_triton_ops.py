"""The Triton backend and its kernels do what the torch backend does, checked on CPU by Triton's
interpreter; and their settings are data.

conftest.py turns the interpreter on when Triton is installed and no GPU is present. The
interpreter rounds fp32 to bf16 by truncation where a GPU rounds to nearest, so fp32 must match
the torch backend to float noise, while bf16 is held to a bf16 step.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qwenvl import QwenVLConfig, QwenVLForCausalLM
from qwenvl.cache import KVCache
from qwenvl.config import LLMConfig
from qwenvl.decode import AttentionBlocks, Decoder, KernelSettings, MatvecBlocks, kernels, settings
from qwenvl.decode.triton_ops import TritonOps, gate_weights, pack_gate_weights
from qwenvl.demo_model import DEMO_CONFIG
from qwenvl.model import TORCH_OPS
from qwenvl.model.llm import visible_keys

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
    Decoder(model, cache=cache, ops="torch").prefill(rows)
    return cache


def copy(cache: KVCache) -> KVCache:
    return cache.select(list(range(cache.batch_size)))


def steps(model, cache: KVCache, tokens: torch.Tensor, ops, count: int, mode: str = "static") -> list:
    """`count` greedy steps' logits from `tokens`, through a decoder over `cache`."""
    decoder, out = Decoder(model, cache=cache, mode=mode, ops=ops), []
    for _ in range(count):
        out.append(decoder.step(tokens))
        tokens = out[-1].argmax(-1)
    return out


# -- whole steps --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rotary_pct", [1.0, 0.5])
@pytest.mark.parametrize(
    "lengths, first_tokens",
    [([5, 11, 8], [3, 500, 42]), ([11], [3])],  # one row: the layers' products through matvec
)
def test_triton_steps_match_the_torch_steps_in_fp32(interpreter_settings, rotary_pct, lengths, first_tokens):
    model = small_model(rotary_pct, torch.float32)
    cache = prefilled(model, lengths)
    torch_cache, triton_cache = copy(cache), copy(cache)
    tokens = torch.tensor(first_tokens)
    expected = steps(model, torch_cache, tokens, TORCH_OPS, 3)
    got = steps(model, triton_cache, tokens, TritonOps(model, interpreter_settings), 3)
    for triton_logits, torch_logits in zip(got, expected, strict=True):
        torch.testing.assert_close(triton_logits, torch_logits, rtol=1e-5, atol=1e-5)
    # the norms' sums add up in another order: float noise, from the first layer on
    torch.testing.assert_close(triton_cache.keys, torch_cache.keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(triton_cache.values, torch_cache.values, rtol=1e-5, atol=1e-6)
    assert triton_cache.lengths.tolist() == torch_cache.lengths.tolist() == [n + 3 for n in lengths]


def test_triton_step_in_bf16_is_within_a_rounding_step(interpreter_settings):
    model = small_model(1.0, torch.bfloat16)
    cache = prefilled(model, [6, 10])
    torch_cache, triton_cache = copy(cache), copy(cache)
    tokens = torch.tensor([1, 2])
    (expected,) = steps(model, torch_cache, tokens, TORCH_OPS, 1)
    (got,) = steps(model, triton_cache, tokens, TritonOps(model, interpreter_settings), 1)
    assert (got.float() - expected.float()).abs().max() <= 0.05 * expected.float().abs().max()
    written = (slice(None), [0, 1], slice(None), [6, 10])  # each row's new position, every layer
    triton_keys, torch_keys = torch.stack(triton_cache.keys)[written], torch.stack(torch_cache.keys)[written]
    keys_gap = (triton_keys.float() - torch_keys.float()).abs()
    assert keys_gap.max() <= 2**-6 * torch_keys.float().abs().max()


def test_flash_decoding_over_long_rows_matches_sdpa(interpreter_settings):
    model = small_model(1.0, torch.float32)
    cache = prefilled(model, [70, 140])
    sdpa_cache, flash_cache = copy(cache), copy(cache)
    tokens = torch.tensor([3, 500])
    sdpa = TritonOps(model, interpreter_settings.with_changes(flash_decoding=False))
    expected = steps(model, sdpa_cache, tokens, sdpa, 2)
    got = steps(model, flash_cache, tokens, TritonOps(model, interpreter_settings), 2)
    for flash, plain in zip(got, expected, strict=True):
        torch.testing.assert_close(flash, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "lengths, first_tokens",
    [([9, 30, 17], [3, 500, 42]), ([21], [3])],  # one row: the layers' products through matvec
)
def test_plain_and_static_steps_of_the_backend_round_alike(interpreter_settings, lengths, first_tokens):
    """Why every step of a decoder takes the same kernels: the plain step (keys up to the furthest
    row) and the static step (the whole capacity) give the same bits, where SDPA's kernels may
    part in the last."""
    model = small_model(0.5, torch.bfloat16)
    cache = prefilled(model, lengths)
    ops = TritonOps(model, interpreter_settings)
    plain = steps(model, copy(cache), torch.tensor(first_tokens), ops, 3, mode="plain")
    static = steps(model, copy(cache), torch.tensor(first_tokens), ops, 3)
    assert all(torch.equal(p, s) for p, s in zip(plain, static, strict=True))


def test_prefills_and_gradients_take_the_torch_operations(interpreter_settings, monkeypatch):
    model = small_model(1.0, torch.float32)
    calls = []
    for name in ("matvec", "add_rms_norm", "rotary_to_cache", "decode_attention", "silu_gate"):
        real = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k)
        )
    ops = TritonOps(model, interpreter_settings)
    cache = KVCache(model.transformer.llm_config, 1, 12)
    Decoder(model, cache=cache, ops=ops).prefill([[1, 2, 3, 4]])  # several tokens a row
    assert calls == []
    Decoder(model, 1, 4, ops=ops).prefill([[5]])  # one token into a fresh cache: causal SDPA
    assert "rotary_to_cache" not in calls and "decode_attention" not in calls
    calls.clear()
    model.transformer(model.transformer.wte(torch.tensor([[5]])), ops=ops).sum().backward()
    assert calls == []  # with gradients: the modules


def test_one_row_products_take_matvec_and_batches_cublas(interpreter_settings, monkeypatch):
    model = small_model(1.0, torch.float32)
    ops = TritonOps(model, interpreter_settings)
    shapes = []
    real = kernels.matvec
    monkeypatch.setattr(
        kernels, "matvec", lambda x, w, *a, **k: shapes.append(tuple(w.shape)) or real(x, w, *a, **k)
    )
    linear = torch.nn.Linear(16, 8)
    with torch.no_grad():
        ops.project(linear, torch.randn(1, 1, 16))
        ops.project(linear, torch.randn(3, 1, 16))  # a batch: cuBLAS's matrix kernels
        ops.project(torch.nn.Sequential(linear), torch.randn(1, 1, 16))  # stands for an adapter
        TritonOps(model, interpreter_settings.with_changes(matvec=False)).project(
            linear, torch.randn(1, 1, 16)
        )
    assert shapes == [(8, 16)]


def test_a_row_has_the_same_bits_whether_the_gate_weights_are_packed_or_apart(interpreter_settings):
    """One product for w1 and w2 (the gate inside c_proj's) or three: the same bits."""
    model = small_model(0.5, torch.bfloat16)
    cache = prefilled(model, [12])
    ops = TritonOps(model, interpreter_settings)  # packs them
    packed = steps(model, copy(cache), torch.tensor([3]), ops, 1)
    model.transformer.h.to(torch.float32).to(torch.bfloat16)  # moving a model lays them apart again
    assert all(gate_weights(block.mlp) is None for block in model.transformer.h)
    assert not ops.current()
    apart = steps(model, copy(cache), torch.tensor([3]), ops, 1)
    assert torch.equal(packed[0], apart[0])


def test_decoders_make_their_device_current_for_triton(interpreter_settings, monkeypatch):
    """Triton launches on CUDA's current device: a model on another GPU must make its own current."""
    assert isinstance(kernels.launching_on(torch.device("cpu")), contextlib.nullcontext)
    entered = []
    real = kernels.launching_on
    monkeypatch.setattr(kernels, "launching_on", lambda device: entered.append(device) or real(device))
    model = small_model(1.0, torch.float32)
    decoder = Decoder(model, 1, 8, ops=TritonOps(model, interpreter_settings))
    decoder.step(torch.tensor([decoder.prefill([[1, 2]]).argmax(-1).item()]))
    assert entered == [torch.device("cpu")] * 2


# -- the gate weights side by side -------------------------------------------------------------------


def test_packed_gate_weights_keep_their_parameters_and_values():
    model = small_model(1.0, torch.float32)
    mlps = [block.mlp for block in model.transformer.h]
    params = [(mlp.w1.weight, mlp.w2.weight) for mlp in mlps]
    values = [(w1.clone(), w2.clone()) for w1, w2 in params]
    assert all(gate_weights(mlp) is None for mlp in mlps)
    with torch.inference_mode():  # as a backend may be built: the weights must stay trainable
        assert pack_gate_weights(model) == len(mlps)
    for mlp, (w1, w2), (v1, v2) in zip(mlps, params, values, strict=True):
        assert mlp.w1.weight is w1 and mlp.w2.weight is w2
        assert torch.equal(w1, v1) and torch.equal(w2, v2) and not w1.is_inference()
        assert torch.equal(gate_weights(mlp), torch.cat([v1, v2]))
    storage = mlps[0].w1.weight.data_ptr()
    assert pack_gate_weights(model) == len(mlps)  # already packed: nothing moves
    assert mlps[0].w1.weight.data_ptr() == storage
    # training goes on in the packed storage
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    assert not torch.equal(mlps[0].w1.weight, values[0][0])
    assert torch.equal(gate_weights(mlps[0])[: len(values[0][0])], mlps[0].w1.weight)
    model.double()  # moving a model lays its tensors apart again: two products, no stale view
    assert all(gate_weights(mlp) is None for mlp in mlps)


def test_weights_made_in_inference_mode_pack_too():
    with torch.inference_mode():  # a model loaded under inference mode has inference weights
        model = small_model(1.0, torch.float32)
    mlp = model.transformer.h[0].mlp
    expected = torch.cat([mlp.w1.weight, mlp.w2.weight])
    pack_gate_weights(model)
    with torch.no_grad():
        assert torch.equal(gate_weights(mlp), expected)


def test_a_packed_model_saves_and_loads(tmp_path):
    model = small_model(1.0, torch.float32)
    pack_gate_weights(model)
    model.save_pretrained(tmp_path)
    loaded = QwenVLForCausalLM.from_pretrained(tmp_path, fp32=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_gates_with_adapters_or_biases_are_left_alone():
    model = small_model(1.0, torch.float32)
    mlp = model.transformer.h[0].mlp
    mlp.w1 = torch.nn.Linear(mlp.w1.in_features, mlp.w1.out_features)  # with a bias
    mlp.w2 = torch.nn.Sequential(mlp.w2)  # stands for peft's wrapper
    assert pack_gate_weights(model) == len(model.transformer.h) - 1
    assert gate_weights(mlp) is None


def test_only_the_triton_backend_packs_the_gate_weights(interpreter_settings):
    model = small_model(1.0, torch.float32)
    mlp = model.transformer.h[0].mlp
    Decoder(model, 1, 8, ops="cpu")
    Decoder(model, 1, 8, ops="torch")
    assert gate_weights(mlp) is None  # left as they are
    Decoder(model, 1, 8, ops=TritonOps(model, interpreter_settings))
    assert gate_weights(mlp) is not None


# -- kernels -------------------------------------------------------------------------------------------


def test_add_rms_norm_returns_the_sum_and_its_norm():
    weight = torch.rand(40) + 0.5
    x, delta = torch.randn(3, 40), torch.randn(3, 40)
    total, normed = kernels.add_rms_norm(x, delta, weight, 1e-6, KernelSettings())
    torch.testing.assert_close(total, x + delta)
    expected = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    torch.testing.assert_close(normed, expected)
    same, _ = kernels.add_rms_norm(x, None, weight, 1e-6, KernelSettings())
    assert same is x


def masked_attention(query: torch.Tensor, cache: KVCache, layer: int, positions: torch.Tensor):
    """The torch backend's static attention: SDPA over the whole capacity under the visibility mask."""
    visible = visible_keys(positions, cache.capacity, query.dtype)
    keys, values = cache.view(layer, cache.capacity)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=visible)[:, :, 0]


def random_cache(dtype: torch.dtype, capacity: int) -> KVCache:
    config = LLMConfig(num_attention_heads=4, kv_channels=32, num_hidden_layers=2)
    cache = KVCache(config, 3, capacity, dtype)
    torch.manual_seed(1)
    for keys, values in zip(cache.keys, cache.values, strict=True):
        keys.normal_(0, 2)  # scores of a few units: a softmax far from uniform
        values.normal_()
    return cache


@pytest.mark.parametrize("splits", [1, 2, 3, 8, 64])
def test_decode_attention_sees_each_rows_keys_in_any_number_of_shares(interpreter_settings, splits):
    cache = random_cache(torch.float32, 150)
    positions = torch.tensor([[0], [37], [149]])  # a lone key, a short row, the whole capacity
    # a strided view, as the layers hand it over: [B, 1, 2, heads, d] -> [B, heads, 1, d]
    query = torch.randn(3, 1, 2, cache.keys[0].shape[1], cache.keys[0].shape[3])[:, :, 0].transpose(1, 2)
    step = SimpleNamespace(cache=cache, positions=positions)
    out = kernels.decode_attention(query, step, 1, interpreter_settings, splits=splits)
    torch.testing.assert_close(out, masked_attention(query, cache, 1, positions), rtol=1e-5, atol=1e-5)


def test_decode_attention_in_bf16_is_within_a_rounding_step(interpreter_settings):
    cache = random_cache(torch.bfloat16, 300)
    positions = torch.tensor([[5], [200], [299]])
    query = torch.randn(3, cache.keys[0].shape[1], 1, cache.keys[0].shape[3]).bfloat16()
    step = SimpleNamespace(cache=cache, positions=positions)
    expected = masked_attention(query.float(), random_cache(torch.float32, 300), 1, positions)
    for splits in (1, 4):
        out = kernels.decode_attention(query, step, 1, interpreter_settings, splits=splits).float()
        assert (out - expected).abs().max() <= 2**-6 * expected.abs().max()


def test_attention_shares_fill_the_machine_and_many_queries_take_their_own_blocks():
    defaults = KernelSettings()
    few, many = defaults.few_queries, defaults.many_queries
    assert defaults.attention_for(1, 8) == (few, 64)  # 8 programs a multiprocessor
    assert defaults.attention_for(5, 8) == (few, 13)
    assert defaults.attention_for(8, 8) == (many, 2)  # a query per multiprocessor: 2 programs
    assert defaults.attention_for(32, 8) == (many, 1)


def test_silu_gate_is_the_mlps_gate():
    up, gate = torch.randn(2, 3000), torch.randn(2, 3000) * 4
    torch.testing.assert_close(kernels.silu_gate(up, gate, KernelSettings()), up * F.silu(gate))
    up, gate = up.bfloat16(), gate.bfloat16()
    expected = (up * F.silu(gate)).float()
    gap = (kernels.silu_gate(up, gate, KernelSettings()).float() - expected).abs()
    assert (gap <= 2**-6 * expected.abs()).all()  # two roundings (the interpreter's truncate): two bf16 steps


def test_silu_gate_reads_the_halves_of_one_product():
    both = torch.randn(3, 2 * 1500)
    up, gate = both[:, :1500], both[:, 1500:]
    contiguous = kernels.silu_gate(up.contiguous(), gate.contiguous(), KernelSettings())
    assert torch.equal(kernels.silu_gate(up, gate, KernelSettings()), contiguous)
    with pytest.raises(ValueError, match="contiguous rows"):
        kernels.silu_gate(up.t(), gate.t(), KernelSettings())


SMALL_BLOCKS = KernelSettings(matvec_blocks=MatvecBlocks(rows=4, columns=64, ahead=False))


@pytest.mark.parametrize("bias", [False, True])
def test_matvec_is_the_linear_layer(bias):
    # sizes that the blocks do not divide: the masked edges count
    linear = torch.nn.Linear(150, 37, bias=bias)
    x = torch.randn(1, 150)
    with torch.no_grad():
        bias_ = linear.bias if bias else None
        torch.testing.assert_close(kernels.matvec(x, linear.weight, SMALL_BLOCKS, bias_), linear(x))
        both = torch.randn(1, 300)  # the halves of one product's output, as the MLP hands them
        up, gate = both[:, :150], both[:, 150:]
        gated = kernels.matvec(up, linear.weight, SMALL_BLOCKS, bias_, gate=gate)
        torch.testing.assert_close(gated, linear(up * F.silu(gate)))


def test_matvec_reads_its_tiles_either_way_for_the_same_sums():
    """Reading the next tile ahead or not leaves every bit as it is (on a GPU too:
    test_kernels_on_gpu), at ragged sizes, with the gate inside."""
    weight, x, gate = torch.randn(37, 150), torch.randn(1, 150), torch.randn(1, 150)
    ahead = SMALL_BLOCKS.with_changes(matvec_blocks=MatvecBlocks(rows=4, columns=64, ahead=True))
    assert torch.equal(kernels.matvec(x, weight, ahead), kernels.matvec(x, weight, SMALL_BLOCKS))
    assert torch.equal(
        kernels.matvec(x, weight, ahead, gate=gate), kernels.matvec(x, weight, SMALL_BLOCKS, gate=gate)
    )


def test_matvec_in_bf16_is_within_a_rounding_step():
    weight, x = torch.randn(64, 1000).bfloat16(), torch.randn(1, 1000).bfloat16()
    expected = x.float() @ weight.float().T
    gap = (kernels.matvec(x, weight, SMALL_BLOCKS).float() - expected).abs()
    assert gap.max() <= 2**-7 * expected.abs().max()


def test_matvec_names_what_it_cannot_take():
    weight = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"one contiguous row of 16 .* got \(2, 16\) and \(8, 16\)"):
        kernels.matvec(torch.randn(2, 16), weight, SMALL_BLOCKS)
    with pytest.raises(ValueError, match="contiguous weight"):
        kernels.matvec(torch.randn(1, 8), weight.t(), SMALL_BLOCKS)
    with pytest.raises(ValueError, match=r"gate must be shaped as x \(1, 16\), got \(1, 8\)"):
        kernels.matvec(torch.randn(1, 16), weight, SMALL_BLOCKS, gate=torch.randn(1, 8))


# -- dependent launch ----------------------------------------------------------------------------------


def test_dependent_launch_runs_only_where_asked_on_hopper_and_later(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(kernels, "capability", lambda device: (9, 0))
    assert kernels.launches_early(cuda, KernelSettings())  # on by default
    assert not kernels.launches_early(cuda, KernelSettings(dependent_launch=False))
    assert not kernels.launches_early(torch.device("cpu"), KernelSettings())  # the interpreter cannot
    monkeypatch.setattr(kernels, "capability", lambda device: (8, 0))
    assert not kernels.launches_early(cuda, KernelSettings())


def test_dependent_launch_launches_every_kernel_early(monkeypatch):
    """The flags each launch gets where dependent launch runs (the kernels' code: kernel_compilation)."""
    launches = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **flags: launches.setdefault(self.name, flags)

    names = [name for name in dir(kernels) if name.endswith("_kernel")]
    for name in names:
        monkeypatch.setattr(kernels, name, Recorder(name))
    monkeypatch.setattr(kernels, "launches_early", lambda device, settings: True)
    defaults = KernelSettings()
    kernels.add_rms_norm(torch.randn(1, 16), None, torch.ones(16), 1e-6, defaults)
    kernels.matvec(torch.randn(1, 16), torch.randn(8, 16), defaults)
    kernels.silu_gate(torch.randn(1, 16), torch.randn(1, 16), defaults)
    cache = SimpleNamespace(keys=torch.zeros(1, 1, 2, 4, 8), values=torch.zeros(1, 1, 2, 4, 8))
    rotary = SimpleNamespace(cos=torch.ones(1, 8), signed_sin=torch.zeros(1, 8))
    step = SimpleNamespace(cache=cache, rotary=rotary, logn=None, positions=torch.tensor([3]))
    query = kernels.rotary_to_cache(torch.randn(1, 3 * 2 * 8), step, 0, 2, 8, defaults)
    kernels.decode_attention(query, step, 0, defaults, splits=2)
    assert launches.keys() == set(names)
    for name, flags in launches.items():
        assert flags["EARLY"] and flags["launch_pdl"], name


def test_kernels_compile_for_an_h100(tmp_path):
    """What the interpreter cannot show: that the kernels lower to sm_90 machine code (no GPU needed).

    In a process of its own: under TRITON_INTERPRET Triton's code generator cannot build kernels.
    """
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    script = Path(__file__).with_name("kernel_compilation.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    compiled = {name: [int(n) for n in facts] for name, *facts in map(str.split, done.stdout.splitlines())}
    assert {name for name in dir(kernels) if name.endswith("_kernel")} <= compiled.keys()
    wide_loads = {name: facts[0] for name, facts in compiled.items()}
    # the attention reads its keys and values sixteen bytes at a time
    assert wide_loads["_attention_split_kernel"] > 0
    assert wide_loads["_matvec_kernel"] > 0  # and the products their weights
    # dependent launch: each kernel waits for the one before and lets the next start; matvec reads
    # weights before it waits, the others nothing
    for name, (_, waits, launches, load_first) in compiled.items():
        assert (waits, launches, load_first) == (1, 1, name == "_matvec_kernel"), name


# -- settings as data ----------------------------------------------------------------------------------


def test_settings_go_to_json_and_back(tmp_path):
    tuned = KernelSettings(
        dependent_launch=False,
        matvec_blocks_by_width=((11008, MatvecBlocks(rows=8, columns=512, ahead=False)),),
        few_queries=AttentionBlocks(keys=32, warps=1, programs_per_multiprocessor=4),
    )
    tuned.save(tmp_path / "device.json")
    assert KernelSettings.load(tmp_path / "device.json") == tuned
    assert tuned.matvec_for(11008).rows == 8 and tuned.matvec_for(4096) == MatvecBlocks()
    assert KernelSettings.from_dict({"matvec": False}) == KernelSettings(matvec=False)  # the rest default
    with pytest.raises(ValueError, match="unknown kernel settings: KEYS_PER_BLOCK"):
        KernelSettings.from_dict({"KEYS_PER_BLOCK": 16})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read kernel settings from .*bad.json"):
        KernelSettings.load(tmp_path / "bad.json")


def test_a_devices_settings_come_from_its_file_in_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "CONFIGS", tmp_path)
    assert settings.config_path("NVIDIA H100 80GB HBM3") == tmp_path / "NVIDIA_H100_80GB_HBM3.json"
    KernelSettings(flash_decoding=False).save(settings.config_path("NVIDIA H200"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert KernelSettings.for_device("cuda") == KernelSettings(flash_decoding=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    assert KernelSettings.for_device("cuda") == KernelSettings()  # no file: the defaults
    assert KernelSettings.for_device("cpu") == KernelSettings()


def test_the_package_ships_only_loadable_settings():
    for path in settings.CONFIGS.glob("*.json"):
        assert isinstance(KernelSettings.load(path), KernelSettings), path
        json.loads(path.read_text())
