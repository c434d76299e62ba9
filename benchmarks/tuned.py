"""The fastest of the settings gpu_profile timed, for a run to take (`benchmarks.run --settings`).

Run (after gpu_profile, on the same GPU): python -m benchmarks.tuned PROFILE.json [--json PATH]

From a gpu_profile record it picks `fused_decode.matvec_config`'s blocks for each input width
(the quickest whole step of `matvec_sweep`), the decode attention's keys a turn, warps and
programs per multiprocessor for steps of few queries (the quickest of batch 1's
`decode_attention_blocks`), and DEPENDENT_LAUNCH where its steps ran quicker in more of the
rounds than not. A setting the profile has no figures for keeps its default. From a record of
`gpu_profile --candidates`, it picks the candidate whose step's median time is the least.
gpu_checks.sh then runs `real` with them, whose greedy tokens must still equal the eager path's
(every decode step takes the same kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from qwenvl import fused_decode

ATTENTION_SETTINGS = ("KEYS_PER_BLOCK", "ATTENTION_WARPS", "PROGRAMS_PER_MULTIPROCESSOR")


def pick(profile: dict) -> dict:
    """The settings of the quickest measured configs in a gpu_profile record (see the docstring)."""
    timed = [row for row in profile.get("candidates", []) if row.get("step_ms")]
    if timed:  # whole settings, each timed in a step
        return dict(min(timed, key=lambda row: statistics.median(row["step_ms"]))["settings"])
    settings: dict = {}
    configs = {}
    for row in profile.get("matvec_sweep", []):
        if "step_ms" not in row:
            continue
        best = configs.get(str(row["width"]))
        if best is None or row["step_ms"] < best[0]:
            configs[str(row["width"])] = (row["step_ms"], row["blocks"])
    if configs:
        settings["matvec_config"] = {width: blocks for width, (_, blocks) in configs.items()}
    timed = [row for row in profile.get("decode_attention_blocks", []) if "us" in row]
    if timed:
        best = min(timed, key=lambda row: row["us"])
        chosen = (best["keys_per_block"], best["warps"], best["programs_per_multiprocessor"])
        settings.update(zip(ATTENTION_SETTINGS, chosen, strict=True))
    rounds = profile.get("dependent_launch", [])
    if rounds:
        quicker = sum(r["early_ms"] < r["usual_ms"] for r in rounds)
        settings["DEPENDENT_LAUNCH"] = quicker * 2 > len(rounds)
    return settings


def per_width(configs: dict, default: Callable[[int], dict]) -> Callable[[int], dict]:
    """A `matvec_config`: the blocks of `configs` ({input width: blocks}) for its widths, `default`'s
    for the others."""
    return lambda k: dict(configs[str(k)]) if str(k) in configs else default(k)


def values(settings: dict) -> dict:
    """fused_decode's attributes for `settings`: the names of ATTENTION_SETTINGS and
    DEPENDENT_LAUNCH as they are, `matvec_config` ({input width: blocks}) as a function."""
    out = {name: settings[name] for name in (*ATTENTION_SETTINGS, "DEPENDENT_LAUNCH") if name in settings}
    if settings.get("matvec_config"):
        out["matvec_config"] = per_width(settings["matvec_config"], fused_decode.matvec_config)
    return out


def apply(settings: dict) -> None:
    """Sets fused_decode's settings in this process (a run's, in each of its processes)."""
    for name, value in values(settings).items():
        setattr(fused_decode, name, value)


@contextlib.contextmanager
def applied(**attributes) -> Iterator[None]:
    """fused_decode's `attributes` set while the block runs, the old ones back after."""
    saved = {name: getattr(fused_decode, name) for name in attributes}
    for name, value in attributes.items():
        setattr(fused_decode, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(fused_decode, name, value)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="a gpu_profile record (JSON)")
    parser.add_argument(
        "--json", type=Path, default=None, help="where to write the settings (default: print)"
    )
    args = parser.parse_args(argv)
    try:
        record = json.loads(args.profile.read_text())
    except (OSError, ValueError) as error:
        sys.exit(f"cannot read the profile {args.profile}: {error}")
    settings = pick(record.get("results", record))
    text = json.dumps(settings, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
