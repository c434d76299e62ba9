"""Score a model on held-out questions about synthetic scenes (see :mod:`qwenvl.synthetic`).

Each question is asked alone (no history, greedy) as
``model.chat(tokenizer, tokenizer.from_list_format([{'image': p}, {'text': q}]), ...)``.
Scores per item are in [0, 1]:

- grounding: 1 when the first ``<box>`` of the reply has IoU >= 0.5 with the true box;
- count: 1 when the reply holds the right number in digits and no other number;
- colour: 1 when the reply names the right colour and no other colour (Chinese or English);
- shape: 1 when the reply names the right kind and no other kind;
- caption: the fraction of the scene's shapes named by colour and kind ("red circle", "红色圆形").

The scoring functions are pure functions over strings and truths; only :func:`evaluate` needs
a model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

from .frontend import MODEL_ENV
from .grounding import parse_boxes
from .progress import Progress
from .synthetic.dataset import generate_eval_set, load_eval_items
from .synthetic.language import COLOUR_NAMES, KIND_NAMES, LANGUAGES, TASKS

IOU_THRESHOLD = 0.5
METRICS = {
    "grounding": "IoU>=0.5 accuracy",
    "count": "accuracy",
    "colour": "accuracy",
    "shape": "accuracy",
    "caption": "shape recall",
}

# Chinese colour words match on the first character ("红" in 红色, 红的) so short replies count too.
_COLOUR_PATTERNS = {
    colour: re.compile(rf"\b{COLOUR_NAMES['en'][colour]}\b|{COLOUR_NAMES['zh'][colour][0]}", re.IGNORECASE)
    for colour in COLOUR_NAMES["en"]
}
_KIND_PATTERNS = {
    kind: re.compile(rf"\b{KIND_NAMES['en'][kind]}s?\b|{KIND_NAMES['zh'][kind]}", re.IGNORECASE)
    for kind in KIND_NAMES["en"]
}
_PAIR = {
    "en": r"\b{colour}\s+{kind}s?\b",
    "zh": r"{colour}色?的?{kind}",
}


# -- scoring ---------------------------------------------------------------------------------------


def colours_mentioned(text: str) -> set[str]:
    return {colour for colour, pattern in _COLOUR_PATTERNS.items() if pattern.search(text)}


def kinds_mentioned(text: str) -> set[str]:
    return {kind for kind, pattern in _KIND_PATTERNS.items() if pattern.search(text)}


def numbers_mentioned(text: str) -> set[int]:
    return {int(digits) for digits in re.findall(r"\d+", text)}


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes ``(x1, y1, x2, y2)``; corners may come in any order."""
    ax1, ax2 = sorted((a[0], a[2]))
    ay1, ay2 = sorted((a[1], a[3]))
    bx1, bx2 = sorted((b[0], b[2]))
    by1, by2 = sorted((b[1], b[3]))
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def score_grounding(answer: str, box: Sequence[int], threshold: float = IOU_THRESHOLD) -> float:
    """1.0 when the reply's first box overlaps ``box`` (0..1000 coordinates) with IoU >= threshold.

    IoU is the same in 0..1000 and in pixel coordinates: both axes are only scaled.
    """
    boxes = [b for b in parse_boxes(answer) if b.kind == "box"]
    return float(bool(boxes) and box_iou(boxes[0].coords, box) >= threshold)


def score_count(answer: str, count: int) -> float:
    return float(numbers_mentioned(answer) == {count})


def score_colour(answer: str, colour: str) -> float:
    return float(colours_mentioned(answer) == {colour})


def score_shape(answer: str, kind: str) -> float:
    return float(kinds_mentioned(answer) == {kind})


def caption_recall(answer: str, shapes: Iterable[Mapping[str, str]]) -> float:
    """The fraction of ``shapes`` ({"colour", "kind"}) named as colour + kind in either language."""
    shapes = list(shapes)
    if not shapes:
        return 1.0
    named = 0
    for shape in shapes:
        patterns = (
            _PAIR[language].format(
                colour=COLOUR_NAMES[language][shape["colour"]][: 1 if language == "zh" else None],
                kind=KIND_NAMES[language][shape["kind"]],
            )
            for language in LANGUAGES
        )
        named += any(re.search(pattern, answer, re.IGNORECASE) for pattern in patterns)
    return named / len(shapes)


def score_answer(task: str, answer: str, truth: Mapping) -> float:
    """The score in [0, 1] of ``answer`` to a question of ``task`` whose facts are ``truth``."""
    if task == "grounding":
        return score_grounding(answer, truth["box"])
    if task == "count":
        return score_count(answer, truth["count"])
    if task == "colour":
        return score_colour(answer, truth["colour"])
    if task == "shape":
        return score_shape(answer, truth["kind"])
    if task == "caption":
        return caption_recall(answer, truth["shapes"])
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


