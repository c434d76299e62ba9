"""Where a GPU's time goes in the model's steps: matrix-vector bandwidth and kernel breakdowns.

Run (on a CUDA machine): python -m benchmarks.gpu_profile [--config real] [--json PATH]

- gemv: each LLM weight shape at batch 1 (F.linear of x [1, in] with the weight [out, in]),
  recorded 20 times in one CUDA graph and replayed: microseconds and GB/s of weight bytes per
  product (cuBLAS). Summed over a decode step's products (every layer and the LM head) it is the
  floor a step reaches with these kernels, next to the bound that the copy bandwidth sets. One
  more row, not in the sum: w1 and w2 as one product, as fused_decode.pack_gate_weights lays them.
  Each also through fused_decode.matvec (its bias added in), but the LM head's.
- decode_attention: one layer's attention of a decode step (the real heads, bf16) at a few batch
  sizes and context lengths: SDPA under the static step's mask (memory-efficient kernel) against
  fused_decode.decode_attention cut into 1 to 16 shares, in microseconds, with the largest gap
  between their outputs.
- decode_attention_blocks: one layer's batch-1 decode attention with a few keys a turn, warp
  counts and shares (fused_decode.KEYS_PER_BLOCK, ATTENTION_WARPS, PROGRAMS_PER_MULTIPROCESSOR).
- matvec_sweep: a graphed fused decode step's time with each of ten configs (blocks, AHEAD) for
  fused_decode.matvec's products of one input width (4096, then 11008), the other keeping its
  default: which blocks read the weights fastest where, as in decoding, no weight stays in L2.
- dependent_launch: that step with the kernels launched as usual and early (fused_decode.
  DEPENDENT_LAUNCH, on Hopper and later), three times in turns.
- With --candidates FILE ({name: settings}), instead of all of the above: that step under each
  candidate's settings (benchmarks.tuned's), five times in turns.
- decode_step (eager layers without a graph; replayed as a CUDA graph with the eager layers and
  with fused_decode's kernels, its products through matvec or cuBLAS, or launched as usual,
  not early),
  prefill, image_encode: one call each under torch.profiler: the kernel count, the kernels' summed
  GPU time, the share of matrix products, the span from the first kernel's start to the last
  one's end, and the top kernels.

Random weights in bf16 (values do not change the speed).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from qwenvl import QwenVLTokenizer, fused_decode
from qwenvl.cache import KVCache
from qwenvl.generation import prefill
from qwenvl.model.llm import attention_kernels, visible_keys
from qwenvl.static_decode import DecodeRunner, static_decode_step

from . import tuned
from .common import add_json_option, json_path, markdown_table, save_record
from .model_speed import MIB, prompt_ids
from .run import build_model, memory_bandwidth, model_config

# cuBLAS's Hopper kernels are "nvjet_*"; fused_decode's products "_matvec_kernel"
MATRIX_KERNELS = ("gemm", "gemv", "xmma", "cutlass", "cublas", "splitk", "nvjet", "matvec")


def is_matrix_product(kernel: str) -> bool:
    return any(k in kernel.lower() for k in MATRIX_KERNELS)


def graph_time(fn: Callable[[], object], calls: int = 20, replays: int = 5) -> float:
    """Seconds per call of `fn`, recorded `calls` times in one CUDA graph (no launch overhead)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (replays * calls)


