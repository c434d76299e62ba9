"""Scoring of replies to synthetic questions, and the evaluation loop with stand-in models."""

from __future__ import annotations

import json
import math

import pytest

import qwenvl
from qwenvl.evaluate import (
    ItemResult,
    Report,
    box_iou,
    caption_recall,
    evaluate,
    main,
    score_answer,
    score_colour,
    score_count,
    score_grounding,
    score_shape,
)
from qwenvl.synthetic import generate_eval_set, load_eval_items

TRUTH_BOX = (100, 100, 300, 300)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("The circle is red.", 1.0),
        ("圆形是红色的。", 1.0),
        ("It is RED", 1.0),
        ("The circle is blue.", 0.0),
        ("圆形是蓝色的。", 0.0),
        ("The circle is red or blue.", 0.0),
        ("红色和黄色", 0.0),
        ("The circle is reddish.", 0.0),
        ("", 0.0),
    ],
)
def test_score_colour(answer, expected):
    assert score_colour(answer, "red") == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("There are 3 shapes.", 1.0),
        ("图中有3个图形。", 1.0),
        ("3", 1.0),
        ("There are 2 shapes.", 0.0),
        ("There are 3 or 4 shapes.", 0.0),
        ("There are 13 shapes.", 0.0),
        ("There are three shapes.", 0.0),
    ],
)
def test_score_count(answer, expected):
    assert score_count(answer, 3) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("The red shape is a circle.", 1.0),
        ("红色的图形是圆形。", 1.0),
        ("Circles!", 1.0),
        ("The red shape is a square.", 0.0),
        ("红色的图形是三角形。", 0.0),
        ("A circle or a triangle.", 0.0),
    ],
)
def test_score_shape(answer, expected):
    assert score_shape(answer, "circle") == expected


def test_iou():
    assert box_iou(TRUTH_BOX, TRUTH_BOX) == 1.0
    assert box_iou(TRUTH_BOX, (300, 300, 400, 400)) == 0.0  # touching corners only
    assert box_iou(TRUTH_BOX, (300, 300, 100, 100)) == 1.0  # corners in either order
    assert box_iou(TRUTH_BOX, (100, 100, 300, 500)) == 0.5
    assert box_iou((5, 5, 5, 9), (5, 5, 5, 9)) == 0.0  # empty boxes


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("<ref>the red circle</ref><box>(100,100),(300,300)</box>", 1.0),
        ("<box>(100,100),(300,300)</box>", 1.0),  # no ref needed
        ("<ref>the red circle</ref><box>(100,100),(300,499)</box>", 1.0),  # IoU 0.5013
        ("<ref>the red circle</ref><box>(100,100),(300,500)</box>", 1.0),  # IoU exactly 0.5
        ("<ref>the red circle</ref><box>(100,100),(300,501)</box>", 0.0),  # IoU 0.4988
        (
            "<ref>a</ref><box>(600,600),(900,900)</box><ref>b</ref><box>(100,100),(300,300)</box>",
            0.0,
        ),  # first
        ("<ref>the red circle</ref>", 0.0),
        ("The red circle is on the left.", 0.0),
        ("<box>(100,100),(300)</box>", 0.0),  # malformed
        ("<quad>(100,100),(300,100),(300,300),(100,300)</quad>", 0.0),
    ],
)
def test_score_grounding(answer, expected):
    assert score_grounding(answer, TRUTH_BOX) == expected


def test_caption_recall():
    shapes = [
        {"colour": "red", "kind": "circle"},
        {"colour": "blue", "kind": "square"},
        {"colour": "green", "kind": "triangle"},
    ]
    assert caption_recall("There is a red circle, a blue square and a green triangle.", shapes) == 1.0
    assert caption_recall("图中有一个红色圆形、一个蓝色正方形和一个绿色三角形。", shapes) == 1.0
    assert caption_recall("There is a red circle and a blue square.", shapes) == pytest.approx(2 / 3)
    assert caption_recall("图中有一个红色的圆形。", shapes) == pytest.approx(1 / 3)
    assert caption_recall("There is a blue circle and a red square.", shapes) == 0.0  # swapped colours
    assert caption_recall("Red, blue and green shapes.", shapes) == 0.0
    assert caption_recall("anything", []) == 1.0


def test_score_answer_dispatches_and_names_an_unknown_task():
    assert score_answer("count", "There are 2 shapes.", {"count": 2}) == 1.0
    assert score_answer("colour", "The square is green.", {"kind": "square", "colour": "green"}) == 1.0
    assert score_answer("shape", "The green shape is a square.", {"kind": "square", "colour": "green"}) == 1.0
    assert score_answer("grounding", "<box>(0,0),(10,10)</box>", {"box": [0, 0, 10, 10]}) == 1.0
    caption = {"shapes": [{"colour": "green", "kind": "square"}]}
    assert score_answer("caption", "There is a green square.", caption) == 1.0
    with pytest.raises(ValueError, match="weather"):
        score_answer("weather", "sunny", {})


