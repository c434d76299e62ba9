"""Int4 checkpoints: GPTQ's 4-bit format (`gptq`), the Linear that keeps it packed (`linear`),
loading such folders (`checkpoint`, called by `qwenvl.loading`) and making them (`quantize`).

`from_pretrained` reads a GPTQ folder (the official Qwen-VL-Chat-Int4) with no extra package; the
decode backends compute its products from the packed weights (`qwenvl.decode`).
"""

from .gptq import GPTQSettings
from .linear import Int4Linear
from .quantize import dequantize_model, quantize_folder, quantize_model

__all__ = ["GPTQSettings", "Int4Linear", "dequantize_model", "quantize_folder", "quantize_model"]
