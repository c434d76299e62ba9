"""benchmarks.run's suite on the tiny model: the baseline decoder chooses the fast decoder's greedy
tokens, a run's record holds its ratios as numbers, and the command's flags become KernelSettings."""

from __future__ import annotations

import json

import pytest
import torch
from benchmarks import run
from benchmarks.common import save_record
from benchmarks.decode_speed import BASELINE, DecodePath, decode_run, greedy_tokens_equal
from benchmarks.models import picture, prompt_ids

from qwenvl import QwenVLForCausalLM
from qwenvl.decode import KernelSettings

from .conftest import NEEDS_TRITON

pytestmark = pytest.mark.usefixtures("one_thread")

RATIOS = (
    "decode_speedup_vs_baseline",
    "bf16_over_fp32_decode",
    "batch2_over_batch1_throughput",
    "decode_roofline_fraction",
    "first_token_speedup_vs_baseline",
    "second_turn_speedup",
    "chat_second_turn_speedup",
    "engine_over_generate_decode",
)


@pytest.fixture
def one_thread():
    """On a shared 2-core machine two threads stall behind any other busy process; one keeps this fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def features_of(model) -> torch.Tensor:
    with torch.inference_mode():
        return model.transformer.visual(picture(model))


def test_the_baseline_decoder_chooses_the_fast_decoders_greedy_tokens(tiny_model, tokenizer):
    """One image + question (301 tokens, past seq_length 64: NTK and log-n in play), greedy steps."""
    prompt, features = prompt_ids(tokenizer), features_of(tiny_model)
    capacity = len(prompt) + 10
    fast = DecodePath()  # on CPU: static steps over the CPU backend
    assert fast.resolved(tiny_model) == {"mode": "static", "ops": "cpu", "kernel_settings": None}
    assert BASELINE.resolved(tiny_model) == {"mode": "plain", "ops": "torch", "kernel_settings": None}
    with torch.inference_mode():
        equal, baseline, tokens = greedy_tokens_equal(tiny_model, prompt, features, fast, 8, capacity)
        assert equal and baseline == tokens and len(baseline) == 9
        # batch 2 through the timed path: both rows of both decoders are the batch-1 tokens
        timing = {"warmup": 1, "steps": 2, "capacity": capacity}
        _, baseline_rows = decode_run(tiny_model, prompt, features, 2, BASELINE, **timing)
        _, fast_rows = decode_run(tiny_model, prompt, features, 2, fast, **timing)
    assert baseline_rows == fast_rows == [baseline[:4]] * 2


@NEEDS_TRITON
def test_the_triton_backend_chooses_the_same_tokens(tiny_checkpoint, tokenizer, interpreter_settings):
    """The fast path as on a GPU (Triton's interpreter here: a few steps keep it to seconds), with
    the settings it is given; a copy of the tiny model, whose MLP weights the backend packs."""
    model = QwenVLForCausalLM.from_pretrained(tiny_checkpoint, fp32=True)
    prompt, features = prompt_ids(tokenizer), features_of(model)
    fast = DecodePath("static", "triton", interpreter_settings)
    assert fast.resolved(model)["kernel_settings"] == interpreter_settings.to_dict()
    with torch.inference_mode():
        equal, baseline, tokens = greedy_tokens_equal(model, prompt, features, fast, 3, len(prompt) + 4)
    assert equal and len(tokens) == 4


def test_a_tiny_run_records_its_ratios_as_numbers(tmp_path):
    # equal greedy tokens over more steps are the tests' above: here one step of each keeps it short
    options = run.Options(batch_sizes=(2,), steps=1, warmup=0, repeats=1, equal_steps=2, engine_tokens=2)
    results = run.measure("tiny", "cpu", options, bandwidth_mb=8, isolated=False)
    path = tmp_path / "run.json"
    save_record(path, "run_tiny_cpu", results)
    record = json.loads(path.read_text())["results"]
    for key in RATIOS:
        assert isinstance(record[key], float) and record[key] > 0, key
    assert record["greedy_tokens_equal"] is True and record["batch_sizes"] == [1, 2]
    assert record["engine_graphs_speedup"] is None  # no graphs on CPU
    assert record["fast_path"] == {"mode": "static", "ops": "cpu", "kernel_settings": None}
    assert record["baseline"] == {"mode": "plain", "ops": "torch", "kernel_settings": None}
    bf16 = record["dtypes"]["bf16"]
    assert bf16["second_turn"]["reuse"]["reused_tokens"] > 0 and "second_turn" not in record["dtypes"]["fp32"]
    assert bf16["engine_decode"]["engine"]["new_tokens"] == 2
    assert record["checkpoint"] is None
    report = run.report(results)
    assert "fast path Decoder(mode='static', ops='cpu'), baseline Decoder(mode='plain', ops='torch')" in (
        report
    )
    assert "| one request's decode in the engine, CUDA graphs over none | not measured |" in report


def test_the_commands_flags_change_the_settings_it_is_given(tmp_path):
    parser = run.argparse.ArgumentParser()

    def settings(*argv: str) -> KernelSettings | None:
        args = run.argparse.Namespace(device="cpu", settings=None, sdpa_decode=False, no_matvec=False)
        args.no_dependent_launch = False
        for flag in argv:
            if flag.startswith("--"):
                setattr(args, flag[2:].replace("-", "_"), True)
            else:
                args.settings = flag
        return run.kernel_settings(parser, args)

    assert settings() is None  # the decoder's own: the device's
    assert settings("--no-matvec", "--sdpa-decode") == KernelSettings(matvec=False, flash_decoding=False)
    path = tmp_path / "settings.json"
    KernelSettings(dependent_launch=False).with_changes(matvec=False).save(path)
    assert settings(str(path), "--sdpa-decode") == KernelSettings(
        matvec=False, flash_decoding=False, dependent_launch=False
    )
    with pytest.raises(SystemExit):
        settings(str(tmp_path / "missing.json"))


def test_the_int4_and_bf16_models_decode_in_turns():
    import statistics

    from benchmarks.models import model_config

    record = run.int4_against_bf16(model_config("tiny"), torch.device("cpu"), run.Options(steps=1))
    per_round = record["int4_over_bf16_per_round"]
    assert len(per_round) == record["rounds"] == len(record["median_step_s_per_round"]["int4"])
    assert record["int4_over_bf16"] == statistics.median(per_round) > 0
