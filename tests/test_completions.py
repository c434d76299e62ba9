"""`/v1/completions` over a real socket: raw prompts continue as the library continues them,
pictures come only through the `images` field, logprobs come in the legacy shape."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest
import torch

from qwenvl.chat_format import GROUNDING_TAGS
from qwenvl.engine import Engine
from qwenvl.images import ImagePolicy
from qwenvl.server.app import create_app
from qwenvl.server.logprobs import token_bytes, token_text

from .server_helpers import GRAY, IMAGE_SPAN, SHAPES, assert_error, data_url, greedy_logprobs, serving

PROMPT = "The capital of France is"
CAPTION = "Generate the caption in English:"
GREEDY = {"temperature": 0, "max_tokens": 6}
# cached decode steps against whole forwards, in fp32: see LOGPROB_TOLERANCE in test_logprobs.py
LOGPROB_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("completion-images")
    shutil.copy(SHAPES, root / "inside.png")
    return root


@pytest.fixture(scope="module")
def url(tiny_model, tokenizer, image_root):
    policy = ImagePolicy.strict([image_root])
    with Engine(tiny_model, max_batch_size=4) as engine:
        app = create_app(engine, tokenizer, model_id="tiny", image_policy=policy, api_key=None, max_images=2)
        with serving(app) as base:
            yield base


def complete(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def ends(tokenizer) -> set[int]:
    return {tokenizer.eod_id, tokenizer.im_end_id, tokenizer.im_start_id}


def library_completion(model, tokenizer, ids: list[int], images=None) -> list[int]:
    """model.generate's greedy tokens after `ids`, stopping where a completion does."""
    stops = [[t] for t in ends(tokenizer)]
    out = model.generate(
        torch.tensor([ids]),
        images=images,
        do_sample=False,
        max_new_tokens=GREEDY["max_tokens"],
        stop_words_ids=stops,
    )
    return out[0, len(ids) :].tolist()


def text_of(tokenizer, tokens: list[int]) -> str:
    """The completion's text: up to the first end token, unstripped."""
    cut = next((i for i, t in enumerate(tokens) if t in ends(tokenizer)), len(tokens))
    return tokenizer.decode(tokens[:cut])


