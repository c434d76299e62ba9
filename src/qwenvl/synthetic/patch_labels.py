"""What lies under each ViT patch of a scene's picture: dense labels for pretraining a vision tower.

The model sees a picture resized to a square of ``grid x grid`` patches, so patch ``(row, col)``
covers the picture rectangle ``[col * W / grid, (col + 1) * W / grid) x [row * H / grid, ...)``.
For each patch this module gives the fraction of it each shape covers (from the same anti-aliased
masks :func:`.scene.render` paints with), and from those three targets:

- ``kinds`` [grid*grid, 1 + len(KINDS)]: background, then one column per kind; rows sum to 1;
- ``colours`` [grid*grid, 1 + len(COLOURS)]: background, then one column per colour; rows sum to 1;
- ``boxes`` [grid*grid, 4]: the 0..1 box ``(x1, y1, x2, y2)`` of the shape covering most of the
  patch (zeros where no shape does), with ``box_weight`` [grid*grid] that shape's coverage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .scene import COLOURS, KINDS, Scene, shape_mask


@dataclass(frozen=True)
class PatchLabels:
    kinds: np.ndarray
    colours: np.ndarray
    boxes: np.ndarray
    box_weight: np.ndarray


def shape_coverage(scene: Scene, grid: int) -> np.ndarray:
    """[len(scene.shapes), grid*grid] float32: the fraction of each patch each shape covers."""
    coverage = np.zeros((len(scene.shapes), grid * grid), np.float32)
    for index, shape in enumerate(scene.shapes):
        canvas = Image.new("F", scene.size, 0.0)
        canvas.paste(shape_mask(shape).convert("F"), shape.box[:2])
        # BOX reduction averages each patch's rectangle exactly, fractional edges included
        cells = np.asarray(canvas.resize((grid, grid), Image.BOX), dtype=np.float32) / 255.0
        coverage[index] = np.clip(cells, 0.0, 1.0).reshape(-1)
    return coverage


def patch_labels(scene: Scene, grid: int) -> PatchLabels:
    """The dense targets of `scene` on a ``grid x grid`` patch grid (see the module docstring)."""
    coverage = shape_coverage(scene, grid)
    background = np.clip(1.0 - coverage.sum(axis=0), 0.0, 1.0)
    kinds = np.zeros((grid * grid, 1 + len(KINDS)), np.float32)
    colours = np.zeros((grid * grid, 1 + len(COLOURS)), np.float32)
    kinds[:, 0] = colours[:, 0] = background
    boxes = np.zeros((grid * grid, 4), np.float32)
    box_weight = np.zeros(grid * grid, np.float32)
    size = np.array(scene.size * 2, np.float32)
    for shape, covered in zip(scene.shapes, coverage, strict=True):
        kinds[:, 1 + KINDS.index(shape.kind)] += covered
        colours[:, 1 + tuple(COLOURS).index(shape.colour)] += covered
        mine = covered > box_weight
        boxes[mine] = np.array(shape.box, np.float32) / size
        box_weight[mine] = covered[mine]
    return PatchLabels(kinds, colours, boxes, box_weight)
