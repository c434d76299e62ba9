"""The decode backend's Triton kernels on a GPU, where Triton compiles them for real (elsewhere its
interpreter runs them: tests/test_triton_ops.py). Skipped without CUDA; benchmarks/gpu_checks.sh
runs them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenvl.decode import KernelSettings, MatvecBlocks, kernels

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.available()), reason="needs a GPU with Triton"
)
DEFAULTS = KernelSettings()


def random(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).bfloat16()


def test_matvec_is_the_product_of_qwen_vls_shapes_within_rounding():
    torch.manual_seed(0)
    for n, k, bias in ((12288, 4096, True), (4096, 4096, False), (22016, 4096, False), (4096, 11008, False)):
        weight, x = random(n, k, scale=0.02), random(1, k)
        b = random(n) if bias else None
        expected = F.linear(x.float(), weight.float(), None if b is None else b.float())
        gap = (kernels.matvec(x, weight, DEFAULTS, b).float() - expected).abs()
        assert gap.max() <= 2**-7 * expected.abs().max(), (n, k)


def test_matvec_gives_a_row_the_same_bits_packed_or_alone():
    """What lets a model's w1 and w2 be packed or apart and choose the same tokens."""
    torch.manual_seed(1)
    up, gate, x = random(11008, 4096, scale=0.02), random(11008, 4096, scale=0.02), random(1, 4096)
    both = kernels.matvec(x, torch.cat([up, gate]), DEFAULTS)
    assert torch.equal(both[:, :11008], kernels.matvec(x, up, DEFAULTS))
    assert torch.equal(both[:, 11008:], kernels.matvec(x, gate, DEFAULTS))
    c_proj = random(4096, 11008, scale=0.01)
    gated_inside = kernels.matvec(both[:, :11008], c_proj, DEFAULTS, gate=both[:, 11008:])
    gated_apart = kernels.matvec(
        kernels.silu_gate(both[:, :11008], both[:, 11008:], DEFAULTS), c_proj, DEFAULTS
    )
    assert torch.equal(gated_inside, gated_apart)


def test_matvec_reads_its_tiles_either_way_for_the_same_bits():
    """What lets the benchmarks choose how the kernel reads by speed alone."""
    torch.manual_seed(4)
    blocks = DEFAULTS.matvec_blocks
    other = DEFAULTS.with_changes(
        matvec_blocks=MatvecBlocks(**{**blocks.__dict__, "ahead": not blocks.ahead})
    )
    for n, k in ((12288, 4096), (4096, 11008)):
        weight, x, gate = random(n, k, scale=0.02), random(1, k), random(1, k)
        assert torch.equal(kernels.matvec(x, weight, other), kernels.matvec(x, weight, DEFAULTS)), (
            weight.shape
        )
        gated = kernels.matvec(x, weight, DEFAULTS, gate=gate)
        assert torch.equal(kernels.matvec(x, weight, other, gate=gate), gated), weight.shape


def test_silu_gate_and_add_rms_norm_within_rounding():
    torch.manual_seed(2)
    up, gate = random(3, 11008), random(3, 11008, scale=4)
    expected = (up.float() * F.silu(gate.float())).abs()
    gap = (kernels.silu_gate(up, gate, DEFAULTS).float().abs() - expected).abs()
    assert (gap <= 2**-6 * expected + 1e-6).all()
    weight = (torch.rand(4096, device="cuda") + 0.5).bfloat16()
    x, delta = random(2, 4096), random(2, 4096)
    total, normed = kernels.add_rms_norm(x, delta, weight, 1e-6, DEFAULTS)
    assert torch.equal(total, x + delta)
    exact = total.float() * torch.rsqrt(total.float().pow(2).mean(-1, keepdim=True) + 1e-6) * weight.float()
    assert (normed.float() - exact).abs().max() <= 2**-6 * exact.abs().max()


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="needs Hopper or later",
)
@pytest.mark.parametrize("graphed", [False, True])
def test_dependent_launch_keeps_every_bit(graphed):
    """matvec launched early reads its input only once the kernel before has written it: a norm, then
    a product, then the gated product of its halves, each reading what the one before wrote."""
    torch.manual_seed(3)
    weight = (torch.rand(4096, device="cuda") + 0.5).bfloat16()
    x, delta = random(1, 4096), random(1, 4096)
    both, c_proj = random(22016, 4096, scale=0.02), random(4096, 11008, scale=0.01)

    def chain(settings: KernelSettings) -> torch.Tensor:
        _, normed = kernels.add_rms_norm(x, delta, weight, 1e-6, settings)
        out = kernels.matvec(normed, both, settings)
        return kernels.matvec(out[:, :11008], c_proj, settings, gate=out[:, 11008:])

    def run(settings: KernelSettings) -> torch.Tensor:
        if not graphed:
            return chain(settings)
        chain(settings)  # compiles the kernels before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(settings)
        graph.replay()
        return out

    plain = run(DEFAULTS.with_changes(dependent_launch=False))
    assert kernels.launches_early(x.device, DEFAULTS)
    assert torch.equal(run(DEFAULTS), plain)
