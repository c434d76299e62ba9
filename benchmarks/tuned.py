"""The quickest kernel settings a `gpu_profile` record timed, written as the device's settings file.

Run (after gpu_profile): python -m benchmarks.tuned RECORD.json [--json PATH]

From a record's timed candidates (`gpu_profile` ends with the base settings against its own
pick, and `--candidates` times only those), the one whose step's median time is the least.
Without any, from the record's sweeps, starting from the settings it ran under: for each input
width the `matvec` blocks of the quickest whole step, the quickest `few_queries` blocks of batch
1's decode attention, and `dependent_launch` where the early launch was quicker in most rounds.

The result is a `KernelSettings` JSON file, by default the package's file for the record's GPU
(`qwenvl/decode/configs/<device name>.json`, which `KernelSettings.for_device` reads), or PATH.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from qwenvl.decode import AttentionBlocks, KernelSettings, MatvecBlocks
from qwenvl.decode.settings import config_path

from .gpu_step_sweep import with_blocks


def pick(profile: dict) -> KernelSettings:
    """The quickest settings a gpu_profile record's results timed (see the module's docstring)."""
    timed = [row for row in profile.get("candidates", []) if row.get("step_ms")]
    if timed:
        quickest = min(timed, key=lambda row: statistics.median(row["step_ms"]))
        return KernelSettings.from_dict(quickest["settings"])
    settings = KernelSettings.from_dict(profile.get("settings", {}))
    best: dict[int, tuple[float, MatvecBlocks]] = {}
    for row in profile.get("matvec_sweep", []):
        if "step_ms" in row and (row["width"] not in best or row["step_ms"] < best[row["width"]][0]):
            best[row["width"]] = (row["step_ms"], MatvecBlocks(**row["blocks"]))
    for width, (_, blocks) in best.items():
        settings = with_blocks(settings, width, blocks)
    timed = [row for row in profile.get("decode_attention_blocks", []) if "us" in row]
    if timed:
        quickest = min(timed, key=lambda row: row["us"])
        blocks = AttentionBlocks(quickest["keys"], quickest["warps"], quickest["programs_per_multiprocessor"])
        settings = settings.with_changes(few_queries=blocks)
    rounds = profile.get("dependent_launch", [])
    if rounds:
        quicker = sum(r["early_ms"] < r["usual_ms"] for r in rounds)
        settings = settings.with_changes(dependent_launch=quicker * 2 > len(rounds))
    return settings


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="a gpu_profile record (JSON)")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the settings (default: the package's file for the GPU)",
    )
    args = parser.parse_args(argv)
    try:
        profile = json.loads(args.profile.read_text())["results"]
        settings = pick(profile)
        path = args.json if args.json is not None else config_path(profile["device_name"])
    except (OSError, KeyError, TypeError, ValueError) as error:
        sys.exit(f"cannot read the settings of the profile {args.profile}: {error!r}")
    settings.save(path)
    print(json.dumps(settings.to_dict(), indent=2))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
