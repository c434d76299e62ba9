"""The parts of benchmarks.gpu_profile that run without a GPU (Triton's interpreter, or steps that
only note their settings): each step gets settings of its own, and tuned reads what they record."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from benchmarks import gpu_attention, gpu_products, gpu_profile, gpu_step_sweep, tuned
from benchmarks.models import build_model

from qwenvl.decode import Decoder, KernelSettings, MatvecBlocks

from .conftest import NEEDS_TRITON, small_config

BASE = KernelSettings(matvec_blocks_by_width=((256, MatvecBlocks(rows=2)),))
CANDIDATES = [(4, 1024, 4, True), (16, 256, 4, False), (3, 64, 4, True)]


def noting_steps(seen: list[KernelSettings]):
    """make_step for steps that note the settings they were built with; blocks of 3 rows fail."""

    def make_step(settings: KernelSettings):
        if any(blocks.rows == 3 for _, blocks in settings.matvec_blocks_by_width):
            raise ValueError("arange's range must be a power of 2")
        return lambda: seen.append(settings)

    return make_step


def timing(seconds: list[float]):
    """A timer that runs the step once and gives the next of `seconds`."""
    times = iter(seconds)

    def timer(step) -> float:
        step()
        return next(times)

    return timer


@pytest.fixture(scope="module")
def small_model():
    return build_model(small_config(), torch.float32)


def prefilled(model) -> Decoder:
    decoder = Decoder(model, 1, 24, ops="torch")
    decoder.prefill([list(range(100, 110))])
    return decoder


def test_the_matvec_sweep_builds_each_step_with_its_own_settings():
    seen: list[KernelSettings] = []
    saved = []
    widths = [128, 256]
    rows = gpu_step_sweep.matvec_sweep(
        noting_steps(seen), timing([0.004, 0.002] * 2), BASE, widths, CANDIDATES, save=lambda: saved.append(1)
    )
    assert len(saved) == len(rows) == 6  # the record is saved after each row
    assert [(r["width"], r["blocks"]["rows"]) for r in rows] == [
        (w, c[0]) for w in widths for c in CANDIDATES
    ]
    assert [r["default"] for r in rows] == [True] + [False] * 5  # the base's blocks at 128, not at 256
    assert "power of 2" in rows[2]["error"]
    assert [r.get("step_ms") for r in rows] == [4.0, 2.0, None, 4.0, 2.0, None]
    # the width swept takes the candidate's blocks, the others keep the base's
    assert seen[1].matvec_for(128) == MatvecBlocks(rows=16, columns=256, ahead=False)
    assert seen[1].matvec_for(256) == MatvecBlocks(rows=2) and seen[3].matvec_for(128) == BASE.matvec_for(128)
    assert BASE.matvec_for(128) == MatvecBlocks()  # nothing was set anywhere: nothing to put back
    picked = tuned.pick({"settings": BASE.to_dict(), "matvec_sweep": rows})
    assert picked.matvec_for(128) == picked.matvec_for(256) == MatvecBlocks(rows=16, columns=256, ahead=False)
    report = "\n".join(gpu_step_sweep.report_lines({"matvec_sweep": rows}))
    assert "| 128 | rows=4 columns=1024 warps=4 stages=3 ahead * | 4 |" in report
    assert "| 256 | rows=16 columns=256 warps=4 stages=3 | 2 |" in report


def test_early_launch_and_candidates_are_captured_first_then_timed_in_turns():
    seen: list[KernelSettings] = []
    rounds = gpu_step_sweep.dependent_launch_timings(noting_steps(seen), timing([0.004, 0.003] * 3), BASE)
    assert [s.dependent_launch for s in seen] == [False, True] * 4  # captured, then three rounds
    assert rounds == [{"usual_ms": 4.0, "early_ms": 3.0}] * 3
    assert tuned.pick({"dependent_launch": rounds}).dependent_launch is True

    seen.clear()
    candidates = gpu_profile.candidate_settings(BASE, {"base": {}, "usual": {"dependent_launch": False}})
    assert candidates["usual"] == BASE.with_changes(dependent_launch=False)
    rows = gpu_step_sweep.candidate_timings(
        noting_steps(seen), timing([0.004, 0.003, 0.005, 0.002]), candidates, 2
    )
    assert seen == [candidates["base"], candidates["usual"]] * 3
    assert [(r["name"], r["step_ms"]) for r in rows] == [("base", [4.0, 5.0]), ("usual", [3.0, 2.0])]
    assert tuned.pick({"candidates": rows}) == candidates["usual"]
    report = "\n".join(gpu_step_sweep.report_lines({"dependent_launch": rounds, "candidates": rows}))
    assert "launched as usual / early, in turns: 4.000 / 3.000, 4.000 / 3.000" in report
    assert "| usual | 2.5 | 3.000 2.000 |" in report


@NEEDS_TRITON
def test_a_triton_step_runs_under_its_settings_and_puts_the_lengths_back(small_model, interpreter_settings):
    cache = prefilled(small_model).cache
    make_step = lambda settings: gpu_step_sweep.triton_step(small_model, cache, settings, mode="static")
    candidates = [(32, 64, 4, True), (3, 64, 4, True)]  # 3 rows: not a power of two, does not compile
    llm = small_model.transformer.llm_config
    timer = timing([0.001] * 4)
    rows = gpu_step_sweep.matvec_sweep(make_step, timer, interpreter_settings, [llm.hidden_size], candidates)
    assert rows[0]["step_ms"] == 1.0 and "error" in rows[1]
    assert cache.lengths.tolist() == [10]


@NEEDS_TRITON
def test_attention_blocks_each_run_under_their_own_settings(small_model, interpreter_settings):
    llm = small_model.transformer.llm_config
    candidates = ((64, 2, 2), (16, 1, 4), (32, 4, 1))
    timer = timing([1e-5] * len(candidates))
    rows = gpu_attention.attention_block_rows(
        llm, torch.device("cpu"), interpreter_settings, timer, 40, candidates
    )
    assert [r["default"] for r in rows] == [True, False, False]
    # the interpreter's 8 multiprocessors over 4 heads (few queries): shares follow the programs
    assert [r["splits"] for r in rows] == [-(-programs * 8 // 4) for _, _, programs in candidates]
    assert all(r["us"] == 10.0 and r["max_abs_gap"] < 0.05 for r in rows)  # bf16 sums in another order
    assert tuned.pick({"decode_attention_blocks": rows}).few_queries.keys == 64
    report = "\n".join(gpu_attention.report_lines({"decode_attention_blocks": rows}))
    assert "over 40 keys (us)" in report and "| 64 * | 2 | 2 | 4 | 10 | 0 |" in report


@NEEDS_TRITON
def test_products_are_timed_through_cublas_and_matvec(small_model, interpreter_settings):
    rows, step = gpu_products.product_rows(small_model, 1e12, interpreter_settings, timing([1e-5] * 30))
    assert [r["weight"] for r in rows][-2:] == ["lm_head", "mlp.w1 + mlp.w2 packed"]
    assert "us_matvec" not in rows[-2] and all("us_matvec" in r for r in rows if r["weight"] != "lm_head")
    assert rows[0]["matvec_blocks"] == dataclasses.asdict(interpreter_settings.matvec_blocks)
    layer = sum(
        r["shape"][0] * r["shape"][1] for r in rows[:5]
    )  # one layer's weights, the packed pair left out
    assert step["weight_bytes_per_step"] == 4 * (layer + rows[5]["shape"][0] * rows[5]["shape"][1])
    results = {"config": "small", "device_name": "cpu", "settings": {}, "memory_bandwidth_bytes_per_s": 1e12}
    report = gpu_profile.report({**results, "products": rows, "products_step": step})
    assert (
        "| mlp.w1 + mlp.w2 packed | 256x128 |" in report and "decode step's products through cuBLAS" in report
    )
