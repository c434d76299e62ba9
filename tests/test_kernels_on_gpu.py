"""fused_decode's kernels on a GPU, where Triton compiles them for real (elsewhere its interpreter
runs them: tests/test_fused_decode.py). Skipped without CUDA; benchmarks/gpu_checks.sh runs them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenvl import fused_decode

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and fused_decode.available(torch.device("cuda"))),
    reason="needs a GPU with Triton",
)


def random(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).bfloat16()


def test_matvec_is_the_product_of_qwen_vls_shapes_within_rounding():
    torch.manual_seed(0)
    for n, k, bias in ((12288, 4096, True), (4096, 4096, False), (22016, 4096, False), (4096, 11008, False)):
        weight, x = random(n, k, scale=0.02), random(1, k)
        b = random(n) if bias else None
        expected = F.linear(x.float(), weight.float(), None if b is None else b.float())
        gap = (fused_decode.matvec(x, weight, b).float() - expected).abs()
        assert gap.max() <= 2**-7 * expected.abs().max(), (n, k)


def test_matvec_gives_a_row_the_same_bits_packed_or_alone():
    """What lets the eager steps (w1 and w2 apart) and the fused ones (packed) choose the same tokens."""
    torch.manual_seed(1)
    up, gate, x = random(11008, 4096, scale=0.02), random(11008, 4096, scale=0.02), random(1, 4096)
    both = fused_decode.matvec(x, torch.cat([up, gate]))
    assert torch.equal(both[:, :11008], fused_decode.matvec(x, up))
    assert torch.equal(both[:, 11008:], fused_decode.matvec(x, gate))
    c_proj = random(4096, 11008, scale=0.01)
    gated_inside = fused_decode.matvec(both[:, :11008], c_proj, gate=both[:, 11008:])
    gated_apart = fused_decode.matvec(fused_decode.silu_gate(both[:, :11008], both[:, 11008:]), c_proj)
    assert torch.equal(gated_inside, gated_apart)


def test_matvec_reads_its_tiles_either_way_for_the_same_bits(monkeypatch):
    """What lets benchmarks/gpu_profile.py's matvec_sweep choose how the kernel reads by speed alone."""
    torch.manual_seed(4)
    cases = []
    for n, k in ((12288, 4096), (4096, 11008)):
        weight, x, gate = random(n, k, scale=0.02), random(1, k), random(1, k)
        cases.append(
            (weight, x, gate, fused_decode.matvec(x, weight), fused_decode.matvec(x, weight, gate=gate))
        )
    default = fused_decode.matvec_config
    monkeypatch.setattr(
        fused_decode, "matvec_config", lambda k: dict(default(k), AHEAD=not default(k)["AHEAD"])
    )
    for weight, x, gate, plain, gated in cases:
        assert torch.equal(fused_decode.matvec(x, weight), plain), weight.shape
        assert torch.equal(fused_decode.matvec(x, weight, gate=gate), gated), weight.shape


def test_silu_gate_and_add_rms_norm_within_rounding():
    torch.manual_seed(2)
    up, gate = random(3, 11008), random(3, 11008, scale=4)
    expected = (up.float() * F.silu(gate.float())).abs()
    assert (
        (fused_decode.silu_gate(up, gate).float().abs() - expected).abs() <= 2**-6 * expected + 1e-6
    ).all()
    norm = torch.nn.Module()
    norm.weight, norm.eps = (torch.rand(4096, device="cuda") + 0.5).bfloat16(), 1e-6
    x, delta = random(2, 4096), random(2, 4096)
    total, normed = fused_decode.add_rms_norm(x, delta, norm)
    assert torch.equal(total, x + delta)
    exact = (
        total.float() * torch.rsqrt(total.float().pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.float()
    )
    assert (normed.float() - exact).abs().max() <= 2**-6 * exact.abs().max()


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="needs Hopper or later",
)
@pytest.mark.parametrize("graphed", [False, True])
def test_dependent_launch_keeps_every_bit(graphed, monkeypatch):
    """matvec launched early reads its input only once the kernel before has written it: a norm, then
    a product, then the gated product of its halves, each reading what the one before wrote."""
    torch.manual_seed(3)
    norm = torch.nn.Module()
    norm.weight, norm.eps = (torch.rand(4096, device="cuda") + 0.5).bfloat16(), 1e-6
    x, delta = random(1, 4096), random(1, 4096)
    both, c_proj = random(22016, 4096, scale=0.02), random(4096, 11008, scale=0.01)

    def chain() -> torch.Tensor:
        _, normed = fused_decode.add_rms_norm(x, delta, norm)
        out = fused_decode.matvec(normed, both)
        return fused_decode.matvec(out[:, :11008], c_proj, gate=out[:, 11008:])

    def run() -> torch.Tensor:
        if not graphed:
            return chain()
        chain()  # compiles the kernels before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        graph.replay()
        return out

    monkeypatch.setattr(fused_decode, "DEPENDENT_LAUNCH", False)
    plain = run()
    monkeypatch.setattr(fused_decode, "DEPENDENT_LAUNCH", True)
    assert fused_decode.dependent_launch(x.device)
    assert torch.equal(run(), plain)
