"""Where a GPU's time goes within one call: its kernels under torch.profiler.

For each call (after a warm-up call): how many kernels, their summed GPU time, the matrix
products' share of it, the span from the first kernel's start to the last one's end (the span
over the summed time shows the GPU idle between kernels, waiting for launches), and the top
kernels. The calls: the baseline's decode step (`Decoder` in mode "plain", "torch" backend), the
static step eager and as a CUDA graph with the "torch" backend, the graphed step with the Triton
backend under the run's settings, with its batch-1 products through cuBLAS (`matvec` off), and
with its kernels launched as usual (`dependent_launch` off); an image's encoding, from Python and
replayed as a graph; the prompt's prefill. Also the patch embedding as the checkpoint's
convolution and as the matrix product the tower runs.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from qwenvl import QwenVLForCausalLM
from qwenvl.cache import KVCache
from qwenvl.decode import KernelSettings
from qwenvl.vision_graphs import encode_pixels

from .common import graph_time, markdown_table
from .gpu_step_sweep import decoder_step, triton_step

# cuBLAS's Hopper kernels are "nvjet_*"; the Triton backend's products "_matvec_kernel"
MATRIX_KERNELS = ("gemm", "gemv", "xmma", "cutlass", "cublas", "splitk", "nvjet", "matvec")


def is_matrix_product(kernel: str) -> bool:
    return any(k in kernel.lower() for k in MATRIX_KERNELS)


def kernel_breakdown(fn: Callable[[], object], top: int = 12) -> dict:
    """One call of `fn` (after a warm-up call) under the profiler: its GPU kernels."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower()
    ]
    if not kernels:
        return {"kernels": 0}
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in kernels:
        by_name[e.name[:90]].append(e.time_range.elapsed_us())
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:top]
    return {
        "kernels": len(kernels),
        "kernel_time_us": sum(end - start for start, end in spans),
        "matrix_kernel_time_us": sum(e.time_range.elapsed_us() for e in kernels if is_matrix_product(e.name)),
        "span_us": max(end for _, end in spans) - min(start for start, _ in spans),
        "top": [{"name": name, "count": len(t), "total_us": sum(t)} for name, t in ranked],
    }


@torch.inference_mode()
def breakdowns(
    model: QwenVLForCausalLM,
    cache: KVCache,
    settings: KernelSettings,
    pixels: torch.Tensor,
    prefill: Callable[[], object],
    save: Callable[[dict], None] = lambda sections: None,
) -> dict[str, dict]:
    """The breakdown of each call of the module's docstring; `save` gets them after each."""
    visual = model.transformer.visual
    calls = {
        "decode_step_baseline": lambda: decoder_step(model, cache, "torch", "plain"),
        "decode_step_static_torch": lambda: decoder_step(model, cache, "torch", "static"),
        "decode_step_graph_torch": lambda: decoder_step(model, cache, "torch", "cuda_graph"),
        "decode_step_graph_triton": lambda: triton_step(model, cache, settings),
        "decode_step_graph_triton_cublas_products": lambda: triton_step(
            model, cache, settings.with_changes(matvec=False)
        ),
        "decode_step_graph_triton_usual_launch": lambda: triton_step(
            model, cache, settings.with_changes(dependent_launch=False)
        ),
        "image_encode_from_python": lambda: lambda: encode_pixels(visual, pixels, graphed=False),
        "image_encode_graph": lambda: lambda: encode_pixels(visual, pixels),
        "prefill": lambda: prefill,
    }
    sections: dict[str, dict] = {}
    for name, make in calls.items():
        try:
            sections[name] = kernel_breakdown(make())
        except Exception as error:  # a call the profiler cannot follow: keep the others
            sections[name] = {"error": repr(error)[:200]}
        save(sections)
    sections["patch_embedding_us"] = {
        "conv2d": graph_time(lambda: visual.conv1(pixels)) * 1e6,
        "matrix_product": graph_time(lambda: visual.embed_patches(pixels)) * 1e6,
    }
    return sections


def report_lines(results: dict) -> list[str]:
    sections = results.get("sections", {})
    rows = []
    for name, section in sections.items():
        if name == "patch_embedding_us":
            continue
        if "error" in section:
            rows.append([name, section["error"][:80], "", "", ""])
            continue
        rows.append(
            [name, section["kernels"]]
            + [section.get(k, 0) / 1e3 for k in ("kernel_time_us", "matrix_kernel_time_us", "span_us")]
        )
    lines = (
        [markdown_table(["call", "kernels", "kernel ms", "matrix-product ms", "span ms"], rows)]
        if rows
        else []
    )
    for name, section in sections.items():
        if name == "patch_embedding_us":
            lines.append("\npatch embedding: " + ", ".join(f"{k} {v:.1f} us" for k, v in section.items()))
        elif section.get("top"):
            top = [[t["name"], t["count"], t["total_us"]] for t in section["top"]]
            lines += [f"\n{name}, top kernels:", markdown_table(["kernel", "count", "total us"], top)]
    return lines
