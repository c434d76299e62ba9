"""Decode speed: greedy tokens/s of the fast decoder against the straightforward one, batched
decoding, and the fraction of the memory-bandwidth bound a batch-1 step reaches.

Both sides are a `qwenvl.decode.Decoder` over the same prompt; only their options differ:

- the baseline, `BASELINE`: mode "plain" with the "torch" backend, the straightforward eager path
  (each step reads the cache up to its longest row, asks the device for that length, and runs
  the layers in plain PyTorch);
- the fast path, a `DecodePath`: by default mode "auto" with the device's default backend (on a
  GPU the Triton kernels in a step replayed as a CUDA graph, on CPU static steps over the CPU
  backend's copies of the weights).

`alternating` times several models' batch-1 steps in turns, for a ratio between models that the
machine's drift does not move (the Int4 model over bf16).

A step is timed as `generation.stream_tokens` runs it: greedy tokens chosen on the device by
`decode.choose_next` and read by the host, on a GPU while it computes the next step. Both paths
must choose the same greedy tokens. The bound: bytes of LLM weights a step reads over the copy
bandwidth (`common.memory_bandwidth`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from qwenvl import QwenVLForCausalLM
from qwenvl.decode import Decoder, KernelSettings, SamplingParams, choose_next
from qwenvl.decode import Sequence as DecodingSequence

from .common import Timing, time_call
from .models import MIB, llm_weight_bytes

GREEDY = SamplingParams(do_sample=False)


@dataclass(frozen=True)
class DecodePath:
    """A decoder's options: its mode (`qwenvl.decode.DECODE_MODES`), its backend (a name of
    `qwenvl.decode.BACKENDS`; None: the decoder's default for the device and mode), and the kernel
    settings a Triton backend runs under (None: the device's, `KernelSettings.for_device`)."""

    mode: str = "auto"
    ops: str | None = None
    settings: KernelSettings | None = None

    def decoder(self, model: QwenVLForCausalLM, rows: int, capacity: int) -> Decoder:
        return Decoder(model, rows, capacity, mode=self.mode, ops=self.ops, settings=self.settings)

    def resolved(self, model: QwenVLForCausalLM) -> dict:
        """The mode and backend its decoders get on `model`'s device, and the backend's settings."""
        decoder = self.decoder(model, 1, 1)
        settings = getattr(decoder.ops, "settings", None)
        return {
            "mode": decoder.mode,
            "ops": decoder.ops.name,
            "kernel_settings": settings and settings.to_dict(),
        }


BASELINE = DecodePath(mode="plain", ops="torch")


def describe(path: dict) -> str:
    return f"Decoder(mode={path['mode']!r}, ops={path['ops']!r})"


def greedy_steps(decoder: Decoder, logits: torch.Tensor, count: int) -> Iterator[list]:
    """The greedy tokens of the prefill's `logits` [B, V] and of the `count` - 1 steps after them,
    chosen and read as `stream_tokens` does: on a GPU the next step is launched before the host
    reads this one's tokens."""
    rows, vocab = logits.shape
    sequences = [DecodingSequence.start([0], GREEDY, count, vocab, logits.device) for _ in range(rows)]
    read_ahead = logits.device.type == "cuda"
    choice = choose_next(sequences, logits)
    for step in range(count):
        last = step == count - 1
        ahead = None
        if read_ahead:
            read = choice.read_later()
            ahead = None if last else choose_next(sequences, decoder.step(choice.tokens))
            tokens = read()
        else:
            tokens = choice.read()
        yield tokens
        if not last:
            choice = ahead if ahead is not None else choose_next(sequences, decoder.step(choice.tokens))


def decode_run(
    model: QwenVLForCausalLM,
    prompt: list[int],
    features: torch.Tensor | None,
    batch: int,
    path: DecodePath,
    *,
    warmup: int,
    steps: int,
    capacity: int,
) -> tuple[Timing, list[list[int]]]:
    """Per-step timing of greedy decoding of `batch` copies of the prompt through `path`'s decoder,
    and each row's tokens (the prefill's first). The prefill is not timed; the cache's capacity is
    the same in every call, so a compiled step compiles once per batch size."""
    decoder = path.decoder(model, batch, capacity)
    logits = decoder.prefill([prompt] * batch, None if features is None else features.repeat(batch, 1, 1))
    generated = greedy_steps(decoder, logits, 1 + warmup + steps)
    tokens = [next(generated)]
    timing = time_call(lambda: tokens.append(next(generated)), warmup=warmup, repeats=steps)
    return timing, [list(row) for row in zip(*tokens, strict=True)]


def greedy_tokens_equal(
    model: QwenVLForCausalLM,
    prompt: list[int],
    features: torch.Tensor | None,
    fast: DecodePath,
    steps: int,
    capacity: int,
) -> tuple[bool, list[int], list[int]]:
    """Whether the baseline and `fast` choose the same greedy tokens after the prompt (`steps` steps)."""
    _, baseline = decode_run(model, prompt, features, 1, BASELINE, warmup=0, steps=steps, capacity=capacity)
    _, tokens = decode_run(model, prompt, features, 1, fast, warmup=0, steps=steps, capacity=capacity)
    return baseline == tokens, baseline[0], tokens[0]


@torch.inference_mode()
def measure(
    model: QwenVLForCausalLM,
    prompt: list[int],
    features: torch.Tensor | None,
    fast: DecodePath,
    *,
    batch_sizes: Sequence[int] = (8, 32, 64),
    steps: int = 16,
    warmup: int = 2,
    equal_steps: int = 16,
) -> dict:
    """The baseline's batch-1 decode and the fast path's at batch 1 and `batch_sizes`."""
    capacity = len(prompt) + max(warmup + steps, equal_steps) + 1
    equal, baseline_tokens, fast_tokens = greedy_tokens_equal(
        model, prompt, features, fast, equal_steps, capacity
    )
    timing = {"warmup": warmup, "steps": steps, "capacity": capacity}
    baseline, _ = decode_run(model, prompt, features, 1, BASELINE, **timing)
    per_batch = {b: decode_run(model, prompt, features, b, fast, **timing)[0] for b in (1, *batch_sizes)}
    return {
        "fast_path": fast.resolved(model),
        "baseline": BASELINE.resolved(model),
        "decode_steps": steps,
        "decode_warmup_steps": warmup,
        "batch_sizes": [1, *batch_sizes],
        "llm_weight_bytes_per_step": llm_weight_bytes(model),
        "greedy_tokens_compared": equal_steps,
        "greedy_tokens_equal": equal,
        "greedy_tokens_baseline": baseline_tokens,
        "greedy_tokens_fast": fast_tokens,
        "decode_step_baseline_batch1": baseline.as_dict(),
        **{f"decode_step_fast_batch{b}": t.as_dict() for b, t in per_batch.items()},
        "decode_tokens_per_s_baseline_batch1": 1 / baseline.median,
        **{f"decode_tokens_per_s_fast_batch{b}": b / t.median for b, t in per_batch.items()},
    }


@torch.inference_mode()
def alternating(
    models: dict[str, QwenVLForCausalLM],
    prompt: list[int],
    features: torch.Tensor | None,
    path: DecodePath,
    *,
    rounds: int = 15,
    steps: int = 16,
    warmup: int = 2,
) -> dict:
    """Batch-1 decode of several models in one process, in turns: each round times `steps` steps
    of each model, one after the other. On a shared machine the memory's speed drifts over
    minutes (a mid bf16 step took 21 to 33 ms within one run), so two figures measured in runs
    apart compare the drift as much as the models; in turns, each round's ratio compares steps
    taken under the same conditions. The ratios are each round's medians' ratio, the median of
    them the figure."""
    capacity = len(prompt) + rounds * steps + warmup + 2
    generated = {}
    for name, model in models.items():
        decoder = path.decoder(model, 1, capacity)
        logits = decoder.prefill([prompt], features)
        generated[name] = greedy_steps(decoder, logits, capacity - len(prompt))
        for _ in range(1 + warmup):
            next(generated[name])
    medians: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, steps_of in generated.items():
            medians[name].append(
                time_call(lambda steps_of=steps_of: next(steps_of), warmup=0, repeats=steps).median
            )
    return {"rounds": rounds, "steps_per_round": steps, "median_step_s_per_round": medians}


def round_ratios(alternated: dict, slower: str, faster: str) -> list[float]:
    """Each round's step time of `slower` over `faster` (an `alternating` record)."""
    times = alternated["median_step_s_per_round"]
    return [a / b for a, b in zip(times[slower], times[faster], strict=True)]


def ratios(dtypes: dict[str, dict], bandwidth: float, headline: str, serving: str) -> dict:
    """The run's decode ratios: the fast path over the baseline (in the `headline` dtype and in
    each), bf16 over fp32, the Int4 model over bf16 (batch 1, fast paths), batch N over batch 1
    and the roofline fraction (in the `serving` dtype)."""
    fast_1 = {name: r["decode_tokens_per_s_fast_batch1"] for name, r in dtypes.items()}
    speedups = {name: fast_1[name] / r["decode_tokens_per_s_baseline_batch1"] for name, r in dtypes.items()}
    roofline = {name: r["llm_weight_bytes_per_step"] * fast_1[name] / bandwidth for name, r in dtypes.items()}
    return {
        "decode_speedup_vs_baseline": speedups[headline],
        "decode_speedup_vs_baseline_dtype": headline,
        "decode_speedup_vs_baseline_per_dtype": speedups,
        "bf16_over_fp32_decode": (
            fast_1["bf16"] / fast_1["fp32"] if {"bf16", "fp32"} <= fast_1.keys() else None
        ),
        # measured apart, in processes minutes apart; `run` also measures it in turns
        "int4_over_bf16_decode_separate_runs": (
            fast_1["int4"] / fast_1["bf16"] if {"int4", "bf16"} <= fast_1.keys() else None
        ),
        **{
            f"batch{b}_over_batch1_throughput": dtypes[serving][f"decode_tokens_per_s_fast_batch{b}"]
            / fast_1[serving]
            for b in dtypes[serving]["batch_sizes"][1:]
        },
        "decode_roofline_fraction": roofline[serving],
        "decode_roofline_fraction_per_dtype": roofline,
        "greedy_tokens_equal": all(r["greedy_tokens_equal"] for r in dtypes.values()),
    }


def table_rows(r: dict, bandwidth: float) -> list[tuple[str, float]]:
    """(figure, value) of one dtype's decode results, in display units."""
    bound = bandwidth / r["llm_weight_bytes_per_step"]
    return [
        ("decode batch 1, baseline (tokens/s)", r["decode_tokens_per_s_baseline_batch1"]),
        ("decode batch 1, fast path (tokens/s)", r["decode_tokens_per_s_fast_batch1"]),
        *[
            (f"decode batch {b}, fast path (tokens/s, all rows)", r[f"decode_tokens_per_s_fast_batch{b}"])
            for b in r["batch_sizes"][1:]
        ],
        ("LLM weights read per step (MiB)", r["llm_weight_bytes_per_step"] / MIB),
        ("decode bound = bandwidth / weights (tokens/s)", bound),
        ("decode roofline fraction (batch 1, fast path)", r["decode_tokens_per_s_fast_batch1"] / bound),
    ]
