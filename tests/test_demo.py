"""The bundled demo model: where it lives, how it is stored, and `make run`'s path end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import qwenvl
from qwenvl import QwenVLForCausalLM, QwenVLTokenizer
from qwenvl.compact_vocabulary import KEPT_IDS
from qwenvl.demo import DEMO_IMAGE, DEMO_QUESTION, default_model
from qwenvl.grounding import parse_boxes


@pytest.fixture(scope="module")
def demo():
    torch.set_num_threads(1)
    return QwenVLTokenizer.from_pretrained(qwenvl.DEMO_MODEL), QwenVLForCausalLM.from_pretrained(
        qwenvl.DEMO_MODEL
    )


def test_the_demo_model_ships_inside_the_package_compactly():
    folder = Path(qwenvl.DEMO_MODEL)
    assert folder.is_relative_to(Path(qwenvl.__file__).parent) and default_model() == str(folder)
    stored = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert stored < 40 * 2**20
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        kept = f.get_tensor(KEPT_IDS)
        assert f.get_slice("transformer.wte.weight").get_shape()[0] == len(kept) + 1 < 1000


def test_the_demo_model_loads_with_the_real_vocabulary(demo):
    tokenizer, model = demo
    assert model.config.vocab_size == 151936 >= tokenizer.vocab_size  # the real, padded vocabulary
    assert model.transformer.wte.weight.shape == (151936, model.config.hidden_size)
    assert model.dtype == torch.float32 and not model.generation_config.do_sample


def test_the_demo_model_answers_in_the_chat_format(demo):
    tokenizer, model = demo
    query = tokenizer.from_list_format([{"image": DEMO_IMAGE}, {"text": DEMO_QUESTION}])
    response, history = model.chat(tokenizer, query, history=None)
    boxes = parse_boxes(response)
    # one box, named by a shape of its world (whether it is the right one is `qwenvl eval`'s job)
    assert len(boxes) == 1 and any(kind in boxes[0].phrase for kind in ("circle", "square", "triangle"))
    x1, y1, x2, y2 = boxes[0].coords
    assert 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000
    follow_up, _ = model.chat(tokenizer, "How many shapes are there?", history=history)
    assert any(ch.isdigit() for ch in follow_up), follow_up


def test_make_run_answers_and_draws_the_box(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "qwenvl.demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    header, answer = done.stdout.strip().splitlines()[:2]
    assert json.loads(header)["question"] == DEMO_QUESTION
    assert parse_boxes(answer), answer
    drawn = Image.open(tmp_path / "demo-boxes.png")
    assert drawn.size == Image.open(DEMO_IMAGE).size
