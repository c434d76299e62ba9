"""The parts of benchmarks.gpu_profile that run without a GPU (Triton's interpreter): the matvec sweep
and the report of what it found."""

from __future__ import annotations

import torch
from benchmarks import gpu_profile

from qwenvl import fused_decode
from qwenvl.static_decode import static_decode_step

from .conftest import NEEDS_TRITON
from .test_fused_decode import prefilled, small_model

pytestmark = NEEDS_TRITON


def profile_results(**parts) -> dict:
    """A profile's record with nothing measured but `parts`, for its report."""
    nothing = {"products_per_step_s": 1e-3, "weight_bytes_per_step": 1e6, "products_gb_per_s": 1.0}
    return {
        "config": "small", "device_name": "cpu", "memory_bandwidth_bytes_per_s": 1e10, "gemv": [],
        "gemv_step": {**nothing, "copy_bound_step_s": 1e-4}, "sections": {}, **parts,
    }  # fmt: skip


def test_matvec_sweep_tries_each_candidate_on_one_width_and_restores_the_blocks(monkeypatch):
    monkeypatch.setattr(fused_decode, "MATVEC", True)
    model = small_model(1.0, torch.float32)
    llm = model.transformer.llm_config
    cache = prefilled(model, [6])
    lengths = cache.lengths.clone()
    widths = [llm.hidden_size, llm.mlp_width]
    # the interpreter's blocks (test_fused_decode.INTERPRETER_BLOCKS) stand for the default
    monkeypatch.setattr(fused_decode, "matvec_config", lambda k: gpu_profile.blocks((32, 64, 4, True)))
    default = fused_decode.matvec_config
    # 3 rows: not a power of two
    candidates = [(32, 64, 4, True), (16, 128, 4, False), (3, 64, 4, True)]
    used = []

    def make_step():
        def step() -> None:
            with torch.inference_mode():
                static_decode_step(model, torch.tensor([5]), cache, fused=True)
            cache.lengths.copy_(lengths)

        return step

    def timer(step) -> float:
        step()  # under the candidate's blocks: what the kernel was launched with
        used.append({width: fused_decode.matvec_config(width) for width in widths})
        return 0.002

    saved = []
    rows = gpu_profile.matvec_sweep(
        make_step, timer, widths, candidates, save=lambda: saved.append(len(saved))
    )
    assert len(saved) == len(rows) == 2 * len(candidates)  # the record is saved after each row
    assert fused_decode.matvec_config is default
    assert [(r["width"], r["blocks"]["BLOCK_N"]) for r in rows] == [
        (w, c[0]) for w in widths for c in candidates
    ]
    assert [r["default"] for r in rows] == [True, False, False] * 2  # the same blocks at every width
    assert "error" in rows[2] and "error" in rows[5]  # it compiles nothing else, and the sweep goes on
    assert [r["step_ms"] for r in rows if "error" not in r] == [2.0] * 4
    # the width swept takes the candidate's blocks, the other keeps its own
    assert used[1] == {widths[0]: gpu_profile.blocks(candidates[1]), widths[1]: default(widths[1])}
    assert used[3] == {widths[0]: default(widths[0]), widths[1]: gpu_profile.blocks(candidates[1])}

    results = profile_results(decode_attention=[], matvec_sweep=rows)
    report = gpu_profile.report(results)
    assert f"| {widths[0]} | BLOCK_N=32 BLOCK_K=64 warps=4 AHEAD * | 2 |" in report
    assert f"| {widths[1]} | BLOCK_N=16 BLOCK_K=128 warps=4 | 2 |" in report