def gemv_rows(model, bandwidth: float) -> tuple[list[dict], dict]:
    block = model.transformer.h[0]
    layers = len(model.transformer.h)
    linears = {
        "attn.c_attn": block.attn.c_attn,
        "attn.c_proj": block.attn.c_proj,
        "mlp.w1": block.mlp.w1,
        "mlp.w2": block.mlp.w2,
        "mlp.c_proj": block.mlp.c_proj,
        "lm_head": model.lm_head,
    }
    # what fused_decode.pack_gate_weights gives the fused step (not counted in the step's sum)
    both = torch.cat([block.mlp.w1.weight, block.mlp.w2.weight]).detach()
    gate = SimpleNamespace(weight=both, bias=None, in_features=both.shape[1])
    rows = []
    step_seconds = 0.0
    step_bytes = 0
    with torch.inference_mode():
        for name, linear in [*linears.items(), ("mlp.w1 + mlp.w2 packed", gate)]:
            x = torch.randn(1, linear.in_features, device=linear.weight.device, dtype=linear.weight.dtype)
            weight_bytes = linear.weight.numel() * linear.weight.element_size()

            seconds = graph_time(lambda linear=linear, x=x: F.linear(x, linear.weight, linear.bias))
            row = {
                "weight": name,
                "shape": list(linear.weight.shape),
                "bias": linear.bias is not None,
                "us": seconds * 1e6,
                "gb_per_s": weight_bytes / seconds / 1e9,
            }
            if linear.bias is not None:
                bare = graph_time(lambda linear=linear, x=x: F.linear(x, linear.weight))
                row["us_without_bias"] = bare * 1e6
            # the same product as a matrix-vector call (cuBLAS may pick another kernel)
            row["us_mv"] = graph_time(lambda linear=linear, x=x: torch.mv(linear.weight, x[0])) * 1e6
            if name != "lm_head":  # fused_decode.matvec, as the fused step calls it, its bias added in
                bias = None if linear.bias is None else linear.bias.detach()
                product = functools.partial(fused_decode.matvec, x, linear.weight.detach(), bias)
                row["us_matvec"] = graph_time(product) * 1e6
                row["matvec_config"] = fused_decode.matvec_config(linear.in_features)
            rows.append(row)
            if linear is gate:
                continue
            count = 1 if name == "lm_head" else layers
            step_seconds += count * seconds
            step_bytes += count * weight_bytes
    summary = {
        "products_per_step_s": step_seconds,
        "weight_bytes_per_step": step_bytes,
        "products_gb_per_s": step_bytes / step_seconds / 1e9,
        "copy_bound_step_s": step_bytes / bandwidth,
    }
    return rows, summary


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
    busy = sum(end - start for start, end in spans)
    matrix = sum(e.time_range.elapsed_us() for e in kernels if is_matrix_product(e.name))
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in kernels:
        by_name[e.name[:90]].append(e.time_range.elapsed_us())
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:top]
    return {
        "kernels": len(kernels),
        "kernel_time_us": busy,
        "matrix_kernel_time_us": matrix,
        "span_us": max(end for _, end in spans) - min(start for start, _ in spans),
        "top": [{"name": name, "count": len(t), "total_us": sum(t)} for name, t in ranked],
    }


ATTENTION_CASES = ((1, 320), (1, 2048), (8, 320), (32, 320))  # (batch, context)
ATTENTION_SPLITS = (1, 2, 4, 8, 16)


def attention_rows(llm, device: torch.device) -> list[dict]:
    """One layer's decode attention, SDPA against decode_attention's share counts (see the docstring)."""
    llm = dataclasses.replace(llm, num_hidden_layers=1)
    return [attention_row(llm, device, batch, context) for batch, context in ATTENTION_CASES]


def attention_row(llm, device: torch.device, batch: int, context: int) -> dict:
    heads, head_dim = llm.num_attention_heads, llm.kv_channels
    cache = KVCache(llm, batch, context, torch.bfloat16, device)
    cache.keys.normal_()
    cache.values.normal_()
    query = torch.randn(batch, heads, 1, head_dim, device=device, dtype=torch.bfloat16)
    positions = torch.full((batch, 1), context - 1, device=device)
    step = SimpleNamespace(cache=cache, positions=positions)
    visible = visible_keys(positions, context, torch.bfloat16)
    keys, values = cache.view(0, context)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=visible)[:, :, 0]

    with attention_kernels():
        row = {"batch": batch, "context": context, "sdpa_us": graph_time(sdpa) * 1e6}
        expected = sdpa().float()
    row["default_splits"] = fused_decode.attention_blocks(batch * heads, device)[2]
    for splits in ATTENTION_SPLITS:
        attend = functools.partial(fused_decode.decode_attention, query, step, 0, splits)
        row[f"splits_{splits}_us"] = graph_time(attend) * 1e6
    flash = fused_decode.decode_attention(query, step, 0).float()
    row["max_abs_gap"] = (flash - expected).abs().max().item()
    return row


