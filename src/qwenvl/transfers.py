"""Copies between the host and a GPU that do not make the host wait for the GPU's queued work.

A plain copy of a host tensor to a GPU waits for the GPU to finish everything queued before it
(PyTorch copies pageable memory, then synchronizes the stream); one from the GPU waits too. Where
the host could be launching the next kernels meanwhile (a prefill's, while the GPU still encodes
the image), these copy through pinned memory and are queued like kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device`, the copy queued behind the GPU's work without waiting
    for it; the pinned buffer is kept until the copy is done (PyTorch's pinned-memory allocator
    records the copy's stream)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def to_host(tokens: torch.Tensor) -> Callable[[], list[int]]:
    """Starts copying `tokens` [B] off a GPU; the function returned waits for that copy alone (not
    for what the GPU was given after it) and returns them as a list."""
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)  # on the stream of the tokens' GPU, current or not
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(tokens.device))

    def wait() -> list[int]:
        copied.synchronize()
        return host.tolist()

    return wait
