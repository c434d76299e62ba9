"""A batch-1 decode step's matrix-vector products on a GPU, one weight shape at a time.

Each LLM weight shape, x [1, in] times the weight [out, in]: through cuBLAS (`F.linear`, and
`torch.mv`, for which cuBLAS may pick another kernel) and through the Triton backend's
`kernels.matvec` under the run's settings (its bias added in; not for the LM head, which the
backend leaves to cuBLAS), in microseconds and GB/s of weights read. Summed over a step's products
(every layer and the LM head), cuBLAS's figures are the floor a step reaches with its kernels,
beside the bound the copy bandwidth sets. One more row, not in the sum: w1 and w2 as one product,
as `triton_ops.pack_gate_weights` lays them.

Each product is recorded 20 times in one CUDA graph and replayed (`common.graph_time`): the same
weights every time, so a weight that fits the L2 cache reads faster than in a whole step
(`gpu_step_sweep` times the products where none stays there).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from qwenvl import QwenVLForCausalLM
from qwenvl.decode import KernelSettings, kernels

from .common import graph_time, markdown_table
from .models import MIB


def linears(model: QwenVLForCausalLM) -> dict:
    """The products of one layer and the LM head, and w1 and w2 packed as one weight."""
    block = model.transformer.h[0]
    both = torch.cat([block.mlp.w1.weight, block.mlp.w2.weight]).detach()
    return {
        "attn.c_attn": block.attn.c_attn,
        "attn.c_proj": block.attn.c_proj,
        "mlp.w1": block.mlp.w1,
        "mlp.w2": block.mlp.w2,
        "mlp.c_proj": block.mlp.c_proj,
        "lm_head": model.lm_head,
        "mlp.w1 + mlp.w2 packed": SimpleNamespace(weight=both, bias=None, in_features=both.shape[1]),
    }


@torch.inference_mode()
def product_rows(
    model: QwenVLForCausalLM,
    bandwidth: float,
    settings: KernelSettings,
    timer: Callable[[Callable[[], object]], float] = graph_time,
) -> tuple[list[dict], dict]:
    """Each product's row (see the module's docstring), and the sums over a decode step."""
    layers = len(model.transformer.h)
    rows, step_seconds, step_bytes = [], 0.0, 0
    for name, linear in linears(model).items():
        weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
        x = torch.randn(1, linear.in_features, device=weight.device, dtype=weight.dtype)
        weight_bytes = weight.numel() * weight.element_size()
        seconds = timer(functools.partial(F.linear, x, weight, bias))
        row = {
            "weight": name,
            "shape": list(weight.shape),
            "bias": bias is not None,
            "us": seconds * 1e6,
            "gb_per_s": weight_bytes / seconds / 1e9,
            "us_mv": timer(functools.partial(torch.mv, weight, x[0])) * 1e6,
        }
        if bias is not None:
            row["us_without_bias"] = timer(functools.partial(F.linear, x, weight)) * 1e6
        if name != "lm_head":
            row["us_matvec"] = timer(functools.partial(kernels.matvec, x, weight, settings, bias)) * 1e6
            row["matvec_blocks"] = asdict(settings.matvec_for(linear.in_features))
        rows.append(row)
        count = {"lm_head": 1, "mlp.w1 + mlp.w2 packed": 0}.get(name, layers)  # in a step
        step_seconds += count * seconds
        step_bytes += count * weight_bytes
    summary = {
        "products_per_step_s": step_seconds,
        "weight_bytes_per_step": step_bytes,
        "products_gb_per_s": step_bytes / step_seconds / 1e9,
        "copy_bound_step_s": step_bytes / bandwidth,
    }
    return rows, summary


def blocks_name(blocks: dict | None) -> str:
    """rows=4 columns=1024 warps=4 stages=3, then "ahead" where it is on."""
    if blocks is None:
        return "-"
    sizes = [f"{k}={v}" for k, v in blocks.items() if type(v) is int]
    return " ".join(sizes + [k for k, v in blocks.items() if v is True])


def report_lines(results: dict) -> list[str]:
    if "products" not in results:
        return []
    step = results["products_step"]
    rows = [
        [r["weight"], "x".join(map(str, r["shape"])), r["us"], r["gb_per_s"], r.get("us_without_bias", "-")]
        + [r["us_mv"], r.get("us_matvec", "-"), blocks_name(r.get("matvec_blocks"))]
        for r in results["products"]
    ]
    headers = ["weight", "shape", "us", "GB/s", "us without bias", "us as torch.mv", "us as matvec", "blocks"]
    return [
        markdown_table(headers, rows),
        "",
        f"decode step's products through cuBLAS: {step['products_per_step_s'] * 1e3:.2f} ms for "
        f"{step['weight_bytes_per_step'] / MIB:,.0f} MiB ({step['products_gb_per_s']:,.0f} GB/s); "
        f"copy-bandwidth bound {step['copy_bound_step_s'] * 1e3:.2f} ms",
        "",
    ]
