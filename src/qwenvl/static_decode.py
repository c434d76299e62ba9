"""Shape-stable decode steps: the same tensors at every step, so they can be compiled or replayed.

`decode_step` in generation.py reads the cache up to the furthest row and asks the host for that
length; here every step attends over the cache's whole capacity under a mask, keeps positions
on the device, and advances the lengths in place. That is what CUDA graphs and
`torch.compile(mode="reduce-overhead")` need: batch-1 decoding then costs the GPU's time to read
the weights, not Python's time to launch a few hundred kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cache import KVCache
from .model.llm import Step

MODES = ("static", "compile", "cuda_graph")


def static_decode_step(model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one token per row [B]; logits [B, V] of the next. No host synchronisation."""
    transformer = model.transformer
    step = Step.static_decode(transformer.llm_config, cache)
    hidden = transformer.run(transformer.wte(tokens[:, None]), step)
    cache.lengths.add_(1)
    return model.lm_head(hidden[:, -1])


class DecodeRunner:
    """Decode steps for one batch and cache: static eager, compiled, or captured once as a CUDA graph.

    The cache must not be replaced while the runner lives (its tensors are the graph's memory).
    """

    def __init__(self, model, cache: KVCache, mode: str = "static"):
        if mode not in MODES:
            raise ValueError(f"unknown decode mode {mode!r}; expected one of {MODES}")
        if mode == "cuda_graph" and cache.keys.device.type != "cuda":
            raise ValueError("mode 'cuda_graph' needs the model and cache on a CUDA device")
        self.model, self.cache, self.mode = model, cache, mode
        self._graph: torch.cuda.CUDAGraph | None = None
        self._tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=cache.keys.device)
        self._logits: torch.Tensor | None = None
        self._step: Callable = static_decode_step
        if mode == "compile":
            # CUDA: compiled kernels replayed through CUDA graphs; CPU: fused C++ kernels
            graph_mode = "reduce-overhead" if cache.keys.device.type == "cuda" else "default"
            self._step = torch.compile(static_decode_step, mode=graph_mode, dynamic=False)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mode != "cuda_graph":
            return self._step(self.model, tokens, self.cache)
        self._tokens.copy_(tokens)
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self._logits.clone()

    def _capture(self) -> None:
        # Warm up on a side stream (allocator and kernels), undoing the steps' length advances,
        # then record one step; replays run it with whatever `_tokens` holds.
        lengths = self.cache.lengths.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                static_decode_step(self.model, self._tokens, self.cache)
                self.cache.lengths.copy_(lengths)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = static_decode_step(self.model, self._tokens, self.cache)
        self.cache.lengths.copy_(lengths)  # capture records the step; it must not count as one
