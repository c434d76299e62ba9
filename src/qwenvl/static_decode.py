"""Shape-stable decode steps: the same tensors at every step, so they can be compiled or replayed.

`decode_step` in generation.py reads the cache up to the furthest row and asks the host for that
length; here every step attends over the cache's whole capacity under a mask, keeps positions
on the device, and advances the lengths in place. That is what CUDA graphs and
`torch.compile(mode="reduce-overhead")` need: batch-1 decoding then costs the GPU's time to read
the weights, not Python's time to launch a few hundred kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch
from torch import nn

from . import fused_decode
from .cache import KVCache
from .cpu_weights import Product, cpu_products
from .model.llm import Step, attention_kernels

MODES = ("static", "compile", "cuda_graph")


def static_decode_step(
    model,
    tokens: torch.Tensor,
    cache: KVCache,
    products: Mapping[nn.Module, Product] | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """Feed one token per row [B]; logits [B, V] of the next. No host synchronisation.

    `products`: `cpu_products(model.transformer, model.lm_head)`, the CPU's faster layouts of the
    weights (looked up here when not given). `fused`: the layers' small work in fused_decode's
    Triton kernels; None: wherever they can run (CUDA with Triton installed).
    """
    transformer = model.transformer
    if products is None:
        products = cpu_products(transformer, model.lm_head)
    step = Step.static_decode(transformer.llm_config, cache, products)
    embeds = transformer.wte(tokens[:, None])
    if fused is None:
        fused = fused_decode.available(embeds.device)
    if fused:
        with attention_kernels():  # as transformer.run: for any attention the step leaves to SDPA
            hidden = fused_decode.run(transformer, embeds, step)
    else:
        hidden = transformer.run(embeds, step)
    hidden = hidden[:, -1]
    cache.lengths.add_(1)
    cache.empty = False
    return step.project(model.lm_head, hidden)


def fuses_by_default(mode: str, device: torch.device) -> bool:
    """Whether a runner of `mode` uses fused_decode's kernels when not told: wherever they run,
    except the compiled mode, which leaves fusion to inductor."""
    return mode != "compile" and fused_decode.available(device)


class DecodeRunner:
    """Decode steps for one batch and cache, in one of three modes.

    - "static": the shape-stable step, eager.
    - "compile": the step through torch.compile (inductor fuses the small element-wise kernels).
    - "cuda_graph": the eager step, captured once as a CUDA graph and replayed.

    `fused` (static and cuda_graph modes): fused_decode's kernels for the layers' small work;
    None: wherever they can run. The compiled mode leaves fusion to inductor.

    On CUDA, "compile" is captured as a graph too: the runner records inductor's kernels itself
    (as serving engines do) rather than through torch.compile's "reduce-overhead" mode, which
    keeps graphs for steps that leave their inputs alone, and the step writes into the caller's
    cache.
    The cache must not be replaced while the runner lives (its tensors are the graph's memory).
    """

    def __init__(self, model, cache: KVCache, mode: str = "static", fused: bool | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown decode mode {mode!r}; expected one of {MODES}")
        on_cuda = cache.keys.device.type == "cuda"
        if mode == "cuda_graph" and not on_cuda:
            raise ValueError("mode 'cuda_graph' needs the model and cache on a CUDA device")
        self.model, self.cache, self.mode = model, cache, mode
        self.graphed = on_cuda and mode in ("cuda_graph", "compile")
        self._graph: torch.cuda.CUDAGraph | None = None
        self._tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=cache.keys.device)
        self._logits: torch.Tensor | None = None
        # resolved once; a compiled step keeps the layouts inductor can trace
        self._products = cpu_products(model.transformer, model.lm_head, packed=mode != "compile")
        self.fused = fuses_by_default(mode, cache.keys.device) if fused is None else fused
        if on_cuda or self.fused:
            # before any graph is captured on this model: packing moves the weights' storage
            fused_decode.pack_gate_weights(model)
        self._step: Callable = functools.partial(static_decode_step, fused=self.fused)
        if mode == "compile":
            self._step = torch.compile(self._step, dynamic=False)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.graphed:
            return self._step(self.model, tokens, self.cache, self._products)
        self._tokens.copy_(tokens)
        # on the cache's GPU whichever thread calls (a new thread's current device is the first)
        with fused_decode.launching_on(self._tokens.device):
            if self._graph is None:
                self._capture()
            self._graph.replay()
        return self._logits.clone()

    def _capture(self) -> None:
        # Warm up on a side stream (compilation, allocator, kernels), undoing the steps' length
        # advances, then record one step; replays run it with whatever `_tokens` holds.
        lengths = self.cache.lengths.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(self.model, self._tokens, self.cache, self._products)
                self.cache.lengths.copy_(lengths)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self._step(self.model, self._tokens, self.cache, self._products)
        self.cache.lengths.copy_(lengths)  # capture records the step; it must not count as one
