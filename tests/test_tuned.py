"""benchmarks.tuned: the quickest settings a gpu_profile record timed, written as a KernelSettings file."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from benchmarks import tuned

from qwenvl.decode import AttentionBlocks, KernelSettings, MatvecBlocks
from qwenvl.decode import settings as settings_module

BASE = KernelSettings(matvec_blocks_by_width=((512, MatvecBlocks(rows=2)),))


def sweep_row(width: int, blocks: MatvecBlocks, **timed) -> dict:
    return {"width": width, "blocks": asdict(blocks), "default": False, **timed}


def attention_row(keys: int, warps: int, programs: int, **timed) -> dict:
    return {"context": 320, "keys": keys, "warps": warps, "programs_per_multiprocessor": programs, **timed}


PROFILE = {
    "device_name": "NVIDIA H200",
    "settings": BASE.to_dict(),
    "matvec_sweep": [
        sweep_row(4096, MatvecBlocks(rows=16, columns=256), step_ms=4.4),
        sweep_row(4096, MatvecBlocks(rows=8, columns=256), step_ms=4.2),
        sweep_row(4096, MatvecBlocks(rows=3), error="does not compile"),
        sweep_row(11008, MatvecBlocks(ahead=False), step_ms=4.3),
    ],
    "decode_attention_blocks": [
        attention_row(64, 4, 2, us=7.6),
        attention_row(16, 1, 4, us=3.1),
        attention_row(32, 1, 8, error="does not compile"),
    ],
    "dependent_launch": [
        {"usual_ms": 4.4, "early_ms": 4.2},
        {"usual_ms": 4.4, "early_ms": 4.5},
        {"usual_ms": 4.4, "early_ms": 4.3},
    ],
}


def test_the_quickest_of_each_setting_is_picked_from_the_settings_the_profile_ran():
    settings = tuned.pick(PROFILE)
    assert settings.matvec_for(4096) == MatvecBlocks(rows=8, columns=256)
    assert settings.matvec_for(11008) == MatvecBlocks(ahead=False)
    assert settings.matvec_for(512) == MatvecBlocks(rows=2)  # not swept: the profile's own
    assert settings.few_queries == AttentionBlocks(keys=16, warps=1, programs_per_multiprocessor=4)
    assert settings.many_queries == KernelSettings().many_queries
    assert settings.dependent_launch is True  # quicker in two rounds of three
    assert tuned.pick({}) == KernelSettings()  # nothing timed: the defaults


def test_of_timed_candidates_the_least_median_step_is_picked():
    early = KernelSettings(dependent_launch=True).to_dict()
    candidates = [
        {"name": "base", "settings": KernelSettings(dependent_launch=False).to_dict(), "step_ms": [4.3] * 3},
        {"name": "picked", "settings": early, "step_ms": [4.1, 4.6, 4.2]},
        {"name": "broken", "settings": KernelSettings(matvec=False).to_dict(), "step_ms": []},
    ]
    assert tuned.pick({**PROFILE, "candidates": candidates}) == KernelSettings(dependent_launch=True)


def test_the_command_writes_a_settings_file_the_library_reads(tmp_path, capsys, monkeypatch):
    record = tmp_path / "profile.json"
    record.write_text(json.dumps({"benchmark": "gpu_profile_real_cuda_h200", "results": PROFILE}))
    path = tmp_path / "settings.json"
    tuned.main([str(record), "--json", str(path)])
    assert KernelSettings.load(path) == tuned.pick(PROFILE)
    assert f"written to {path}" in capsys.readouterr().out
    # by default: the package's file for the record's GPU, which KernelSettings.for_device reads
    monkeypatch.setattr(settings_module, "CONFIGS", tmp_path / "configs")
    (tmp_path / "configs").mkdir()
    tuned.main([str(record)])
    assert KernelSettings.load(tmp_path / "configs" / "NVIDIA_H200.json") == tuned.pick(PROFILE)


def test_a_record_it_cannot_read_is_named(tmp_path):
    record = tmp_path / "old.json"
    record.write_text(
        json.dumps({"results": {"matvec_sweep": [{"width": 1, "blocks": {"BLOCK_N": 4}, "step_ms": 1}]}})
    )
    with pytest.raises(SystemExit, match="old.json"):
        tuned.main([str(record), "--json", str(tmp_path / "settings.json")])
