"""Training conversations and held-out questions written to disk, and reading them back.

Layout of an output folder::

    out/train.json          [{"id": ..., "conversations": [{"from": "user", "value": ...}, ...]}, ...]
    out/eval.json           [{"id", "image", "language", "task", "question", "answer", "truth"}, ...]
    out/images/train_000000.png, out/images/eval_000000.png, ...

Image paths inside both JSON files are relative to the JSON file's folder (``images/...``), so
the folder can be moved. Loaders must resolve them against that folder, not the working
directory: :func:`load_conversations` and :func:`load_eval_items` do, returning absolute paths.
(The tokenizer keeps at most 256 bytes of an image path, so keep the folder's path short.)

Scene ``i`` of a split depends only on (split, seed, i): the same seed gives the same bytes, and
the held-out split never repeats a training scene's random stream.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from .language import LANGUAGES, TASKS, ask, possible_tasks
from .scene import Scene, random_scene, render

logger = logging.getLogger(__name__)

IMAGE_DIR = "images"
TRAIN_FILE = "train.json"
EVAL_FILE = "eval.json"
DEFAULT_TASK_WEIGHTS: Mapping[str, float] = {
    "grounding": 2.0,
    "count": 1.0,
    "colour": 1.0,
    "shape": 1.0,
    "caption": 1.0,
}
_IMAGE_SPAN = re.compile(r"<img>(.*?)</img>", re.DOTALL)


def user_turn(image: str, question: str) -> str:
    """The first user turn: exactly ``tokenizer.from_list_format([{'image': image}, {'text': question}])``."""
    return f"Picture 1: <img>{image}</img>\n{question}"


def scene_rng(split: str, seed: int, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so it does not depend on PYTHONHASHSEED.
    return random.Random(f"qwenvl-synthetic/{split}/{seed}/{index}")


def _write_scene(out: Path, split: str, index: int, scene: Scene) -> str:
    relative = f"{IMAGE_DIR}/{split}_{index:06d}.png"
    render(scene).save(out / relative, format="PNG", compress_level=1)  # fast to write; a little larger
    return relative


def _pick_tasks(
    rng: random.Random, scene: Scene, count: int, weights: Mapping[str, float], repeats: int = 1
) -> list[str]:
    """``count`` tasks drawn by weight, each at most ``repeats`` times (fewer if the scene allows fewer)."""
    left = {task: repeats for task in possible_tasks(scene) if weights.get(task, 0) > 0}
    picked = []
    while left and len(picked) < count:
        tasks = list(left)
        task = rng.choices(tasks, weights=[weights[t] for t in tasks])[0]
        picked.append(task)
        left[task] -= 1
        if not left[task]:
            del left[task]
    return picked


def _check_options(languages: Sequence[str], tasks: Sequence[str]) -> None:
    if not languages or any(language not in LANGUAGES for language in languages):
        raise ValueError(f"languages must be a non-empty subset of {LANGUAGES}, got {tuple(languages)}")
    if not tasks or any(task not in TASKS for task in tasks):
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tuple(tasks)}")


def generate_dataset(
    out_dir: str | os.PathLike,
    n_scenes: int,
    seed: int = 0,
    languages: Sequence[str] = LANGUAGES,
    questions_per_scene: int = 3,
    *,
    task_weights: Mapping[str, float] | None = None,
    multi_turn: float = 0.15,
    max_turns: int = 3,
    task_repeats: int = 1,
    size: tuple[int, int] | None = None,
) -> Path:
    """Write ``n_scenes`` pictures and ``questions_per_scene`` conversations each; return train.json.

    Each conversation is in one language (drawn per conversation from ``languages``). With
    probability ``multi_turn`` it has 2 to ``max_turns`` turns (each task at most ``task_repeats``
    times, on a shape drawn anew each time); later user turns carry the question only, as in
    Qwen-VL's fine-tuning data. Image paths are relative to ``out_dir``.
    """
    if max_turns < 2:
        raise ValueError(f"max_turns must be at least 2, got {max_turns}")
    if task_repeats < 1:
        raise ValueError(f"task_repeats must be at least 1, got {task_repeats}")
    weights = dict(DEFAULT_TASK_WEIGHTS if task_weights is None else task_weights)
    _check_options(languages, [task for task, weight in weights.items() if weight > 0])
    out = Path(out_dir)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(n_scenes):
        rng = scene_rng("train", seed, index)
        scene = random_scene(rng, size)
        image = _write_scene(out, "train", index, scene)
        for number in range(questions_per_scene):
            language = rng.choice(tuple(languages))
            turns = rng.randint(2, max_turns) if rng.random() < multi_turn else 1
            conversation = []
            for task in _pick_tasks(rng, scene, turns, weights, task_repeats):
                qa = ask(scene, task, language, rng)
                question = user_turn(image, qa.question) if not conversation else qa.question
                conversation += [
                    {"from": "user", "value": question},
                    {"from": "assistant", "value": qa.answer},
                ]
            if conversation:  # empty when the weights allow only tasks this scene cannot take
                records.append({"id": f"train-{seed}-{index:06d}-{number}", "conversations": conversation})
        if (index + 1) % 500 == 0:
            logger.info("synthesized %d/%d training scenes", index + 1, n_scenes)
    path = out / TRAIN_FILE
    _write_json(path, records)
    return path


def generate_eval_set(
    out_dir: str | os.PathLike,
    n_scenes: int,
    seed: int = 0,
    languages: Sequence[str] = LANGUAGES,
    tasks: Sequence[str] = TASKS,
    *,
    canonical: bool | None = None,
    size: tuple[int, int] | None = None,
) -> Path:
    """Held-out questions with their ground truth: one per task per scene; return eval.json.

    The scenes come from a random stream of their own (split "eval"), so they differ from the
    training scenes even for the same seed. ``canonical=True`` asks only the canonical phrasings;
    None mixes them with the others as training does. A "shape" question is skipped on scenes
    where no colour belongs to a single shape.
    """
    _check_options(languages, tasks)
    out = Path(out_dir)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    items = []
    for index in range(n_scenes):
        rng = scene_rng("eval", seed, index)
        scene = random_scene(rng, size)
        image = _write_scene(out, "eval", index, scene)
        for task in tasks:
            if task not in possible_tasks(scene):
                continue
            qa = ask(scene, task, rng.choice(tuple(languages)), rng, canonical=canonical)
            items.append(
                {
                    "id": f"eval-{seed}-{index:06d}-{task}",
                    "image": image,
                    "language": qa.language,
                    "task": qa.task,
                    "question": qa.question,
                    "answer": qa.answer,
                    "truth": qa.truth,
                }
            )
    path = out / EVAL_FILE
    _write_json(path, items)
    return path


def _write_json(path: Path, records: list[dict]) -> None:
    """A JSON list with one record per line: compact, yet easy to read and diff."""
    lines = ",\n".join(json.dumps(record, ensure_ascii=False) for record in records)
    path.write_text(f"[\n{lines}\n]\n" if records else "[]\n", encoding="utf-8")


def _resolve(reference: str, root: Path) -> str:
    if os.path.isabs(reference) or re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", reference):
        return reference  # absolute path or URL: as written
    return str((root / reference).resolve())


def load_conversations(path: str | os.PathLike) -> list[dict]:
    """train.json with every ``<img>`` path made absolute (resolved against the file's folder)."""
    root = Path(path).resolve().parent
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    for record in records:
        for turn in record["conversations"]:
            turn["value"] = _IMAGE_SPAN.sub(
                lambda m: f"<img>{_resolve(m.group(1), root)}</img>", turn["value"]
            )
    return records


def load_eval_items(path: str | os.PathLike) -> list[dict]:
    """eval.json with every ``image`` made absolute (resolved against the file's folder)."""
    root = Path(path).resolve().parent
    items = json.loads(Path(path).read_text(encoding="utf-8"))
    for item in items:
        item["image"] = _resolve(item["image"], root)
    return items


# -- command line (`qwenvl synthesize`, `python -m qwenvl.synthetic`) ----------------------------------


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)[xX](\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 448x448, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _languages(text: str) -> tuple[str, ...]:
    languages = tuple(part.strip() for part in text.split(",") if part.strip())
    if not languages or any(language not in LANGUAGES for language in languages):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(LANGUAGES)}, got {text!r}"
        )
    return languages


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (train.json, eval.json, images/)")
    parser.add_argument("--scenes", type=int, default=1000, help="training pictures (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--questions-per-scene", type=int, default=3, help="conversations per picture")
    parser.add_argument("--languages", type=_languages, default=LANGUAGES, help="comma-separated: zh,en")
    parser.add_argument("--multi-turn", type=float, default=0.15, help="share of multi-turn conversations")
    parser.add_argument(
        "--max-turns", type=int, default=3, help="most turns of a multi-turn conversation (default 3)"
    )
    parser.add_argument(
        "--task-repeats", type=int, default=1, help="times a task may recur in one conversation (default 1)"
    )
    parser.add_argument("--eval-scenes", type=int, default=0, help="also write a held-out eval.json")
    parser.add_argument("--size", type=_size, default=None, help="fixed WIDTHxHEIGHT (default: varied)")


def run_from_args(args: argparse.Namespace) -> int:
    train = generate_dataset(
        args.out,
        args.scenes,
        args.seed,
        args.languages,
        args.questions_per_scene,
        multi_turn=args.multi_turn,
        max_turns=args.max_turns,
        task_repeats=args.task_repeats,
        size=args.size,
    )
    print(f"wrote {train} ({args.scenes} pictures)")
    if args.eval_scenes:
        held_out = generate_eval_set(args.out, args.eval_scenes, args.seed, args.languages, size=args.size)
        print(f"wrote {held_out} ({args.eval_scenes} pictures)")
    return 0
