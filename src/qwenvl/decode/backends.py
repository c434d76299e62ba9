"""Which backend does a decoder's layer operations: chosen once, when the decoder is built.

- "torch": `model.ops.TorchOps`, plain PyTorch (training, `forward`, a compiled step);
- "triton": `triton_ops.TritonOps`, a GPU's decode steps in Triton kernels (also under Triton's
  interpreter on CPU tensors, for the tests);
- "cpu": `cpu_ops.CpuOps`, the weights in oneDNN's and other faster layouts.

A backend that copies or repacks weights does it when it is built. `ops_for` keeps the backend
built for a model and hands it out again while its weights are the ones it was built from, so
that every `generate` call does not copy the weights anew.
"""

from __future__ import annotations

import weakref

import torch

from ..model.ops import TORCH_OPS, TorchOps
from ..placement import model_devices
from . import kernels
from .settings import KernelSettings

BACKENDS = ("torch", "triton", "cpu")

_built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def default_backend(device: torch.device, mode: str) -> str:
    """Triton on a GPU where it is installed, the CPU backend on CPU; torch for a compiled step
    (inductor fuses what the kernels would, and cannot trace the packed products)."""
    if mode == "compile":
        return "torch"
    if device.type == "cuda" and kernels.available():
        return "triton"
    return "cpu" if device.type == "cpu" else "torch"


def ops_for(model, backend: str | None = None, mode: str = "static", settings: KernelSettings | None = None):
    """The `backend` (default: `default_backend`) for `model`, built once and kept while current.
    A model spread over several devices takes "torch": the others' kernels and weight copies
    work on one device (Triton launches on the current GPU, whatever its tensors' device)."""
    devices = model_devices(model)
    backend = backend or ("torch" if len(devices) > 1 else default_backend(devices[-1], mode))
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if len(devices) > 1 and backend != "torch":
        shown = ", ".join(map(str, devices))
        raise ValueError(f"the {backend!r} backend runs a model on one device, not over {shown}: use 'torch'")
    if backend == "torch":
        return TORCH_OPS
    built = _built.setdefault(model, {})
    key = (backend, settings)
    ops = built.get(key)
    if ops is None or not ops.current():
        ops = built[key] = build(model, backend, settings)
    return ops


def build(model, backend: str, settings: KernelSettings | None = None) -> TorchOps:
    """A new `backend` for `model` (its copies made, its weights repacked, now)."""
    if backend == "triton":
        from .triton_ops import TritonOps

        return TritonOps(model, settings)
    if backend == "cpu":
        from .cpu_ops import CpuOps

        return CpuOps(model)
    return TORCH_OPS
