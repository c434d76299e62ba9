"""Compact-vocabulary checkpoints load into the full model: kept rows exact, the rest shared."""

from __future__ import annotations

import json

import pytest
import torch

from qwenvl import QwenVLForCausalLM
from qwenvl import compact_vocabulary as cv
from qwenvl.loading import CheckpointError
from qwenvl.random_checkpoint import random_state_dict, save_weights
from tests.conftest import small_config


@pytest.fixture(scope="module")
def compact_folder(tmp_path_factory):
    config = small_config()
    folder = tmp_path_factory.mktemp("compact")
    (folder / "config.json").write_text(json.dumps(config))
    state = random_state_dict(config, seed=5)
    kept = [0, 7, 151643, 151644, 151645, 151853]
    save_weights(cv.compact(state, kept), str(folder), fmt="safetensors")
    return folder, state, kept


def test_loads_to_full_size(compact_folder):
    folder, state, kept = compact_folder
    model = QwenVLForCausalLM.from_pretrained(folder)
    for name in cv.VOCABULARY_TENSORS:
        loaded, original = model.state_dict()[name], state[name]
        assert loaded.shape == original.shape
        assert torch.equal(loaded[kept], original[kept])
        others = torch.ones(len(original), dtype=torch.bool)
        others[kept] = False
        shared = original[others].mean(0)
        torch.testing.assert_close(loaded[others][:3], shared.expand(3, -1))
    assert torch.equal(model.state_dict()["transformer.ln_f.weight"], state["transformer.ln_f.weight"])


def test_wrong_row_count_is_a_checkpoint_error(tmp_path):
    config = small_config()
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = cv.compact(random_state_dict(config, seed=5), [1, 2, 3])
    state["lm_head.weight"] = state["lm_head.weight"][:-1]
    save_weights(state, str(tmp_path), fmt="safetensors")
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        QwenVLForCausalLM.from_pretrained(tmp_path)
