"""What every benchmark shares: run metadata, timing (wall clock, waiting for the device, inside a
CUDA graph), memory bandwidth, Markdown tables, JSON records.

A record is `{"benchmark": name, "environment": {...}, "results": {...}}`; `results` holds the raw
figures (every timed sample, not only the medians) so later runs can be compared honestly.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).parent / "results"
VERSIONED_PACKAGES = ("qwenvl", "torch", "triton", "transformers", "tiktoken", "numpy")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo; platform.processor() is often empty on Linux."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(device: str = "cpu") -> dict[str, Any]:
    """Where and how a benchmark ran, for the JSON record."""
    return {
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "versions": {name: package_version(name) for name in VERSIONED_PACKAGES},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # other processes on a 2-core machine slow every figure; the 5-minute load covers the run
        # (this benchmark itself accounts for about 1 to 2 of it)
        "load_average_1_5_15m": [round(x, 2) for x in os.getloadavg()],
        # sys.orig_argv keeps "-m benchmarks.NAME", which sys.argv has already rewritten
        "command": shlex.join(sys.orig_argv),
    }


@dataclass
class Timing:
    """Wall-clock seconds of each timed repeat (warm-up runs excluded)."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "samples_s": self.samples}


def time_call(
    fn: Callable[..., Any],
    *,
    warmup: int = 1,
    repeats: int = 5,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Time `fn` `repeats` times after `warmup` untimed calls; the median resists one-off stalls.

    With `setup`, each call is `fn(setup())` and only `fn` is timed (e.g. a fresh KV cache per run).
    """
    samples = []
    for i in range(warmup + repeats):
        args = (setup(),) if setup is not None else ()
        start = time.perf_counter()
        fn(*args)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            samples.append(elapsed)
    return Timing(samples)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, *, warmup: int = 1, repeats: int = 5) -> Timing:
    """`time_call` that waits for the device at the end of every call."""

    def call() -> None:
        fn()
        synchronize(device)

    return time_call(call, warmup=warmup, repeats=repeats)


def memory_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s of copying a tensor well past the last-level cache (read + write: 2 x its size)."""
    source = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    timing = timed(lambda: target.copy_(source), device, warmup=1, repeats=repeats)
    return 2 * source.numel() * source.element_size() / timing.median


def graph_time(fn: Callable[[], Any], calls: int = 20, replays: int = 5) -> float:
    """Seconds per call of `fn` on the current GPU, recorded `calls` times in one CUDA graph (no
    launch overhead), replayed `replays` times."""
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


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class OtherLoad:
    """How many cores other processes kept busy since creation, from /proc/stat minus our own CPU time
    and that of the child processes we ran (`run_isolated`'s, once they have ended).

    On a small shared machine this is the first thing to check when a figure looks off: at 0.5 or
    more, threads wait for a core and times can double.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        """(wall seconds, CPU seconds busy on the whole machine, CPU seconds of this process and its
        ended children)."""
        with open("/proc/stat", encoding="ascii") as f:
            jiffies = [int(x) for x in f.readline().split()[1:]]
        idle = jiffies[3] + jiffies[4]  # idle and iowait
        busy = (sum(jiffies[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return time.monotonic(), busy, sum(u.ru_utime + u.ru_stime for u in usage)

    def cores(self) -> float:
        wall, busy, own = (end - start for start, end in zip(self._start, self._sample(), strict=True))
        return max(busy - own, 0.0) / wall


def run_isolated(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` in a fresh interpreter, so its peak RSS is its own and not an earlier run's.

    `fn` must be importable (a module-level function) and its result picklable.
    """
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args, kwargs)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if not isinstance(value, float):
            return str(value)
        # thousands separators for big figures, three significant digits for small ones
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def add_json_option(parser: argparse.ArgumentParser, default_name: str) -> None:
    """`--json PATH`; `default_name` (in results/) may name other options, e.g. "x_{config}.json"."""
    parser.add_argument(
        "--json", type=Path, default=None, help=f"where to save the record (default: results/{default_name})"
    )


def json_path(args: argparse.Namespace, default_name: str) -> Path:
    return args.json if args.json is not None else RESULTS_DIR / default_name.format(**vars(args))


def device_kind(device: str) -> str:
    """What a record's file name says of its device: "cpu", or "cuda_" and the GPU's model
    ("cuda_h200" for an NVIDIA H200, "cuda_h100" for an NVIDIA H100 80GB HBM3)."""
    if device != "cuda":
        return device
    words = re.split(r"[\s_-]+", torch.cuda.get_device_name().lower())
    model = next((w for w in words if w != "nvidia" and any(c.isdigit() for c in w)), "gpu")
    return f"cuda_{model}"


def save_record(path: Path, benchmark: str, results: dict[str, Any], device: str = "cpu") -> None:
    record = {"benchmark": benchmark, "environment": environment(device), "results": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    # whole or not at all: a run killed while it saves leaves the last record it saved
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.replace(path)


# The "mid" model of the CPU benchmarks, shaped like Qwen-VL and small enough for a 2-core machine:
# 490M parameters, 311M of them in the embedding and LM head (the real 152k vocabulary).
MID_CONFIG: dict[str, Any] = {
    "model_type": "qwen",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "num_attention_heads": 16,
    "kv_channels": 64,
    "num_hidden_layers": 8,
    "intermediate_size": 11008,  # both SwiGLU branches: 5504 each
    "seq_length": 2048,
    "max_position_embeddings": 8192,
    "visual": {
        "image_size": 448,
        "patch_size": 14,
        "width": 256,
        "heads": 8,
        "layers": 4,
        "mlp_ratio": 4.9231,
        "output_dim": 1024,
        "image_start_id": 151857,
    },
}
