"""Questions about a scene and their templated answers, in Chinese (zh) and English (en).

Each task has canonical phrasings (the ones an outside checker asks; picked half the time) and
others for variety. Answers are short fixed templates so that a tiny model can learn them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .scene import Scene, Shape

LANGUAGES = ("zh", "en")
TASKS = ("grounding", "count", "colour", "shape", "caption")

COLOUR_NAMES = {
    "zh": {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"},
    "en": {"red": "red", "green": "green", "blue": "blue", "yellow": "yellow"},
}
KIND_NAMES = {
    "zh": {"circle": "圆形", "square": "正方形", "triangle": "三角形"},
    "en": {"circle": "circle", "square": "square", "triangle": "triangle"},
}


@dataclass(frozen=True)
class Phrasings:
    canonical: tuple[str, ...]
    others: tuple[str, ...]

    def pick(self, rng: random.Random, canonical: bool | None = None) -> str:
        """A canonical phrasing when asked (or half the time when ``canonical`` is None)."""
        if canonical is None:
            canonical = rng.random() < 0.5
        return rng.choice(self.canonical if canonical else self.others)


# Placeholders: {target} "红色圆形" / "red circle", {kind} and {colour} single names.
QUESTIONS: dict[str, dict[str, Phrasings]] = {
    "grounding": {
        "zh": Phrasings(
            ("框出图中的{target}",),
            (
                "找到图中的{target}并框出来。",
                "{target}在哪里？",
                "请给出{target}的位置。",
                "图中的{target}在什么位置？",
            ),
        ),
        "en": Phrasings(
            ("Box the {target}.",),
            (
                "Where is the {target}?",
                "Find the {target}.",
                "Locate the {target} in the picture.",
                "Draw a box around the {target}.",
                "Give the bounding box of the {target}.",
            ),
        ),
    },
    "count": {
        "zh": Phrasings(
            ("图中有几个图形？",),
            ("图里一共有多少个图形？", "数一数图中有几个形状。", "这张图片里有多少个图形？"),
        ),
        "en": Phrasings(
            ("How many shapes are there?",),
            (
                "How many shapes are in the picture?",
                "Count the shapes in the image.",
                "How many objects can you see?",
            ),
        ),
    },
    "colour": {
        "zh": Phrasings(("{kind}是什么颜色？",), ("图中的{kind}是什么颜色的？", "{kind}是哪种颜色？")),
        "en": Phrasings(
            ("What colour is the {kind}?", "What color is the {kind}?"),
            (
                "What is the colour of the {kind}?",
                "Which color is the {kind}?",
                "Tell me the colour of the {kind}.",
            ),
        ),
    },
    "shape": {
        "zh": Phrasings(
            ("{colour}的图形是什么形状？",),
            ("{colour}的是什么图形？", "哪个图形是{colour}的？", "{colour}的物体是什么形状？"),
        ),
        "en": Phrasings(
            ("What shape is the {colour} object?",),
            ("What shape is the {colour} one?", "Which shape is {colour}?", "What is the {colour} shape?"),
        ),
    },
    "caption": {
        "zh": Phrasings(
            ("描述画面内容。",), ("描述这张图片。", "图中有什么？", "简单描述一下这幅图。", "请描述图片。")
        ),
        "en": Phrasings(
            ("Describe the picture.",),
            (
                "Describe the image.",
                "What is in the picture?",
                "What do you see in this image?",
                "Briefly describe the image.",
            ),
        ),
    },
}


@dataclass(frozen=True)
class QA:
    """One question with its reference answer and the facts a scorer needs (``truth``)."""

    task: str
    language: str
    question: str
    answer: str
    truth: dict


def _check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; expected one of {LANGUAGES}")


def shape_phrase(shape: Shape, language: str, *, with_colour: bool = True) -> str:
    """ "红色圆形" / "red circle" (or just the kind)."""
    kind = KIND_NAMES[language][shape.kind]
    if not with_colour:
        return kind
    return COLOUR_NAMES[language][shape.colour] + ("" if language == "zh" else " ") + kind


def grounding_answer(shape: Shape, scene: Scene, language: str, *, with_colour: bool = True) -> str:
    phrase = shape_phrase(shape, language, with_colour=with_colour)
    ref = phrase if language == "zh" else f"the {phrase}"
    x1, y1, x2, y2 = shape.normalized_box(scene.width, scene.height)
    return f"<ref>{ref}</ref><box>({x1},{y1}),({x2},{y2})</box>"


def count_answer(count: int, language: str) -> str:
    if language == "zh":
        return f"图中有{count}个图形。"
    return "There is 1 shape." if count == 1 else f"There are {count} shapes."


def colour_answer(shape: Shape, language: str) -> str:
    kind, colour = KIND_NAMES[language][shape.kind], COLOUR_NAMES[language][shape.colour]
    return f"{kind}是{colour}的。" if language == "zh" else f"The {kind} is {colour}."


def shape_answer(shape: Shape, language: str) -> str:
    kind, colour = KIND_NAMES[language][shape.kind], COLOUR_NAMES[language][shape.colour]
    return f"{colour}的图形是{kind}。" if language == "zh" else f"The {colour} shape is a {kind}."


def caption_answer(scene: Scene, language: str) -> str:
    """Every shape, left to right: "There is a red circle, a blue square and a green triangle." """
    if language == "zh":
        parts = ["一个" + shape_phrase(s, "zh") for s in scene.left_to_right()]
        listed = parts[0] if len(parts) == 1 else "、".join(parts[:-1]) + "和" + parts[-1]
        return f"图中有{listed}。"
    parts = ["a " + shape_phrase(s, "en") for s in scene.left_to_right()]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"There is {listed}."


def possible_tasks(scene: Scene) -> tuple[str, ...]:
    """The tasks with an unambiguous question: "shape" needs a colour worn by one shape only."""
    if unique_colour_shapes(scene):
        return TASKS
    return tuple(task for task in TASKS if task != "shape")


def unique_colour_shapes(scene: Scene) -> list[Shape]:
    return [s for s in scene.shapes if len(scene.shapes_of_colour(s.colour)) == 1]


def ask(scene: Scene, task: str, language: str, rng: random.Random, *, canonical: bool | None = None) -> QA:
    """A random question of ``task`` about ``scene`` (about shapes present only) and its answer."""
    _check_language(language)
    if task not in possible_tasks(scene):
        raise ValueError(f"task {task!r} cannot be asked about this scene; possible: {possible_tasks(scene)}")
    phrasings = QUESTIONS[task][language]
    template = phrasings.pick(rng, canonical)
    size = [scene.width, scene.height]
    if task == "grounding":
        shape = rng.choice(scene.shapes)
        # kinds are unique, so "the circle" is unambiguous too; asked now and then for variety
        with_colour = template in phrasings.canonical or rng.random() < 0.8
        question = template.format(target=shape_phrase(shape, language, with_colour=with_colour))
        answer = grounding_answer(shape, scene, language, with_colour=with_colour)
        truth = {
            "kind": shape.kind,
            "colour": shape.colour,
            "box": list(shape.normalized_box(scene.width, scene.height)),
            "pixel_box": list(shape.box),
        }
    elif task == "count":
        question, answer = template, count_answer(len(scene.shapes), language)
        truth = {"count": len(scene.shapes)}
    elif task == "colour":
        shape = rng.choice(scene.shapes)
        question = template.format(kind=KIND_NAMES[language][shape.kind])
        answer, truth = colour_answer(shape, language), {"kind": shape.kind, "colour": shape.colour}
    elif task == "shape":
        shape = rng.choice(unique_colour_shapes(scene))
        question = template.format(colour=COLOUR_NAMES[language][shape.colour])
        answer, truth = shape_answer(shape, language), {"colour": shape.colour, "kind": shape.kind}
    else:
        question, answer = template, caption_answer(scene, language)
        truth = {
            "shapes": [
                {"kind": s.kind, "colour": s.colour, "box": list(s.normalized_box(scene.width, scene.height))}
                for s in scene.left_to_right()
            ]
        }
    return QA(task, language, question, answer, {**truth, "size": size})