def test_dependent_launch_timings_capture_the_early_step_under_the_flag_and_restore_it():
    flags = []

    def graph_step(fused: bool):
        assert fused
        captured = fused_decode.DEPENDENT_LAUNCH  # a graph keeps what it captured

        def step() -> None:
            flags.append(captured)

        return step

    timings = iter([0.004, 0.003] * 3)
    rounds = gpu_profile.dependent_launch_timings(graph_step, lambda step: step() or next(timings))
    assert fused_decode.DEPENDENT_LAUNCH is True
    assert flags == [False, True] + [False, True] * 3  # captured at once, then timed in turns
    assert rounds == [{"usual_ms": 4.0, "early_ms": 3.0}] * 3
    results = profile_results(dependent_launch=rounds)
    assert "kernels launched as usual / early, in turns: 4.000 / 3.000, 4.000 / 3.000" in gpu_profile.report(
        results
    )


def test_candidates_are_each_captured_under_their_settings_and_timed_in_turns(monkeypatch):
    captured = []

    def graph_step(fused: bool):
        settings = (fused_decode.DEPENDENT_LAUNCH, fused_decode.matvec_config(4096)["BLOCK_N"])

        def step() -> None:
            captured.append(settings)

        return step

    blocks = {"4096": {"BLOCK_N": 16, "BLOCK_K": 256}}
    candidates = {"default": {}, "usual": {"DEPENDENT_LAUNCH": False, "matvec_config": blocks}}
    timings = iter([0.004, 0.003, 0.005, 0.002])
    rows = gpu_profile.candidate_timings(graph_step, lambda step: step() or next(timings), candidates, 2)
    assert fused_decode.DEPENDENT_LAUNCH is True and fused_decode.matvec_config(4096)["BLOCK_N"] == 4
    assert captured == [(True, 4), (False, 16)] + [(True, 4), (False, 16)] * 2  # captured, then in turns
    assert rows == [
        {"name": "default", "settings": {}, "step_ms": [4.0, 5.0]},
        {"name": "usual", "settings": candidates["usual"], "step_ms": [3.0, 2.0]},
    ]
    report = gpu_profile.report({"config": "real", "device_name": "GPU", "sections": {}, "candidates": rows})
    assert "| default | 4.5 | 4.000 5.000 | {} |" in report
    assert '| usual | 2.5 | 3.000 2.000 | {"DEPENDENT_LAUNCH": false, ' in report


def test_attention_blocks_try_each_and_restore_the_default(monkeypatch):
    # a few of the GPU's candidates: each is a second's Python under the interpreter
    monkeypatch.setattr(gpu_profile, "ATTENTION_BLOCKS", ((16, 2, 8), (32, 1, 4), (64, 4, 2)))
    llm = small_model(1.0, torch.float32).transformer.llm_config
    seen = []

    def blocks() -> tuple[int, int, int]:
        return (
            fused_decode.KEYS_PER_BLOCK,
            fused_decode.ATTENTION_WARPS,
            fused_decode.PROGRAMS_PER_MULTIPROCESSOR,
        )

    def timer(attend) -> float:
        seen.append(blocks())
        attend()
        return 1e-5

    rows = gpu_profile.attention_block_rows(llm, torch.device("cpu"), timer, context=40)
    default = (16, 2, 8)
    assert blocks() == default
    assert seen == list(gpu_profile.ATTENTION_BLOCKS)
    assert [r["default"] for r in rows] == [b == default for b in gpu_profile.ATTENTION_BLOCKS]
    # the interpreter's 8 multiprocessors over the small model's 4 heads (few queries): the shares
    # follow the programs a multiprocessor
    assert [r["splits"] for r in rows] == [
        -(-programs * 8 // 4) for _, _, programs in gpu_profile.ATTENTION_BLOCKS
    ]
    assert all(r["us"] == 10.0 and r["max_abs_gap"] < 0.05 for r in rows)  # bf16 sums in another order
    results = profile_results(decode_attention_blocks=rows)
    report = gpu_profile.report(results)
    assert "over 40 keys (us), by keys a turn, warps and shares" in report
    assert "| 16 * | 2 | 16 | 10 | 0 |" in report
