"""The Qwen-VL network's math: vision tower, resampler, language model, and the operations its
layers are written in. Nothing here reads files, tokenizes, samples or picks kernels."""

from .ops import TORCH_OPS, TorchOps
from .qwenvl import QWenModel

__all__ = ["TORCH_OPS", "QWenModel", "TorchOps"]
