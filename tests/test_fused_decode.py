"""The fused decode kernels (Triton) do what the eager layers do, checked on CPU by Triton's interpreter.

conftest.py turns the interpreter on when Triton is installed and no GPU is present. The
interpreter rounds fp32 to bf16 by truncation where a GPU rounds to nearest, so fp32 must match
the eager layers to float noise, while bf16 is held to a bf16 step.
"""

from __future__ import annotations

import os

import pytest
import torch

from qwenvl import QwenVLConfig, QwenVLForCausalLM, fused_decode
from qwenvl.cache import KVCache
from qwenvl.demo_model import DEMO_CONFIG
from qwenvl.generation import prefill
from qwenvl.static_decode import DecodeRunner, static_decode_step

RUNS_HERE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(
    fused_decode.triton is None or not RUNS_HERE, reason="needs Triton (a GPU, or its interpreter on CPU)"
)


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


@pytest.mark.parametrize("rotary_pct", [1.0, 0.5])
def test_fused_step_matches_the_eager_layers_in_fp32(rotary_pct):
    model = small_model(rotary_pct, torch.float32)
    cache = prefilled(model, [5, 11, 8])
    eager_cache, fused_cache = copy(cache), copy(cache)
    tokens = torch.tensor([3, 500, 42])
    with torch.inference_mode():
        for _ in range(3):
            eager = static_decode_step(model, tokens, eager_cache, fused=False)
            fused = static_decode_step(model, tokens, fused_cache, fused=True)
            torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
            tokens = eager.argmax(-1)
    # the norms' sums add up in another order: float noise, from the first layer on
    torch.testing.assert_close(fused_cache.keys, eager_cache.keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_cache.values, eager_cache.values, rtol=1e-5, atol=1e-6)
    assert fused_cache.lengths.tolist() == eager_cache.lengths.tolist() == [8, 14, 11]


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
