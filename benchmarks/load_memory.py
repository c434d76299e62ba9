"""Host memory and time of `QwenVLForCausalLM.from_pretrained` on a mid-size bf16 .bin checkpoint (CPU).

Run: .venv/bin/python -m benchmarks.load_memory [--shards 10] [--repeats 3] [--keep DIR] [--json PATH]
(or .venv/bin/python benchmarks/load_memory.py ...)

The checkpoint mirrors the real Qwen-VL-Chat one at a smaller size: bf16 tensors in
`pytorch_model-0000K-of-0000N.bin` shards plus an index, the real vocabulary (151,936), a 1024-wide
LLM of 8 layers and a small vision tower. Each load runs in a fresh interpreter so its peak RSS is
its own; the figure reported is that peak minus the RSS right after `import qwenvl`, divided by the
bytes the loaded weights occupy in the target dtype. 1.0 would be "nothing but the weights".
Each dtype is loaded `--repeats` times, each in its own interpreter; the table shows medians.
The shards are read from the page cache (they were just written): a cold disk adds its read time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    MID_CONFIG,
    add_json_option,
    json_path,
    markdown_table,
    peak_rss_bytes,
    run_isolated,
    save_record,
)

RESULT_NAME = "load_memory.json"
TARGET_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# -- the checkpoint ---------------------------------------------------------------------------------


def fast_random_state(config: dict[str, Any], seed: int, random: bool = True) -> dict[str, torch.Tensor]:
    """bf16 tensors with the checkpoint's names and shapes; values follow the shape of the real rule
    (norms near 1, the rest 0.02 N(0,1)) but come from torch's generator, which is ~50x faster than
    the per-tensor numpy RandomState of `random_state_dict` and the values do not matter here.
    `random=False`: 0.02 everywhere, norms 1.1, faster still (a minute less for the real shapes on
    2 cores), for figures that only time the reading."""
    from qwenvl.random_checkpoint import NORM_MODULES, parameter_shapes

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(parameter_shapes(config).items()):
        values = torch.randn(shape, generator=generator).mul_(0.02) if random else torch.full(shape, 0.02)
        if name.endswith(".weight") and name.split(".")[-2] in NORM_MODULES:
            values = values.mul_(5.0).add_(1.0)  # 1 + 0.1 N(0,1)
        state[name] = values.to(torch.bfloat16)
    return state


def write_checkpoint(
    folder: str, shards: int, seed: int = 0, config: dict[str, Any] = MID_CONFIG, random: bool = True
) -> int:
    """Config, generation config and bf16 .bin shards in `folder` (values: `fast_random_state`);
    returns the weight files' bytes."""
    from qwenvl.random_checkpoint import GENERATION_CONFIG, save_weights

    os.makedirs(folder, exist_ok=True)
    for name, data in (("config.json", config), ("generation_config.json", GENERATION_CONFIG)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    files = save_weights(fast_random_state(config, seed, random), folder, shards=shards, fmt="bin")
    return sum(os.path.getsize(path) for path in files)


# -- one load, in a fresh interpreter ---------------------------------------------------------------


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc); elsewhere the high-water mark, the best figure available."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def measure_load(folder: str, dtype_name: str, device: str = "cpu") -> dict[str, Any]:
    """Run in a child process: load once onto `device`, report host RSS figures and seconds."""
    from qwenvl import QwenVLForCausalLM

    # current, not peak: a child's high-water mark can include its parent's pages at fork time
    baseline = current_rss_bytes()
    start = time.perf_counter()
    model = QwenVLForCausalLM.from_pretrained(
        folder, **{dtype_name: True}, device_map=device, show_progress=False
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    params = list(model.state_dict().values())
    assert all(p.dtype == TARGET_DTYPES[dtype_name] for p in params), "a tensor is not in the target dtype"
    return {
        "dtype": dtype_name,
        "parameters": sum(p.numel() for p in params),
        "weights_bytes": sum(p.numel() * p.element_size() for p in params),
        "rss_after_import_bytes": baseline,
        "peak_rss_delta_bytes": peak - baseline,
        "rss_delta_after_load_bytes": current_rss_bytes() - baseline,
        "seconds": seconds,
    }


# -- report -----------------------------------------------------------------------------------------


def gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


MEASURED = ("peak_rss_delta_bytes", "rss_delta_after_load_bytes", "seconds")


def summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats of one dtype, with every sample kept for the record."""
    first = samples[0]
    median = {key: statistics.median(s[key] for s in samples) for key in MEASURED}
    peak_over_weights = median["peak_rss_delta_bytes"] / first["weights_bytes"]
    return {
        "dtype": first["dtype"],
        "parameters": first["parameters"],
        "weights_bytes": first["weights_bytes"],
        **median,
        "peak_over_weights": peak_over_weights,
        "samples": samples,
    }


def report(rows: list[dict[str, Any]], checkpoint_bytes: int) -> str:
    headers = (
        "dtype",
        "checkpoint",
        "weights in dtype",
        "peak RSS delta",
        "peak / weights",
        "RSS delta after load",
        "seconds",
    )
    table = [
        (
            row["dtype"],
            gib(checkpoint_bytes),
            gib(row["weights_bytes"]),
            gib(row["peak_rss_delta_bytes"]),
            f"{row['peak_over_weights']:.3f}",
            gib(row["rss_delta_after_load_bytes"]),
            f"{row['seconds']:.2f}",
        )
        for row in rows
    ]
    return markdown_table(headers, table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10, help="number of .bin shards (the real one has 10)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process loads per dtype")
    parser.add_argument("--keep", type=Path, default=None, help="write the checkpoint here and keep it")
    add_json_option(parser, RESULT_NAME)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="qwenvl-load-memory-") as scratch:
        folder = str(args.keep or Path(scratch) / "checkpoint")
        start = time.perf_counter()
        # built in a child too, so this process stays small and its children inherit no big RSS
        checkpoint_bytes = run_isolated(write_checkpoint, folder, args.shards)
        print(f"built {gib(checkpoint_bytes)} of bf16 shards in {time.perf_counter() - start:.1f} s")
        rows = [
            summary([run_isolated(measure_load, folder, name) for _ in range(args.repeats)])
            for name in TARGET_DTYPES
        ]

    print(report(rows, checkpoint_bytes))
    results = {
        "config": MID_CONFIG,
        "checkpoint": {
            "format": "bin",
            "dtype": "bfloat16",
            "shards": args.shards,
            "bytes": checkpoint_bytes,
        },
        "repeats": args.repeats,
        "loads": rows,
    }
    path = json_path(args, RESULT_NAME)
    save_record(path, "load_memory", results, device="cpu")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
