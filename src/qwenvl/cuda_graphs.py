"""Capturing work as a CUDA graph: warmed up on a side stream, then recorded once, replayed after.

The decoder's steps and the vision tower are captured the same way. Warm-up runs (kernel
choices, cuBLAS workspaces, Triton compilation) happen on a side stream before recording, as
PyTorch requires; `after_each` undoes what each run changed that must not count (a decode step
advances the cache's lengths), after the warm-ups and after the recording.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def capture(
    run: Callable[[], T], after_each: Callable[[], None] | None = None, warmups: int = 2
) -> tuple[torch.cuda.CUDAGraph, T]:
    """`run` recorded as a graph, and what the recorded run returned (tensors that each replay
    overwrites). Call it with the graph's device current; RuntimeError where recording fails."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            run()
            if after_each is not None:
                after_each()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run()
    if after_each is not None:
        after_each()
    return graph, outputs