# decode_attention's keys a turn, warps and programs per multiprocessor (which set its shares) for
# a step of few queries, around the default (16, 2, 8); (64, 4, 2) is the many queries' setting.
# One warp sums without the shared-memory barriers of each turn (0 in its code against 15 with
# two or four), with more work per thread
ATTENTION_BLOCKS = (
    (16, 2, 8), (16, 1, 8), (16, 4, 8), (32, 2, 8), (8, 2, 8), (16, 2, 4), (16, 2, 16), (16, 1, 16),
    (32, 1, 8), (32, 2, 16), (64, 4, 8), (64, 4, 2),
)  # fmt: skip


def attention_block_rows(
    llm, device: torch.device, timer: Callable[[Callable[[], object]], float] = graph_time, context: int = 320
) -> list[dict]:
    """One layer's batch-1 decode attention over `context` keys with each of ATTENTION_BLOCKS
    (microseconds), its shares, and its largest gap from the default's output."""
    llm = dataclasses.replace(llm, num_hidden_layers=1)
    cache = KVCache(llm, 1, context, torch.bfloat16, device)
    cache.keys.normal_()
    cache.values.normal_()
    query = torch.randn(1, llm.num_attention_heads, 1, llm.kv_channels, device=device, dtype=torch.bfloat16)
    step = SimpleNamespace(cache=cache, positions=torch.full((1, 1), context - 1, device=device))
    attend = functools.partial(fused_decode.decode_attention, query, step, 0)
    expected = attend().float()
    default = tuple(getattr(fused_decode, name) for name in tuned.ATTENTION_SETTINGS)
    rows = []
    for blocks in ATTENTION_BLOCKS:
        keys, warps, programs = blocks
        row = {"context": context, "keys_per_block": keys, "warps": warps}
        row.update(programs_per_multiprocessor=programs, default=blocks == default)
        with tuned.applied(**dict(zip(tuned.ATTENTION_SETTINGS, blocks, strict=True))):
            row["splits"] = fused_decode.attention_blocks(llm.num_attention_heads, device)[2]
            try:
                row["us"] = timer(attend) * 1e6
                row["max_abs_gap"] = (attend().float() - expected).abs().max().item()
            except Exception as error:  # a block that does not compile here: keep the others
                row["error"] = repr(error)[:200]
        rows.append(row)
    return rows


# fused_decode.matvec's configs (rows, columns a turn, warps, AHEAD) tried in a whole graphed step:
# the default (4, 1024, 4, AHEAD) and its neighbours, and session 10's autotuner's 4096-wide pick
# (16, 256). (Its loop is not software-pipelined: num_stages changes nothing.)
MATVEC_CANDIDATES = (
    (4, 1024, 4, True), (4, 1024, 4, False), (16, 256, 4, False), (16, 256, 4, True), (8, 512, 4, True),
    (8, 1024, 4, True), (4, 2048, 4, True), (4, 512, 4, True), (2, 2048, 4, True), (4, 1024, 8, True),
)  # fmt: skip


def blocks(candidate: Sequence) -> dict:
    rows, columns, warps, ahead = candidate
    return {"BLOCK_N": rows, "BLOCK_K": columns, "num_warps": warps, "num_stages": 3, "AHEAD": ahead}


def matvec_sweep(
    make_step: Callable[[], Callable[[], None]],
    timer: Callable[[Callable[[], None]], float],
    widths: Sequence[int],
    candidates: Sequence[Sequence] = MATVEC_CANDIDATES,
    rows: list[dict] | None = None,
    save: Callable[[], None] = lambda: None,
) -> list[dict]:
    """A decode step's time with each candidate's blocks for the products of one input width, the
    other widths keeping `matvec_config`'s: where no weight stays in the L2 cache, as in decoding
    (a product timed alone, over and over, may find its weights there). `make_step` makes a step
    that captures itself when first called; `timer` gives its seconds per call. Each row goes to
    `rows` (a new list if None) as it is timed, and `save` is called after it."""
    default = fused_decode.matvec_config
    rows = [] if rows is None else rows
    for width in widths:
        for candidate in candidates:
            chosen = blocks(candidate)
            row = {"width": width, "blocks": chosen, "default": chosen == default(width)}
            with tuned.applied(matvec_config=tuned.per_width({str(width): chosen}, default)):
                try:
                    row["step_ms"] = timer(make_step()) * 1e3
                except Exception as error:  # a config that does not compile here: keep the others
                    row["error"] = repr(error)[:200]
            rows.append(row)
            save()
    return rows


