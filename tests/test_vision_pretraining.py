"""Dense patch labels of the synthetic world, and pretraining a vision tower on them."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from qwenvl import QwenVLConfig, QwenVLForCausalLM, QwenVLTokenizer
from qwenvl.demo_model import main as demo_model_main
from qwenvl.finetune.vision_pretraining import DenseHeads, dense_loss, pretrain_vision, scene_batch
from qwenvl.synthetic.patch_labels import patch_labels, shape_coverage
from qwenvl.synthetic.scene import Background, Scene, Shape, random_scene

from .conftest import small_config

PLAIN = Background("plain", (240, 240, 240), (230, 230, 230), 10, 0, 0)


def scene_of(*shapes: Shape, size=(160, 160)) -> Scene:
    return Scene(size[0], size[1], PLAIN, shapes)


def test_a_square_on_whole_patches_labels_exactly_those_patches():
    # 160 px over a 4x4 grid: 40 px patches; the square covers patches (row 1, col 1..2)
    square = Shape("square", "blue", (40, 40, 120, 80), (30, 80, 210))
    labels = patch_labels(scene_of(square), grid=4)
    covered = {5, 6}
    for patch in range(16):
        want = 1.0 if patch in covered else 0.0
        assert labels.kinds[patch, 1 + 1] == pytest.approx(want, abs=1e-6)  # column 2: square
        assert labels.colours[patch, 1 + 2] == pytest.approx(want, abs=1e-6)  # column 3: blue
        assert labels.kinds[patch, 0] == pytest.approx(1 - want, abs=1e-6)
        assert labels.box_weight[patch] == pytest.approx(want, abs=1e-6)
    np.testing.assert_allclose(labels.boxes[5], [0.25, 0.25, 0.75, 0.5])
    np.testing.assert_array_equal(labels.boxes[0], 0.0)


def test_coverage_is_the_fraction_of_each_patch_a_shape_fills():
    circle = Shape("circle", "red", (20, 30, 120, 130), (220, 30, 40))
    triangle = Shape("triangle", "green", (130, 40, 158, 68), (40, 170, 60))
    coverage = shape_coverage(scene_of(circle, triangle, size=(160, 200)), grid=8)
    patch_area = (160 / 8) * (200 / 8)
    assert coverage[0].sum() * patch_area == pytest.approx(math.pi * 50**2, rel=0.02)
    assert coverage[1].sum() * patch_area == pytest.approx(28 * 28 / 2, rel=0.08)
    assert coverage.max() <= 1.0


def test_labels_of_random_scenes_are_distributions_over_one_shape_per_patch():
    for seed in range(20):
        scene = random_scene(random.Random(seed))
        labels = patch_labels(scene, grid=16)
        np.testing.assert_allclose(labels.kinds.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(labels.colours.sum(-1), 1.0, atol=1e-5)
        for patch in np.flatnonzero(labels.box_weight > 0.5):
            shape = next(
                s
                for s in scene.shapes
                if np.allclose(labels.boxes[patch], np.array(s.box) / np.array(scene.size * 2))
            )
            assert labels.kinds[patch, 1 + ("circle", "square", "triangle").index(shape.kind)] > 0.5


def tiny_tower():
    torch.manual_seed(0)
    config = small_config()
    config["visual"] = dict(config["visual"], image_size=56, width=32, layers=1)
    return QwenVLForCausalLM(QwenVLConfig.from_dict(config)).transformer.visual


def test_the_tower_features_feed_the_resampler():
    visual = tiny_tower()
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        features = visual.patch_features(pixels)
        assert features.shape == (2, 16, 32)
        torch.testing.assert_close(visual(pixels), visual.ln_post(visual.attn_pool(features)) @ visual.proj)


def test_pretraining_lowers_the_dense_loss_and_leaves_the_resampler_alone():
    visual = tiny_tower()
    batch = scene_batch(random.Random("fixed"), 8, 56, 14)
    heads = DenseHeads(32)
    resampler = {k: v.clone() for k, v in visual.attn_pool.state_dict().items()}
    conv = visual.conv1.weight.detach().clone()
    with torch.no_grad():
        before = dense_loss(heads(visual.patch_features(batch.pixels)), batch)[1]
    steps = []
    held_out = pretrain_vision(
        visual, steps=30, batch_size=8, lr=3e-3, warmup_steps=3, on_step=lambda step, m: steps.append(m)
    )
    assert len(steps) == 30
    assert held_out["loss"] < before["loss"] * 0.7
    assert set(held_out) >= {"kind_accuracy", "colour_accuracy", "box_error"}
    assert not torch.equal(visual.conv1.weight, conv)
    for name, value in visual.attn_pool.state_dict().items():
        assert torch.equal(value, resampler[name]), name


def test_pretrain_vision_command_writes_a_model_with_only_a_new_tower(tmp_path, capsys):
    torch.manual_seed(0)
    config = small_config()
    config["visual"] = dict(config["visual"], image_size=56)
    QwenVLForCausalLM(QwenVLConfig.from_dict(config)).save_pretrained(tmp_path / "base")
    QwenVLTokenizer().save_pretrained(tmp_path / "base")
    base, out = str(tmp_path / "base"), str(tmp_path / "out")
    assert demo_model_main(["pretrain-vision", base, out, "--steps", "2", "--batch-size", "2"]) == 0
    assert json.loads((tmp_path / "out" / "vision_pretraining.json").read_text())["loss"] > 0
    base = QwenVLForCausalLM.from_pretrained(tmp_path / "base", fp32=True).state_dict()
    out = QwenVLForCausalLM.from_pretrained(tmp_path / "out", fp32=True).state_dict()
    changed = {name for name in base if not torch.equal(base[name], out[name])}
    assert "transformer.visual.conv1.weight" in changed
    assert all(name.startswith("transformer.visual.") and ".attn_pool." not in name for name in changed)
    assert "kind_accuracy" in capsys.readouterr().out
