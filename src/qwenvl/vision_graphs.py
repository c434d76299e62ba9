"""The vision tower for inference: captured as a CUDA graph per batch shape of pixels and replayed
on a GPU; in fp32 on CPUs without native bf16 products.

Qwen-VL's tower launches about 500 kernels an image. On a GPU Python can take longer to launch
them than the GPU to run them (an image took 10.5 to 16.5 ms on an H100 from run to run; its
kernels, 9.4 ms on an H200), and a replay launches them all at once and returns: the host goes
on to the prefill's kernels while the GPU still encodes (`generation.prefill` does not wait for
it), and the first token comes when the GPU has run both rather than when Python has launched
both: 28.7 ms on an H100 where the tower launched from Python took 47.5 in the same run
(benchmarks/results/gpu.md).

A graph keeps the memory of the weights it was captured with: it is captured again when any of
the tower's parameters moves (`.to()`, a reload with new tensors, an adapter), and never used
with gradients, in training mode, or for batches of more than MAX_IMAGES images. Capturing is
`cuda_graphs.capture`, as for the decoder's steps.

On a CPU without native bf16 products (decode/cpu_ops.py), a bf16 tower's products are emulated:
the mid-size benchmark model's tower took 1.77 s an image against 0.26 in fp32. There it runs on
fp32 copies of its weights made for the call (the module is left as it is), where they fit in
half the memory free.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .cuda_graphs import capture

logger = logging.getLogger(__name__)

# a graph per batch size keeps its activations' memory: larger batches run eager
MAX_IMAGES = 8


@dataclass
class _Capture:
    graph: torch.cuda.CUDAGraph
    pixels: torch.Tensor  # the graph's input, copied into before each replay
    features: torch.Tensor  # its output, overwritten by each replay
    weights: tuple  # where the tower's parameters were when it was captured


# per tower: its captures by (shape, dtype, device) of the pixels; None where a capture failed
_captures: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Capture | None]] = weakref.WeakKeyDictionary()
# one caller at a time captures or replays (a replay's buffers are shared)
_lock = threading.Lock()


def encode_pixels(visual: nn.Module, pixels: torch.Tensor, graphed: bool = True) -> torch.Tensor:
    """`visual(pixels)`: features [N, 256, output_dim] of pixels [N, 3, S, S], through a CUDA graph
    of the tower where one can serve (`graphable`) unless `graphed` is False, else its forward."""
    if not (graphed and graphable(visual, pixels)):
        if _bf16_emulated(visual, pixels):
            weights = {name: p.float() for name, p in visual.named_parameters()}
            features = torch.func.functional_call(visual, weights, (pixels,))
            return features.to(torch.bfloat16)
        return visual(pixels)
    key = (tuple(pixels.shape), pixels.dtype, pixels.device)
    weights = _weights(visual)
    with _lock, torch.cuda.device(pixels.device):
        with torch.inference_mode():  # the graph's buffers are written in every grad-free mode alike
            captures = _captures.setdefault(visual, {})
            capture = captures.get(key, ...)
            if capture is ... or (capture is not None and capture.weights != weights):
                capture = captures[key] = _capture(visual, pixels, weights)
            if capture is not None:
                capture.pixels.copy_(pixels)
                capture.graph.replay()
        if capture is None:
            return visual(pixels)
        return capture.features.clone()  # in the caller's mode, before another replay


def graphable(visual: nn.Module, pixels: torch.Tensor) -> bool:
    """Whether `encode_pixels` replays a graph for these pixels: on CUDA, for inference (no
    gradients, eval mode, not inside torch.compile or another capture), at most MAX_IMAGES."""
    return (
        pixels.is_cuda
        and 0 < pixels.shape[0] <= MAX_IMAGES
        and not torch.is_grad_enabled()
        and not visual.training
        and not torch.compiler.is_compiling()
        and not torch.cuda.is_current_stream_capturing()
    )


def _bf16_emulated(visual: nn.Module, pixels: torch.Tensor) -> bool:
    """Whether to run the tower on fp32 copies: a CPU without native bf16, and room for the copies
    (twice the bf16 weights, for the call) in half the memory free, else emulated bf16."""
    from .decode.cpu_ops import free_memory, onednn_bf16

    if pixels.device.type != "cpu" or torch.is_grad_enabled():
        return False
    if next(visual.parameters()).dtype != torch.bfloat16 or onednn_bf16():
        return False
    return 2 * sum(p.nbytes for p in visual.parameters()) <= free_memory() // 2


def _weights(visual: nn.Module) -> tuple:
    return tuple((p.data_ptr(), p.dtype) for p in visual.parameters())


def _capture(visual: nn.Module, pixels: torch.Tensor, weights: tuple) -> _Capture | None:
    """The tower's forward over a copy of `pixels`, recorded; None, with a warning, where recording
    fails (the tower then runs eager for this shape)."""
    static = pixels.clone()
    try:
        graph, features = capture(lambda: visual(static))
    except RuntimeError as error:
        logger.warning("the vision tower could not be captured as a CUDA graph, it runs eager: %s", error)
        return None
    return _Capture(graph, static, features, weights)