def replay_time(step: Callable[[], None], repeats: int = 20) -> float:
    """Seconds per call of a graphed step (its first call captures it)."""
    step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def captured_while(graph_step: Callable[[bool], Callable[[], None]], **settings) -> Callable[[], None]:
    """The fused graphed step captured at once under fused_decode's `settings` (MATVEC=False: its
    batch-1 products through cuBLAS); replays keep what was captured."""
    with tuned.applied(**settings):
        step = graph_step(True)
        step()
    return step


def dependent_launch_timings(
    graph_step: Callable[[bool], Callable[[], None]],
    timer: Callable[[Callable[[], None]], float],
    rounds: int = 3,
) -> list[dict]:
    """The graphed fused step's ms with the kernels launched as usual and early (DEPENDENT_LAUNCH), in
    turns: a pair per round."""
    usual = captured_while(graph_step, DEPENDENT_LAUNCH=False)
    early = captured_while(graph_step, DEPENDENT_LAUNCH=True)
    return [{"usual_ms": timer(usual) * 1e3, "early_ms": timer(early) * 1e3} for _ in range(rounds)]


def candidate_timings(
    graph_step: Callable[[bool], Callable[[], None]],
    timer: Callable[[Callable[[], None]], float],
    candidates: dict[str, dict],
    rounds: int = 5,
) -> list[dict]:
    """The graphed fused step's ms under each of `candidates` ({name: benchmarks.tuned settings}),
    each step captured under its own settings, timed in turns `rounds` times."""
    steps = {
        name: captured_while(graph_step, **tuned.values(settings)) for name, settings in candidates.items()
    }
    rows = [{"name": name, "settings": settings, "step_ms": []} for name, settings in candidates.items()]
    for _ in range(rounds):
        for row in rows:
            row["step_ms"].append(timer(steps[row["name"]]) * 1e3)
    return rows


def measure(
    config_name: str, save: Callable[[dict], None] = lambda results: None, candidates: dict | None = None
) -> dict:
    """Every figure of the docstring, or with `candidates` ({name: settings}) their steps' times
    alone (`candidate_timings`); `save` gets the record after each part, so that a run cut short
    keeps what it measured (the parts that choose settings come first)."""
    device = torch.device("cuda")
    model = build_model(model_config(config_name), torch.bfloat16, device)
    tokenizer = QwenVLTokenizer()
    prompt = prompt_ids(tokenizer)
    visual = model.transformer.visual
    size = visual.config.image_size
    pixels = torch.randn(1, 3, size, size, device=device, dtype=torch.bfloat16)
    llm = model.transformer.llm_config
    sections: dict[str, dict] = {}
    results = {"config": config_name, "device_name": torch.cuda.get_device_name(device), "sections": sections}
    if candidates is None:
        bandwidth = memory_bandwidth(device, 2048)
        gemv, gemv_summary = gemv_rows(model, bandwidth)
        results.update(memory_bandwidth_bytes_per_s=bandwidth, gemv=gemv, gemv_step=gemv_summary)
    save(results)

    with torch.inference_mode():
        features = visual(pixels)

        def run_prefill() -> KVCache:
            cache = KVCache(llm, 1, len(prompt) + 64, model.dtype, device)
            prefill(model, [prompt], cache, features)
            return cache

        cache = run_prefill()
        tokens = torch.zeros(1, dtype=torch.long, device=device)
        lengths = cache.lengths.clone()

        def graph_step(fused: bool) -> Callable[[], None]:
            runner = DecodeRunner(model, cache, "cuda_graph", fused=fused)

            def step() -> None:
                runner(tokens)
                cache.lengths.copy_(lengths)

            return step

        def eager_step() -> None:
            static_decode_step(model, tokens, cache, fused=False)
            cache.lengths.copy_(lengths)

        if candidates is not None:
            results["candidates"] = candidate_timings(graph_step, replay_time, candidates)
            save(results)
            return results
        if torch.cuda.get_device_capability(device) >= (9, 0):  # Hopper and later
            results["dependent_launch"] = dependent_launch_timings(graph_step, replay_time)
            save(results)
        try:
            results["decode_attention_blocks"] = attention_block_rows(llm, device)
        except Exception as error:  # keep the rest of the profile
            results["decode_attention_blocks"] = [{"error": repr(error)}]
        save(results)
        widths = sorted({llm.hidden_size, llm.projection_size, llm.mlp_width})
        results["matvec_sweep"] = []
        matvec_sweep(
            lambda: graph_step(True),
            replay_time,
            widths,
            rows=results["matvec_sweep"],
            save=lambda: save(results),
        )
        for name, fn in (
            ("decode_step_eager_layers_no_graph", eager_step),
            ("decode_step_graph_eager_layers", graph_step(False)),
            ("decode_step_graph_fused", graph_step(True)),
            ("decode_step_graph_fused_cublas_products", captured_while(graph_step, MATVEC=False)),
            ("decode_step_graph_fused_usual_launch", captured_while(graph_step, DEPENDENT_LAUNCH=False)),
            ("image_encode", lambda: visual(pixels)),
            ("prefill", run_prefill),
        ):
            try:
                sections[name] = kernel_breakdown(fn)
            except Exception as error:  # a profiler that cannot see one kind of call: keep the rest
                sections[name] = {"error": repr(error)}
            save(results)
        try:
            results["decode_attention"] = attention_rows(llm, device)
        except Exception as error:
            results["decode_attention"] = [{"error": repr(error)}]
        # the patch embedding both ways: the checkpoint's convolution and the product that replaced it
        conv = visual.conv1
        sections["patch_embedding_us"] = {
            "conv2d": graph_time(lambda: conv(pixels)) * 1e6,
            "matrix_product": graph_time(lambda: visual.embed_patches(pixels)) * 1e6,
        }
    save(results)
    return results