# -- the evaluation loop ---------------------------------------------------------------------------


class StandIn:
    """Answers from a table keyed by the exact query; anything else gets ``default``."""

    def __init__(self, answers: dict[str, str], default: str = "I cannot tell.") -> None:
        self.answers = answers
        self.default = default
        self.calls = []

    def chat(self, tokenizer, query, history=None, **kwargs):
        self.calls.append((query, history, kwargs))
        response = self.answers.get(query, self.default)
        return response, [*(history or []), (query, response)]


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    return generate_eval_set(tmp_path_factory.mktemp("held-out"), 2, seed=5)


@pytest.fixture(scope="module")
def eval_items(eval_file) -> list[dict]:
    items = load_eval_items(eval_file)
    picked = {}
    for item in items:  # four different tasks, so the report has four rows
        picked.setdefault(item["task"], item)
    return list(picked.values())[:4]


def test_evaluate_with_the_true_answers_scores_everything(eval_items, tokenizer):
    answers = {
        tokenizer.from_list_format([{"image": item["image"]}, {"text": item["question"]}]): item["answer"]
        for item in eval_items
    }
    model = StandIn(answers)
    report = evaluate(model, tokenizer, eval_items, max_new_tokens=40)
    assert len(model.calls) == 4
    for _, history, kwargs in model.calls:
        assert history is None and kwargs == {"do_sample": False, "max_new_tokens": 40}
    assert [r.score for r in report.results] == [1.0] * 4
    assert report.overall()["all"] == 1.0
    data = report.to_dict()
    json.dumps(data)  # serializable
    assert all(cells["all"] == 1.0 for cells in data["tasks"].values())
    assert [item["response"] for item in data["items"]] == [item["answer"] for item in eval_items]


def test_evaluate_with_junk_scores_nothing(eval_items, tokenizer):
    progress = []
    report = evaluate(StandIn({}), tokenizer, eval_items, progress=lambda n, r: progress.append(n))
    assert progress == [1, 2, 3, 4]
    assert [r.score for r in report.results] == [0.0] * 4
    assert report.overall()["all"] == 0.0


def test_evaluate_names_an_incomplete_item(tokenizer):
    with pytest.raises(ValueError, match="broken.*truth"):
        evaluate(
            StandIn({}), tokenizer, [{"id": "broken", "image": "x.png", "language": "en", "task": "count"}]
        )


def test_report_table():
    def result(task, language, score):
        return ItemResult("id", task, language, "q", "a", "r", score)

    report = Report(
        [
            result("count", "en", 1.0),
            result("grounding", "zh", 1.0),
            result("grounding", "en", 0.0),
            result("grounding", "en", 1.0),
            result("caption", "zh", 0.5),
        ]
    )
    assert report.to_markdown() == "\n".join(
        [
            "| task | metric | zh | en | all | n |",
            "|---|---|---:|---:|---:|---:|",
            "| grounding | IoU>=0.5 accuracy | 100.0% | 50.0% | 66.7% | 3 |",
            "| count | accuracy | - | 100.0% | 100.0% | 1 |",
            "| caption | shape recall | 50.0% | - | 50.0% | 1 |",
            "| overall | mean of tasks | 75.0% | 75.0% | 72.2% | 5 |",
        ]
    )
    data = report.to_dict(items=False)
    assert data["tasks"]["count"] == {"zh": None, "en": 1.0, "all": 1.0, "n": 1}
    assert "items" not in data and data["metrics"]["caption"] == "shape recall"


def test_the_command_shows_progress_lines_with_the_time_left(eval_file, tokenizer, monkeypatch, capsys):
    class StandInLoader:
        @staticmethod
        def from_pretrained(name, **options):
            return StandIn({})

    monkeypatch.setattr(qwenvl, "QwenVLForCausalLM", StandInLoader)
    monkeypatch.setattr(qwenvl.QwenVLTokenizer, "from_pretrained", staticmethod(lambda *a, **k: tokenizer))
    assert main(["--model", "stand-in", "--data", str(eval_file)]) == 0
    out, err = capsys.readouterr()
    total = len(load_eval_items(eval_file))
    every = max(1, math.ceil(total / 10))  # captured output is no terminal: about ten lines
    shown = [int(line.split()[1].split("/")[0]) for line in err.splitlines() if line.startswith("eval ")]
    assert shown == [n for n in range(1, total + 1) if n % every == 0 or n == total]
    lines = [line for line in err.splitlines() if line.startswith("eval ")]
    assert all("mean score 0.000 | " in line for line in lines)
    assert all(" left" in line for line in lines[:-1]) and lines[-1].endswith(" elapsed")
    assert out.startswith("| task | metric |")
