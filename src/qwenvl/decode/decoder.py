"""The decoder: one batch's KV cache, its prefill, and one decode step at a time, in one of four modes.

Every caller decodes through it: `generate` and `chat` (through `generation.stream_tokens`), the
serving engine, and the benchmarks, whose baseline is a decoder with other options. The mode
and the backend that does the layers' operations (`backends.py`) are chosen when it is built:

- "plain": each step reads the cache up to its longest row, a length asked of the device (a host
  wait per step); the shapes change every step;
- "static": each step attends over the cache's whole capacity under a mask, keeps positions on
  the device and advances the lengths in place: the same tensors at every step, no host wait;
- "compile": the static step through torch.compile (inductor fuses the small element-wise
  kernels); on CUDA also recorded as a CUDA graph, as below;
- "cuda_graph": the static step recorded once as a CUDA graph and replayed: batch-1 decoding
  then costs the GPU's time to read the weights, not Python's to launch a few hundred kernels;
- "auto": "cuda_graph" on CUDA, "static" elsewhere and for a model spread over several devices
  (a graph records one device's work; such a model decodes through plain PyTorch ops).
"""

from __future__ import annotations

import torch

from ..cache import KVCache
from ..cuda_graphs import capture
from ..model.llm import Step
from ..model.ops import TorchOps
from ..placement import model_devices
from ..transfers import to_device
from . import kernels
from .backends import ops_for
from .sampling import DECODE_MODES
from .settings import KernelSettings


def resolve_mode(mode: str, device: torch.device, spread: bool = False) -> str:
    """The mode `mode` means on `device` (the logits'); `spread`: the model's layers are on
    several devices, whose steps cannot be recorded as one device's graph."""
    if mode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {mode!r}; expected one of {DECODE_MODES}")
    if mode == "auto":
        return "cuda_graph" if device.type == "cuda" and not spread else "static"
    if spread and mode in ("cuda_graph", "compile"):
        raise ValueError(
            f"decode mode {mode!r} records the step on one device, and this model is spread over "
            "several: use 'static' (or 'auto') or 'plain'"
        )
    if mode == "cuda_graph" and device.type != "cuda":
        raise ValueError(f"decode mode 'cuda_graph' needs the model on a CUDA device, not {device}")
    return mode


class Decoder:
    """Prefill and decode steps for the rows of one KV cache (which it owns, or is given).

    `ops`: the layers' backend, an object or a name (`backends.BACKENDS`); by default the one for
    the model's device and the mode. `settings`: the Triton backend's kernel settings, when it is
    built here (default: the device's, `KernelSettings.for_device`). The cache must not be
    replaced while the decoder lives: a recorded graph reads and writes its tensors.
    """

    def __init__(
        self,
        model,
        rows: int | None = None,
        capacity: int | None = None,
        *,
        cache: KVCache | None = None,
        mode: str = "auto",
        ops: TorchOps | str | None = None,
        settings: KernelSettings | None = None,
    ):
        if cache is None:
            if rows is None or capacity is None:
                raise ValueError("a decoder needs a cache, or the rows and capacity of one")
            cache = KVCache.for_model(model, rows, capacity)
        self.model, self.cache = model, cache
        self.device = cache.device  # the logits'
        # layers on several devices: no graphs, and plain PyTorch ops (backends.ops_for)
        self.spread = len(model_devices(model)) > 1
        self.mode = resolve_mode(mode, self.device, self.spread)
        self.ops = ops if isinstance(ops, TorchOps) else ops_for(model, ops, self.mode, settings)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=self.device)
        self._logits: torch.Tensor | None = None
        self._step = self._static_step
        if self.mode == "compile":
            self._step = torch.compile(self._static_step, dynamic=False)

    @property
    def graphed(self) -> bool:
        """Whether its steps replay a CUDA graph."""
        return self.device.type == "cuda" and self.mode in ("cuda_graph", "compile")

    @torch.no_grad()
    def prefill(self, rows: list[list[int]], image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Run each row's tokens (those its cache row does not hold yet) into the cache; logits
        [B, V] at each row's last token. `image_features`: those of the rows' image spans, in order.

        Into a fresh cache, the host waits for the GPU nowhere before the logits: the ids are found
        on the host and copied like kernels (transfers.to_device), so the prefill's kernels are
        launched while the GPU still runs what came before, e.g. an image's encoding replayed as a
        CUDA graph.
        """
        transformer, lengths = self.model.transformer, [len(r) for r in rows]
        ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        with kernels.launching_on(self.device):
            hidden = transformer(transformer.embed(ids, image_features), self.cache, lengths, self.ops)
            last = to_device(torch.tensor(lengths) - 1, hidden.device)
            return self._head(hidden[torch.arange(len(rows), device=hidden.device), last])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [B]; logits [B, V] of the next."""
        with kernels.launching_on(self.device):
            if self.mode == "plain":
                return self._plain_step(tokens)
            if not self.graphed:
                with torch.inference_mode():
                    logits = self._step(tokens)
            else:
                self._tokens.copy_(tokens)
                if self._graph is None:
                    self._record()
                self._graph.replay()
                logits = self._logits.clone()
            self.cache.advanced([1] * self.cache.batch_size)
            return logits

    @torch.no_grad()
    def _plain_step(self, tokens: torch.Tensor) -> torch.Tensor:
        transformer = self.model.transformer
        hidden = transformer(transformer.embed(tokens[:, None]), self.cache, ops=self.ops)
        return self._head(hidden[:, -1])

    def _static_step(self, tokens: torch.Tensor) -> torch.Tensor:
        transformer, cache = self.model.transformer, self.cache
        step = Step.static_decode(transformer.llm_config, cache)
        hidden = transformer.run(transformer.embed(tokens[:, None]), step, self.ops)[:, -1]
        cache.lengths.add_(1)  # the host's mirror follows in `step`, once per step actually taken
        return self._head(hidden)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of final hidden states [B, H], on the head's device (where a spread
        model's final norm may not be)."""
        return self.ops.logits(self.model.lm_head, hidden.to(self.device))

    def _record(self) -> None:
        # warm-ups and the recording each advance the lengths: put back after each
        lengths = self.cache.lengths.clone()
        with torch.inference_mode():
            self._graph, self._logits = capture(
                lambda: self._step(self._tokens), after_each=lambda: self.cache.lengths.copy_(lengths)
            )
