"""Where a GPU's decode time goes, and which kernel settings are quickest on it; one record.

Run (on a CUDA machine): python -m benchmarks.gpu_profile [--config real] [--settings JSON]
     [--candidates JSON] [--json PATH]

bf16 model with random weights; every part runs under the base settings (`--settings`, default
the device's: `KernelSettings.for_device`) or a change of them made for it. In order, each saved
as soon as it is measured (the parts that choose settings first):

- `gpu_products`: each weight shape's batch-1 product through cuBLAS and `kernels.matvec`;
- `gpu_step_sweep`: a graphed decode step with the kernels launched as usual and early (Hopper
  and later); with each of `matvec`'s candidate blocks at each input width;
- `gpu_attention`: one layer's decode attention under candidate blocks; SDPA against its shares;
- `gpu_breakdown`: kernel breakdowns of decode steps, an image's encoding and a prefill;
- last, the step under the base settings and under those the sweeps found quickest
  (`tuned.pick`), in turns: the pick is checked in the run that made it.

With `--candidates FILE` (`{name: settings}`, each a `KernelSettings.to_dict()` of the keys it
changes from the base settings), only the step under each candidate, in turns. `python -m
benchmarks.tuned RECORD` writes the quickest settings of a record as the device's settings file.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from qwenvl import QwenVLTokenizer
from qwenvl.decode import Decoder, KernelSettings
from qwenvl.vision_graphs import encode_pixels

from . import gpu_attention, gpu_breakdown, gpu_products, gpu_step_sweep, tuned
from .common import add_json_option, device_kind, json_path, memory_bandwidth, save_record
from .models import CONFIGS, build_model, model_config, picture, prompt_ids


def candidate_settings(base: KernelSettings, candidates: dict[str, dict]) -> dict[str, KernelSettings]:
    """Each candidate's settings: the base settings with the keys it names replaced."""
    return {
        name: KernelSettings.from_dict({**base.to_dict(), **changes}) for name, changes in candidates.items()
    }


def measure(
    config_name: str,
    base: KernelSettings,
    save: Callable[[dict], None] = lambda results: None,
    candidates: dict[str, dict] | None = None,
) -> dict:
    """Every part of the docstring, or with `candidates` their steps alone; `save` gets the record
    after each part, so that a run cut short keeps what it measured."""
    device = torch.device("cuda")
    model = build_model(model_config(config_name), torch.bfloat16, device)
    prompt, pixels = prompt_ids(QwenVLTokenizer()), picture(model)
    llm = model.transformer.llm_config
    results: dict = {
        "config": config_name,
        "device_name": torch.cuda.get_device_name(device),
        "settings": base.to_dict(),
        "sections": {},
    }
    with torch.inference_mode():
        features = encode_pixels(model.transformer.visual, pixels)

    def prefill() -> Decoder:
        decoder = Decoder(model, 1, len(prompt) + 64, ops="torch")
        decoder.prefill([prompt], features)
        return decoder

    cache = prefill().cache  # outside inference mode: the steps put its lengths back after each call

    def make_step(settings: KernelSettings) -> Callable[[], None]:
        return gpu_step_sweep.triton_step(model, cache, settings)

    timer = gpu_step_sweep.replay_time
    if candidates is not None:
        chosen = candidate_settings(base, candidates)
        results["candidates"] = gpu_step_sweep.candidate_timings(make_step, timer, chosen)
        save(results)
        return results
    bandwidth = memory_bandwidth(device, 2048)
    products, step = gpu_products.product_rows(model, bandwidth, base)
    results.update(memory_bandwidth_bytes_per_s=bandwidth, products=products, products_step=step)
    save(results)
    if torch.cuda.get_device_capability(device) >= (9, 0):  # dependent launch: Hopper and later
        results["dependent_launch"] = gpu_step_sweep.dependent_launch_timings(make_step, timer, base)
        save(results)
    results["matvec_sweep"] = []
    widths = sorted({llm.hidden_size, llm.projection_size, llm.mlp_width})
    gpu_step_sweep.matvec_sweep(
        make_step, timer, base, widths, rows=results["matvec_sweep"], save=lambda: save(results)
    )
    for name, part in (
        ("decode_attention_blocks", lambda: gpu_attention.attention_block_rows(llm, device, base)),
        ("decode_attention", lambda: gpu_attention.attention_rows(llm, device, base)),
    ):
        try:
            results[name] = part()
        except Exception as error:  # keep the rest of the profile
            results[name] = [{"error": repr(error)[:200]}]
        save(results)

    def save_sections(sections: dict) -> None:
        results["sections"] = sections
        save(results)

    gpu_breakdown.breakdowns(model, cache, base, pixels, prefill, save_sections)
    picked = tuned.pick({**results, "candidates": []})
    chosen = {"base": base, "picked by tuned": picked}
    results["candidates"] = gpu_step_sweep.candidate_timings(make_step, timer, chosen)
    save(results)
    return results


def report(results: dict) -> str:
    header = f"Config {results['config']} on {results['device_name']}, bf16"
    if "memory_bandwidth_bytes_per_s" in results:
        header += f"; copy bandwidth {results['memory_bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s"
    lines = [
        header,
        f"base settings: {json.dumps(results['settings'])}",
        "",
        *gpu_products.report_lines(results),
        *gpu_step_sweep.report_lines(results),
        *gpu_attention.report_lines(results),
        *gpu_breakdown.report_lines(results),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS, default="real")
    parser.add_argument(
        "--settings", type=Path, default=None, help="the base KernelSettings (JSON; default: the device's)"
    )
    parser.add_argument(
        "--candidates",
        type=Path,
        default=None,
        help="a JSON object {name: settings changed from the base}: time the step under each, nothing else",
    )
    add_json_option(
        parser, "gpu_profile_{config}_<cuda and the GPU's model>.json, e.g. gpu_profile_real_cuda_h200.json"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    candidates = None
    if args.candidates is not None:
        try:
            candidates = json.loads(args.candidates.read_text())
            candidate_settings(KernelSettings(), candidates)
        except (OSError, ValueError, TypeError, AttributeError) as error:
            parser.error(f"--candidates: {args.candidates} is not an object of settings: {error}")
    try:
        base = KernelSettings.load(args.settings) if args.settings else KernelSettings.for_device("cuda")
    except ValueError as error:
        parser.error(f"--settings: {error}")
    name = f"gpu_profile_{args.config}_{device_kind('cuda')}"
    path = json_path(args, name + ".json")
    results = measure(args.config, base, lambda partial: save_record(path, name, partial, "cuda"), candidates)
    print(report(results))
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