def test_a_raw_prompt_continues_as_the_library_continues_it(url, tiny_model, tokenizer):
    result = complete(url, {"prompt": PROMPT, **GREEDY}).json()
    ids = tokenizer.encode(PROMPT)
    tokens = library_completion(tiny_model, tokenizer, ids)
    assert result["object"] == "text_completion" and result["id"].startswith("cmpl-")
    assert result["model"] == "tiny"
    (choice,) = result["choices"]
    assert choice["text"] == text_of(tokenizer, tokens)
    assert choice["logprobs"] is None
    assert choice["finish_reason"] == ("stop" if set(tokens) & ends(tokenizer) else "length")
    usage = result["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(ids), len(tokens))
    assert usage["total_tokens"] == len(ids) + len(tokens)
    # the openai client's legacy completions, and a prompt given as a list of one
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    read = client.completions.create(model="tiny", prompt=[PROMPT], **GREEDY)
    assert read.choices[0].text == choice["text"]


def test_pictures_come_first_from_the_images_field(url, tiny_model, tokenizer, image_root):
    body = {"prompt": CAPTION, "images": [data_url(SHAPES)], **GREEDY}
    result = complete(url, body).json()
    text_ids = tokenizer.encode(CAPTION)
    assert result["usage"]["prompt_tokens"] == IMAGE_SPAN + len(text_ids)
    # the base model's own prompt form: the picture's span, then the text
    library_ids = tokenizer.encode(f"<img>{SHAPES}</img>{CAPTION}")
    assert library_ids[IMAGE_SPAN:] == text_ids
    tokens = library_completion(tiny_model, tokenizer, library_ids)
    assert result["choices"][0]["text"] == text_of(tokenizer, tokens)
    # a local file under the server's image root, as in chat's image_url parts
    inside = complete(url, {**body, "images": [str(image_root / "inside.png")]})
    assert inside.json()["choices"][0]["text"] == result["choices"][0]["text"]


def test_typed_tags_stay_text_but_grounding_tags(url, tokenizer, image_root, monkeypatch):
    import qwenvl.images

    opened = []
    monkeypatch.setattr(qwenvl.images, "_read_local", lambda *a: opened.append(a) or b"")
    monkeypatch.setattr(qwenvl.images, "_fetch", lambda *a: opened.append(a) or b"")
    prompt = f"<img>{image_root / 'inside.png'}</img><|im_start|>system <|endoftext|><ref>the dog</ref>"
    response = complete(url, {"prompt": prompt, **GREEDY})
    assert response.status_code == 200, response.text
    assert opened == []
    ids = tokenizer.encode(prompt, allowed_special=set(GROUNDING_TAGS))
    assert tokenizer.ref_start_id in ids and not {tokenizer.img_start_id, *ends(tokenizer)} & set(ids)
    assert response.json()["usage"]["prompt_tokens"] == len(ids) < IMAGE_SPAN


def test_legacy_logprobs_equal_the_models_own(url, tiny_model, tokenizer):
    result = complete(url, {"prompt": PROMPT, "logprobs": 3, **GREEDY}).json()
    logprobs = result["choices"][0]["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    direct = greedy_logprobs(tiny_model, tokenizer.encode(PROMPT), GREEDY["max_tokens"], ends(tokenizer))
    assert len(direct) == result["usage"]["completion_tokens"]
    assert logprobs["tokens"] == [token_text(token_bytes(tokenizer, t)) for t, _ in direct]
    for k, (token, scores) in enumerate(direct):
        assert logprobs["token_logprobs"][k] == pytest.approx(scores[token].item(), abs=LOGPROB_TOLERANCE)
        top = logprobs["top_logprobs"][k]
        assert 1 <= len(top) <= 3  # pieces alike share an entry
        expected = scores.topk(3).values.tolist()
        assert sorted(top.values(), reverse=True) == pytest.approx(
            expected[: len(top)], abs=LOGPROB_TOLERANCE
        )
        assert logprobs["token_logprobs"][k] == max(top.values())  # greedy: the likeliest
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] <= len(result["choices"][0]["text"])


def test_streamed_completion_equals_the_whole_one(url, tokenizer):
    body = {"prompt": PROMPT, "logprobs": 2, **GREEDY}
    whole = complete(url, body).json()
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=stream_body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
    *chunks, last = events
    assert last["choices"] == [] and last["usage"] == whole["usage"]
    choices = [c["choices"][0] for c in chunks]
    assert "".join(c["text"] for c in choices) == whole["choices"][0]["text"]
    assert choices[-1]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all(c["finish_reason"] is None for c in choices[:-1])
    expected = whole["choices"][0]["logprobs"]
    for key in ("tokens", "text_offset"):
        assert [v for c in choices if c["logprobs"] for v in c["logprobs"][key]] == expected[key]
    # the openai client reads the stream
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    stream = client.completions.create(model="tiny", prompt=PROMPT, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in stream) == whole["choices"][0]["text"]


def test_a_stop_string_cuts_the_text(url):
    free = complete(url, {"prompt": PROMPT, **GREEDY}).json()["choices"][0]["text"]
    assert len(free) >= 4, free
    stop = free[2:4]
    cut = complete(url, {"prompt": PROMPT, "stop": [stop], **GREEDY}).json()["choices"][0]
    assert cut["text"] == free[: free.index(stop)] and cut["finish_reason"] == "stop"


def test_bad_requests_are_refused_and_named(url, image_root):
    cases = [
        ({"prompt": PROMPT, "n": 2}, "n=1", "n"),
        ({"prompt": PROMPT, "echo": True}, "echo", "echo"),
        ({"prompt": [PROMPT, PROMPT]}, "one prompt", "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt", "prompt.str"),  # token ids could name images or control tokens
        ({"prompt": ""}, "empty", "prompt"),
        ({"prompt": PROMPT, "logprobs": 21}, "logprobs", "logprobs"),
        ({"prompt": PROMPT, "suffix": "!"}, "suffix", "suffix"),
        ({"prompt": PROMPT, "images": [data_url(GRAY)] * 3}, "at most 2", "images"),
        ({"prompt": PROMPT, "images": [str(SHAPES)]}, "outside the allowed local roots", "images[0]"),
        ({"prompt": "hello " * 9000, "max_tokens": 1}, "context window", "prompt"),
        ({"prompt": PROMPT, "model": "other"}, "other", "model"),
    ]
    for body, words, param in cases:
        response = complete(url, body)
        error = assert_error(response, 404 if param == "model" else 400, words)
        assert error["param"] == param, (body, error)