# -- report ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemResult:
    id: str
    task: str
    language: str
    question: str
    expected: str
    response: str
    score: float


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class Report:
    results: list[ItemResult]

    def _tasks(self) -> list[str]:
        present = {r.task for r in self.results}
        return [task for task in TASKS if task in present]

    def _languages(self) -> list[str]:
        present = {r.language for r in self.results}
        return [language for language in LANGUAGES if language in present]

    def scores(self) -> dict[str, dict[str, float | int | None]]:
        """task -> {language: mean score, ..., "all": mean score, "n": items}."""
        table = {}
        for task in self._tasks():
            rows = [r for r in self.results if r.task == task]
            cells = {lang: _mean([r.score for r in rows if r.language == lang]) for lang in self._languages()}
            table[task] = {**cells, "all": _mean([r.score for r in rows]), "n": len(rows)}
        return table

    def overall(self) -> dict[str, float | None]:
        """Per column, the mean over tasks (each task weighs the same, whatever its item count)."""
        scores = self.scores()
        columns = [*self._languages(), "all"]
        return {c: _mean([s[c] for s in scores.values() if s[c] is not None]) for c in columns}

    def to_dict(self, items: bool = True) -> dict:
        report = {"metrics": {t: METRICS[t] for t in self._tasks()}, "tasks": self.scores()}
        report["overall"] = self.overall()
        if items:
            report["items"] = [asdict(r) for r in self.results]
        return report

    def to_markdown(self) -> str:
        languages = self._languages()
        header = ["task", "metric", *languages, "all", "n"]
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
        ]
        for task, cells in self.scores().items():
            values = [_percent(cells[c]) for c in [*languages, "all"]]
            lines.append("| " + " | ".join([task, METRICS[task], *values, str(cells["n"])]) + " |")
        overall = self.overall()
        values = [_percent(overall[c]) for c in [*languages, "all"]]
        lines.append("| " + " | ".join(["overall", "mean of tasks", *values, str(len(self.results))]) + " |")
        return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# -- running a model -------------------------------------------------------------------------------


def evaluate(
    model,
    tokenizer,
    eval_items: Iterable[Mapping],
    *,
    max_new_tokens: int = 48,
    progress: Callable[[int, ItemResult], None] | None = None,
) -> Report:
    """Ask every held-out item (``image`` must be loadable from here: see ``load_eval_items``)."""
    results = []
    for number, item in enumerate(eval_items, 1):
        missing = {"id", "image", "language", "task", "question", "truth"} - set(item)
        if missing:
            raise ValueError(f"eval item {item.get('id', number)!r} lacks {sorted(missing)}")
        query = tokenizer.from_list_format([{"image": item["image"]}, {"text": item["question"]}])
        response, _ = model.chat(
            tokenizer, query, history=None, do_sample=False, max_new_tokens=max_new_tokens
        )
        result = ItemResult(
            id=item["id"],
            task=item["task"],
            language=item["language"],
            question=item["question"],
            expected=item.get("answer", ""),
            response=response,
            score=score_answer(item["task"], response, item["truth"]),
        )
        results.append(result)
        if progress is not None:
            progress(number, result)
    return Report(results)


# -- command line (`qwenvl eval`, `python -m qwenvl.evaluate`) -------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=os.environ.get(MODEL_ENV),
        help=f"model folder or hub id (default: ${MODEL_ENV}, else the bundled demo model)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="an eval.json written by `qwenvl synthesize --eval-scenes N`")
    source.add_argument("--scenes", type=int, default=20, help="held-out pictures to generate (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated held-out set")
    parser.add_argument("--canonical", action="store_true", help="ask only the canonical phrasings")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--json", metavar="PATH", help="also write the report (with every reply) as JSON")


def run_from_args(args: argparse.Namespace) -> int:
    from . import QwenVLForCausalLM, QwenVLTokenizer
    from .demo import default_model

    model_name = args.model or default_model()
    tokenizer = QwenVLTokenizer.from_pretrained(model_name)
    model = QwenVLForCausalLM.from_pretrained(model_name)
    with tempfile.TemporaryDirectory(prefix="qwenvl-eval-") as scratch:
        if args.data:
            items = load_eval_items(args.data)
        else:
            canonical = True if args.canonical else None
            items = load_eval_items(generate_eval_set(scratch, args.scenes, args.seed, canonical=canonical))
        if args.canonical and args.data:
            print(
                "note: --canonical only applies to a generated set; --data is asked as written",
                file=sys.stderr,
            )

        scores = []
        # a terminal shows a bar; a log gets about ten lines, each with the time left
        every = max(1, math.ceil(len(items) / 10))
        with Progress(len(items), "eval", every=every, unit="item", stream=sys.stderr) as shown:

            def show(number: int, result: ItemResult) -> None:
                scores.append(result.score)
                shown.update(1, f"mean score {sum(scores) / len(scores):.3f}")

            report = evaluate(model, tokenizer, items, max_new_tokens=args.max_new_tokens, progress=show)
    print(report.to_markdown())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(report.to_dict(), file, ensure_ascii=False, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwenvl.evaluate", description="Score a model on synthetic scenes."
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
