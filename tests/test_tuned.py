"""benchmarks.tuned: the quickest of gpu_profile's timed settings, and how a run takes them."""

from __future__ import annotations

import json

from benchmarks import tuned

from qwenvl import fused_decode

PROFILE = {
    "matvec_sweep": [
        {"width": 4096, "blocks": {"BLOCK_N": 16, "BLOCK_K": 256}, "step_ms": 4.4},
        {"width": 4096, "blocks": {"BLOCK_N": 8, "BLOCK_K": 256}, "step_ms": 4.2},
        {"width": 4096, "blocks": {"BLOCK_N": 2, "BLOCK_K": 2048}, "error": "no compile"},
        {"width": 11008, "blocks": {"BLOCK_N": 4, "BLOCK_K": 1024}, "step_ms": 4.3},
    ],
    "decode_attention_blocks": [
        {"keys_per_block": 64, "warps": 4, "programs_per_multiprocessor": 2, "us": 7.6},
        {"keys_per_block": 16, "warps": 1, "programs_per_multiprocessor": 4, "us": 3.1},
        {"keys_per_block": 32, "warps": 1, "programs_per_multiprocessor": 8, "error": "no compile"},
    ],
    "dependent_launch": [
        {"usual_ms": 4.4, "early_ms": 4.2},
        {"usual_ms": 4.4, "early_ms": 4.5},
        {"usual_ms": 4.4, "early_ms": 4.3},
    ],
}


def test_the_quickest_of_each_setting_is_picked():
    assert tuned.pick(PROFILE) == {
        "matvec_config": {"4096": {"BLOCK_N": 8, "BLOCK_K": 256}, "11008": {"BLOCK_N": 4, "BLOCK_K": 1024}},
        "KEYS_PER_BLOCK": 16,
        "ATTENTION_WARPS": 1,
        "PROGRAMS_PER_MULTIPROCESSOR": 4,
        "DEPENDENT_LAUNCH": True,  # quicker in two rounds of three
    }
    assert tuned.pick({}) == {}  # nothing timed (a GPU without Hopper's dependent launch, say)


def test_of_candidates_the_one_with_the_least_median_step_is_picked():
    candidates = [
        {"name": "default", "settings": {}, "step_ms": [4.3, 4.3, 4.3]},
        {"name": "early", "settings": {"DEPENDENT_LAUNCH": True}, "step_ms": [4.1, 4.6, 4.2]},
        {"name": "broken", "settings": {"KEYS_PER_BLOCK": 8}, "step_ms": []},
    ]
    assert tuned.pick({"candidates": candidates}) == {"DEPENDENT_LAUNCH": True}


def test_settings_apply_to_fused_decode(monkeypatch):
    for name in (*tuned.ATTENTION_SETTINGS, "DEPENDENT_LAUNCH", "matvec_config"):
        monkeypatch.setattr(fused_decode, name, getattr(fused_decode, name))  # put back after
    default = fused_decode.matvec_config
    tuned.apply(tuned.pick(PROFILE))
    assert fused_decode.matvec_config(4096) == {"BLOCK_N": 8, "BLOCK_K": 256}
    assert fused_decode.matvec_config(512) == default(512)  # a width not swept keeps its blocks
    assert (fused_decode.KEYS_PER_BLOCK, fused_decode.ATTENTION_WARPS) == (16, 1)
    assert fused_decode.PROGRAMS_PER_MULTIPROCESSOR == 4 and fused_decode.DEPENDENT_LAUNCH is True


def test_the_command_reads_a_record_and_writes_the_settings(tmp_path, capsys):
    record = tmp_path / "profile.json"
    record.write_text(json.dumps({"benchmark": "gpu_profile_real", "results": PROFILE}))
    settings = tmp_path / "settings.json"
    tuned.main([str(record), "--json", str(settings)])
    assert json.loads(settings.read_text()) == tuned.pick(PROFILE)
    assert '"ATTENTION_WARPS": 1' in capsys.readouterr().out