def sweep_time(row: dict) -> float | str:
    return row["step_ms"] if "step_ms" in row else row["error"][:80]


def config_name(config: dict | None) -> str:
    """BLOCK_N=16 BLOCK_K=256 warps=4, then AHEAD where it is on."""
    if config is None:
        return "-"
    sizes = [
        f"{k.removeprefix('num_')}={v}" for k, v in config.items() if type(v) is int and k != "num_stages"
    ]
    return " ".join(sizes + [k for k, v in config.items() if v is True])


def shape(row: dict) -> str:
    return "x".join(map(str, row["shape"]))


def candidates_report(results: dict) -> str:
    rows = [
        [r["name"], statistics.median(r["step_ms"]), " ".join(f"{ms:.3f}" for ms in r["step_ms"])]
        + [json.dumps(r["settings"])]
        for r in results["candidates"]
    ]
    return "\n".join(
        [
            f"Config {results['config']} on {results['device_name']}, bf16: a graphed fused decode step (ms) "
            "under each candidate's settings, timed in turns",
            "",
            markdown_table(["candidate", "median ms", "each round", "settings"], rows),
        ]
    )


def report(results: dict) -> str:
    if "candidates" in results:
        return candidates_report(results)
    s, gemv = results["gemv_step"], results["gemv"]
    lines = [
        f"Config {results['config']} on {results['device_name']}, bf16; "
        f"copy bandwidth {results['memory_bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s",
        "",
        markdown_table(
            ["weight", "shape", "us", "GB/s", "us without bias", "us as torch.mv", "us as matvec", "config"],
            [
                [r["weight"], shape(r), r["us"], r["gb_per_s"], r.get("us_without_bias", "-"), r["us_mv"]]
                + [r.get("us_matvec", "-"), config_name(r.get("matvec_config"))]
                for r in gemv
            ],
        ),
        "",
        f"decode step's products: {s['products_per_step_s'] * 1e3:.2f} ms for "
        f"{s['weight_bytes_per_step'] / MIB:,.0f} MiB ({s['products_gb_per_s']:,.0f} GB/s); "
        f"copy-bandwidth bound {s['copy_bound_step_s'] * 1e3:.2f} ms",
        "",
    ]
    attention = results.get("decode_attention", [])
    if attention and "error" in attention[0]:
        lines += [f"decode attention: {attention[0]['error'][:200]}", ""]
    elif attention:
        lines.append("one layer's decode attention (us): SDPA, and decode_attention in 1 to 16 shares")
        lines.append("")
        shares = [f"{n} shares" for n in ATTENTION_SPLITS]
        headers = ["batch", "context", "SDPA", *shares, "default shares", "largest gap"]
        rows = [
            [r["batch"], r["context"], r["sdpa_us"], *(r[f"splits_{n}_us"] for n in ATTENTION_SPLITS)]
            + [r["default_splits"], r["max_abs_gap"]]
            for r in attention
        ]
        lines.append(markdown_table(headers, rows))
        lines.append("")
    blocks_rows = results.get("decode_attention_blocks", [])
    if blocks_rows and "error" in blocks_rows[0] and "keys_per_block" not in blocks_rows[0]:
        lines += [f"decode attention's blocks: {blocks_rows[0]['error'][:200]}", ""]
    elif blocks_rows:
        lines.append(
            f"one layer's batch-1 decode attention over {blocks_rows[0]['context']} keys (us), by keys a "
            "turn, warps and shares (* the default)"
        )
        lines.append("")
        rows = [
            [f"{r['keys_per_block']}{' *' if r['default'] else ''}", r["warps"], r["splits"]]
            + [r.get("us", r.get("error")), r.get("max_abs_gap", "")]
            for r in blocks_rows
        ]
        headers = ["keys a turn", "warps", "shares", "us", "largest gap from the default"]
        lines.append(markdown_table(headers, rows))
        lines.append("")
    sweep = results.get("matvec_sweep", [])
    if sweep:
        lines.append(
            "a graphed fused decode step (ms) with matvec's blocks for one input width (* its default)"
        )
        lines.append("")
        rows = [
            [
                r["width"],
                config_name(r["blocks"]) + (" *" if r["default"] else ""),
                r.get("step_ms", r.get("error")),
            ]
            for r in sweep
        ]
        lines.append(markdown_table(["input width", "blocks", "step ms"], rows))
        lines.append("")
    early = results.get("dependent_launch", [])
    if early:
        pairs = ", ".join(f"{r['usual_ms']:.3f} / {r['early_ms']:.3f}" for r in early)
        lines += [
            f"a graphed fused decode step (ms), kernels launched as usual / early, in turns: {pairs}",
            "",
        ]
    rows = []
    for name, section in results["sections"].items():
        if name == "patch_embedding_us":
            continue
        if "error" in section:
            rows.append([name, section["error"][:80], "", "", ""])
            continue
        rows.append(
            [
                name,
                section["kernels"],
                section.get("kernel_time_us", 0) / 1e3,
                section.get("matrix_kernel_time_us", 0) / 1e3,
                section.get("span_us", 0) / 1e3,
            ]
        )
    lines.append(markdown_table(["call", "kernels", "kernel ms", "matrix-product ms", "span ms"], rows))
    for name, section in results["sections"].items():
        if name == "patch_embedding_us":
            lines.append("\npatch embedding: " + ", ".join(f"{k} {v:.1f} us" for k, v in section.items()))
        elif section.get("top"):
            lines.append(f"\n{name}, top kernels:")
            top = [[t["name"], t["count"], t["total_us"]] for t in section["top"]]
            lines.append(markdown_table(["kernel", "count", "total us"], top))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("tiny", "mid", "real"), default="real")
    parser.add_argument(
        "--candidates",
        type=Path,
        default=None,
        help="a JSON object {name: settings as benchmarks.tuned writes them}: time the step under each "
        "of them alone, instead of the whole profile",
    )
    add_json_option(parser, "gpu_profile_{config}.json")
    args = parser.parse_args(argv)
    candidates = None
    if args.candidates is not None:
        try:
            candidates = json.loads(args.candidates.read_text())
        except (OSError, ValueError) as error:
            parser.error(f"--candidates: cannot read {args.candidates}: {error}")
        if not isinstance(candidates, dict) or not all(isinstance(v, dict) for v in candidates.values()):
            parser.error(f"--candidates: {args.candidates} must hold an object of settings objects")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    path = json_path(args, "gpu_profile_{config}.json")
    results = measure(
        args.config,
        lambda partial: save_record(path, f"gpu_profile_{args.config}", partial, "cuda"),
        candidates,
    )
    print(report(results))
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
