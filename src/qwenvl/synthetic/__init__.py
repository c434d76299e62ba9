"""A small synthetic visual world for training and checking a demo model offline.

Pictures hold one to three flat shapes (circle, square, triangle; red, green, blue, yellow) on a
light, sometimes textured background, with a few stray digits or words. Questions about them
(grounding, counting, colour, shape, caption) come in Chinese and English with templated
answers. See :mod:`.scene` for the pictures, :mod:`.language` for the questions and
:mod:`.dataset` for the files written (and how their relative image paths resolve).
"""

from .dataset import (
    add_arguments,
    generate_dataset,
    generate_eval_set,
    load_conversations,
    load_eval_items,
    run_from_args,
    user_turn,
)
from .language import COLOUR_NAMES, KIND_NAMES, LANGUAGES, QA, QUESTIONS, TASKS, ask, possible_tasks
from .scene import COLOURS, KINDS, Background, Label, Scene, Shape, random_scene, render

__all__ = [
    "COLOURS",
    "COLOUR_NAMES",
    "KINDS",
    "KIND_NAMES",
    "LANGUAGES",
    "QA",
    "QUESTIONS",
    "TASKS",
    "Background",
    "Label",
    "Scene",
    "Shape",
    "add_arguments",
    "ask",
    "generate_dataset",
    "generate_eval_set",
    "load_conversations",
    "load_eval_items",
    "possible_tasks",
    "random_scene",
    "render",
    "run_from_args",
    "user_turn",
]
