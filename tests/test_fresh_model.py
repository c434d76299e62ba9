"""A model built from a config (to train from scratch) starts out able to learn from pictures."""

from __future__ import annotations

import random

import torch

from qwenvl import QwenVLConfig, QwenVLForCausalLM
from qwenvl.demo_model import DEMO_CONFIG
from qwenvl.images import preprocess
from qwenvl.synthetic.scene import random_scene, render


def fit_r2(features: torch.Tensor, target: torch.Tensor, train: int) -> float:
    """R^2 on held-out rows of a least-squares linear fit."""
    x = torch.cat([features, torch.ones(len(features), 1)], 1).double()
    y = target.double()[:, None]
    w = torch.linalg.lstsq(x[:train], y[:train]).solution
    error = ((x[train:] @ w - y[train:]) ** 2).mean()
    return float(1 - error / y[train:].var())


def test_fresh_image_features_say_where_each_cell_lies():
    """Grounding needs positions: token i of a fresh model's image features describes grid cell i,
    and a linear read-out recovers the cell's row and column from the features alone."""
    torch.manual_seed(0)
    model = QwenVLForCausalLM(QwenVLConfig.from_dict(DEMO_CONFIG)).eval()
    pictures = [render(random_scene(random.Random(i))) for i in range(32)]
    with torch.no_grad():
        features = model.transformer.visual(preprocess(pictures, 224))  # [32, 256, 128]
    grid = torch.arange(256)
    flat = features.reshape(-1, features.shape[-1])
    train = 24 * 256  # fit on 24 pictures, score on the other 8
    assert fit_r2(flat, (grid % 16).repeat(32).float(), train) > 0.8
    assert fit_r2(flat, (grid // 16).repeat(32).float(), train) > 0.8
    # and the 256 tokens are not one average of the picture repeated
    assert features[0].std(0).mean() > 0.3 * features[0].abs().mean()


def test_fresh_image_features_single_out_the_cells_a_shape_covers():
    """Grounding needs to see where the shapes are: a linear read-out of a fresh model's image
    features tells the grid cells a shape covers from the background, on pictures it was not fit on
    (about 1 cell in 10 is a shape's)."""
    torch.manual_seed(0)
    model = QwenVLForCausalLM(QwenVLConfig.from_dict(DEMO_CONFIG)).eval()
    pixels = preprocess([render(random_scene(random.Random(i))) for i in range(48)], 224)
    with torch.no_grad():
        features = model.transformer.visual(pixels).reshape(-1, DEMO_CONFIG["visual"]["output_dim"])
    cells = torch.nn.functional.avg_pool2d(pixels, 14).flatten(2)  # [48, 3, 256] mean colours
    covered = (cells - cells.median(-1, keepdim=True).values).norm(dim=1).reshape(-1) > 0.5
    x = torch.cat([features, torch.ones(len(features), 1)], 1).double()
    train = 36 * 256
    w = torch.linalg.lstsq(x[:train], covered[:train, None].double()).solution
    said, truth = (x[train:] @ w)[:, 0] > 0.5, covered[train:]
    assert (said & truth).sum() > 0.6 * said.sum()  # precision
    assert (said & truth).sum() > 0.3 * truth.sum()  # recall
