"""A whole batch-1 decode step on a GPU under different kernel settings.

The step is a `Decoder` in mode "cuda_graph" over one prefilled cache, with a Triton backend of
its own settings (`triton_step`, a `decoder_step`); each is captured at its first call and replayed 20 times
(`replay_time`). Timed in a whole step, no weight stays in the L2 cache, as in decoding (a
product timed alone, over and over, may find its weights there).

- `matvec_sweep`: `MatvecBlocks` candidates for the products of one input width, the other widths
  keeping the base settings' blocks;
- `dependent_launch_timings`: the step with `dependent_launch` off and on, in turns;
- `candidate_timings`: the step under each of several `KernelSettings`, in turns.

Each step gets its own settings object: nothing is set, so nothing is put back.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch

from qwenvl import QwenVLForCausalLM
from qwenvl.cache import KVCache
from qwenvl.decode import Decoder, KernelSettings, MatvecBlocks
from qwenvl.decode.backends import build
from qwenvl.model.ops import TorchOps

from .common import markdown_table
from .gpu_products import blocks_name

Step = Callable[[], None]
MakeStep = Callable[[KernelSettings], Step]
Timer = Callable[[Step], float]

# (rows, columns a turn, warps, ahead) tried in a whole step: the default (4, 1024, 4, ahead) and its
# neighbours, and (16, 256), which Triton's autotuner picked for a 4096-wide product timed alone
MATVEC_CANDIDATES = (
    (4, 1024, 4, True), (4, 1024, 4, False), (16, 256, 4, False), (16, 256, 4, True), (8, 512, 4, True),
    (8, 1024, 4, True), (4, 2048, 4, True), (4, 512, 4, True), (2, 2048, 4, True), (4, 1024, 8, True),
)  # fmt: skip


def decoder_step(
    model: QwenVLForCausalLM, cache: KVCache, ops: str | TorchOps, mode: str = "cuda_graph"
) -> Step:
    """One decode step of the cache's rows through a `Decoder` over `ops` (a backend's name or a
    built one), in `mode` (a CUDA graph is recorded at its first call); each call puts the cache's
    lengths back."""
    decoder = Decoder(model, cache=cache, mode=mode, ops=ops)
    lengths = cache.lengths.clone()
    tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=cache.device)

    def step() -> None:
        decoder.step(tokens)
        cache.lengths.copy_(lengths)

    return step


def triton_step(
    model: QwenVLForCausalLM, cache: KVCache, settings: KernelSettings, mode: str = "cuda_graph"
) -> Step:
    """`decoder_step` through a Triton backend under `settings`."""
    return decoder_step(model, cache, build(model, "triton", settings), mode)


def replay_time(step: Step, repeats: int = 20) -> float:
    """Seconds per call of a graphed step (its first call captures it)."""
    step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def with_blocks(base: KernelSettings, width: int, blocks: MatvecBlocks) -> KernelSettings:
    """`base` with `blocks` for the products of input `width`."""
    by_width = dict(base.matvec_blocks_by_width) | {width: blocks}
    return base.with_changes(matvec_blocks_by_width=tuple(sorted(by_width.items())))


def matvec_sweep(
    make_step: MakeStep,
    timer: Timer,
    base: KernelSettings,
    widths: Sequence[int],
    candidates: Sequence[tuple] = MATVEC_CANDIDATES,
    rows: list[dict] | None = None,
    save: Callable[[], None] = lambda: None,
) -> list[dict]:
    """A step's time with each candidate's blocks at one input width, for each of `widths`. Each
    row goes to `rows` (a new list if None) as it is timed, and `save` is called after it."""
    rows = [] if rows is None else rows
    for width in widths:
        for n, columns, warps, ahead in candidates:
            blocks = MatvecBlocks(rows=n, columns=columns, warps=warps, ahead=ahead)
            row = {"width": width, "blocks": asdict(blocks), "default": blocks == base.matvec_for(width)}
            try:
                row["step_ms"] = timer(make_step(with_blocks(base, width, blocks))) * 1e3
            except Exception as error:  # blocks that do not compile here: keep the others
                row["error"] = repr(error)[:200]
            rows.append(row)
            save()
    return rows


def in_turns(steps: dict[str, Step], timer: Timer, rounds: int) -> dict[str, list[float]]:
    """Each step captured first, then timed once a round, in turns: milliseconds of each."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(timer(step) * 1e3)
    return times


def dependent_launch_timings(
    make_step: MakeStep, timer: Timer, base: KernelSettings, rounds: int = 3
) -> list[dict]:
    """The step's ms with the kernels launched as usual and early, in turns: a pair a round."""
    steps = {
        f"{name}_ms": make_step(base.with_changes(dependent_launch=early))
        for name, early in (("usual", False), ("early", True))
    }
    times = in_turns(steps, timer, rounds)
    return [dict(zip(times, pair, strict=True)) for pair in zip(*times.values(), strict=True)]


def candidate_timings(
    make_step: MakeStep, timer: Timer, candidates: dict[str, KernelSettings], rounds: int = 5
) -> list[dict]:
    """The step's ms under each of `candidates`, timed in turns `rounds` times."""
    times = in_turns({name: make_step(settings) for name, settings in candidates.items()}, timer, rounds)
    return [
        {"name": name, "settings": settings.to_dict(), "step_ms": times[name]}
        for name, settings in candidates.items()
    ]


def report_lines(results: dict) -> list[str]:
    lines = []
    sweep = results.get("matvec_sweep", [])
    if sweep:
        rows = [
            [
                r["width"],
                blocks_name(r["blocks"]) + (" *" if r["default"] else ""),
                r.get("step_ms", r.get("error")),
            ]
            for r in sweep
        ]
        lines += _titled_table(
            "a graphed decode step (ms) with matvec's blocks for one input width (* the base settings')",
            ["input width", "blocks", "step ms"],
            rows,
        )
    early = results.get("dependent_launch", [])
    if early:
        pairs = ", ".join(f"{r['usual_ms']:.3f} / {r['early_ms']:.3f}" for r in early)
        lines += [f"a graphed decode step (ms), kernels launched as usual / early, in turns: {pairs}", ""]
    candidates = results.get("candidates", [])
    if candidates:
        rows = [
            [r["name"], statistics.median(r["step_ms"]), " ".join(f"{ms:.3f}" for ms in r["step_ms"])]
            for r in candidates
        ]
        lines += _titled_table(
            "a graphed decode step (ms) under each candidate's settings (in the record), in turns",
            ["candidate", "median ms", "each round"],
            rows,
        )
    return lines


def _titled_table(title: str, headers: list[str], rows: list[list]) -> list[str]:
    return [title, "", markdown_table(headers, rows), ""]
