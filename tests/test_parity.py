"""The model against the original implementation's recorded outputs on the golden tiny checkpoint.

fp32 logits within 1e-4 (scaled max error), argmax equal where the top two differ by > 1e-3,
greedy tokens identical, chat replies identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("in_golden_dir")


def scaled_error(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert x.shape == ref.shape
    return float(np.abs(x - ref).max() / max(1.0, np.abs(ref).max()))


def test_image_preprocessing_and_features(tiny_model, golden_cases, golden_arrays):
    from qwenvl.images import load_image, preprocess

    for case in golden_cases["vision"]:
        pixels = preprocess([load_image(case["image"])])[0]
        assert scaled_error(pixels[:, ::16, ::16], golden_arrays[case["pixels_sub"]]) < 1e-6
        with torch.no_grad():
            features = tiny_model.transformer.visual.encode([case["image"]])
        assert features.shape == (1, 256, 128)
        assert scaled_error(features[0], golden_arrays[case["features"]]) <= 1e-4, case["image"]


@pytest.mark.parametrize("index", range(5))
def test_logits(tiny_model, golden_cases, golden_arrays, index):
    """Includes prompts past seq_length (dynamic NTK, log-n) and with one and two images."""
    case = golden_cases["logits"][index]
    with torch.no_grad():
        logits = tiny_model(torch.tensor([case["ids"]])).logits[0].float()
    selected = logits[:, golden_cases["logits_vocab_indices"]].numpy()
    assert scaled_error(selected, golden_arrays[case["selected"]]) <= 1e-4
    assert scaled_error(torch.logsumexp(logits, -1).numpy(), golden_arrays[case["logsumexp"]]) <= 1e-4
    clear = golden_arrays[case["top2_gap"]] > 1e-3
    argmax = logits.argmax(-1).numpy()
    assert ((argmax != np.array(case["argmax"])) & clear).sum() == 0


def test_chat_replies(tiny_model, tokenizer, golden_cases):
    for case in golden_cases["chat"]:
        for turn in case["turns"]:
            kwargs = {"system": case["system"]} if "system" in case else {}
            history = [tuple(h) for h in turn["history_in"]]
            response, history = tiny_model.chat(
                tokenizer,
                turn["query"],
                history=history,
                do_sample=False,
                max_new_tokens=case["max_new_tokens"],
                **kwargs,
            )
            assert response == turn["response_all_tokens"], case["name"]
            assert history[-1] == (turn["query"], response)


def test_chat_prompt_and_generated_ids(tiny_model, tokenizer, golden_cases):
    from qwenvl import make_context
    from qwenvl.generation import SamplingParams, generate_tokens

    case = golden_cases["chat"][2]  # two images
    turn = case["turns"][0]
    _, prompt = make_context(tokenizer, turn["query"], system="You are a helpful assistant.")
    assert prompt == turn["prompt_ids"]
    features = tiny_model._features_for_ids(torch.tensor([prompt]))
    params = SamplingParams(max_new_tokens=case["max_new_tokens"])
    assert generate_tokens(tiny_model, [prompt], params, features)[0] == turn["generated_ids"]


def test_generate_raw(tiny_model, golden_cases):
    for case in golden_cases["generate_raw"]:
        out = tiny_model.generate(
            torch.tensor([case["prompt_ids"]]), do_sample=False, max_new_tokens=case["max_new_tokens"]
        )
        assert out.shape == (1, len(case["prompt_ids"]) + case["max_new_tokens"])
        assert out[0, : len(case["prompt_ids"])].tolist() == case["prompt_ids"]
        assert out[0, len(case["prompt_ids"]) :].tolist() == case["generated_ids"], case["name"]


def test_raw_chat_format_for_the_base_model(tiny_model, tokenizer, golden_cases):
    case = next(c for c in golden_cases["generate_raw"] if c["name"] == "caption")
    response, history = tiny_model.chat(
        tokenizer,
        case["prompt"],
        history=None,
        chat_format="raw",
        do_sample=False,
        max_new_tokens=case["max_new_tokens"],
    )
    assert response == tokenizer.decode(case["generated_ids"]).strip()
    assert history == [(case["prompt"], response)]
