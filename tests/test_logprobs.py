"""Logprobs: computed where the decode engine chooses each token, served in OpenAI's chat shape."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from qwenvl import make_context
from qwenvl.decode import SamplingParams, Sequence, TokenLogprobs, choose_next
from qwenvl.engine import Engine
from qwenvl.images import ImagePolicy
from qwenvl.server.app import create_app
from qwenvl.server.logprobs import LegacyLogprobs, chat_logprobs, token_bytes

from .server_helpers import assert_error, greedy_logprobs, post, serving

# The server's logits come from cached decode steps, the direct ones from whole forwards, both in
# fp32: they agree within 1e-4 (atol and rtol, tests/test_generation.py). A log-softmax value moves
# by at most twice the largest change of a logit (the logit's own, and the log-sum-exp's), and
# these logits are a few units: 1e-3 leaves a margin of several times.
LOGPROB_TOLERANCE = 1e-3
QUESTION = "What is the capital of France?"
GREEDY = {"temperature": 0, "max_tokens": 6}


def row(params: SamplingParams) -> Sequence:
    return Sequence.start([1, 2, 3], params, 10, vocab_size=50, device=torch.device("cpu"))


def test_only_rows_that_ask_get_logprobs_of_the_models_own_distribution():
    torch.manual_seed(3)
    logits = torch.randn(3, 50) * 3
    sampled = SamplingParams(do_sample=True, temperature=0.5, top_k=5, seed=1, logprobs=3)
    rows = [row(SamplingParams(logprobs=2)), row(SamplingParams()), row(sampled)]
    choice = choose_next(rows, logits)
    tokens, found = choice.read(), choice.logprobs()
    assert found[1] is None
    # the logits as the model gave them: neither the temperature nor top-k changes them; both are
    # fp32 log-softmaxes of the same row, equal but for the rounding of values of a few units
    expected = logits.log_softmax(-1)
    for i, width in ((0, 2), (2, 3)):
        entry = found[i]
        assert entry.token == tokens[i]
        assert entry.logprob == pytest.approx(expected[i, tokens[i]].item(), abs=1e-5)
        top = expected[i].topk(width)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert found[0].logprob == found[0].top[0][1]  # greedy: the likeliest token, the same value
    assert choose_next([row(SamplingParams())], logits[:1]).logprobs() == [None]


def test_token_pieces_and_text_offsets_across_a_split_character(tokenizer):
    """The two bytes of "é" are a token each here: the chat shape gives their bytes, the legacy
    shape's offsets count characters, and the second byte's token starts where the character does."""
    pieces = [b"Hi", b"\xc3", b"\xa9", b"!"]
    ids = [tokenizer.mergeable_ranks[p] for p in pieces]
    entries = [TokenLogprobs(t, -1.0 - k, ((t, -0.5),)) for k, t in enumerate(ids)]
    content = chat_logprobs(tokenizer, entries)["content"]
    assert [c["token"] for c in content] == ["Hi", "\\xc3", "\\xa9", "!"]
    assert [bytes(c["bytes"]) for c in content] == pieces
    assert content[1]["top_logprobs"] == [{"token": "\\xc3", "logprob": -0.5, "bytes": [0xC3]}]
    legacy = LegacyLogprobs(tokenizer)
    first, rest = legacy.shape(entries[:2]), legacy.shape(entries[2:])  # as a stream's chunks
    assert first["text_offset"] + rest["text_offset"] == [0, 2, 2, 3]  # in "Hié!"
    assert first["token_logprobs"] + rest["token_logprobs"] == [-1.0, -2.0, -3.0, -4.0]
    assert rest["top_logprobs"] == [{"\\xa9": -0.5}, {"!": -0.5}]
    # an id of the model's padded vocabulary has no text
    assert token_bytes(tokenizer, tokenizer.vocab_size + 3) == b""


@pytest.fixture(scope="module")
def url(tiny_model, tokenizer):
    with Engine(tiny_model, max_batch_size=4) as engine:
        app = create_app(engine, tokenizer, model_id="tiny", image_policy=ImagePolicy.strict(), api_key=None)
        with serving(app) as base:
            yield base


def test_chat_logprobs_equal_the_models_own(url, tiny_model, tokenizer):
    body = {"messages": [{"role": "user", "content": QUESTION}], "logprobs": True, "top_logprobs": 5}
    result = post(url, {**body, **GREEDY}).json()
    content = result["choices"][0]["logprobs"]["content"]
    assert len(content) == result["usage"]["completion_tokens"]  # the end token's too
    prompt = make_context(tokenizer, QUESTION, [], "You are a helpful assistant.")[1]
    assert result["usage"]["prompt_tokens"] == len(prompt)
    ends = {tokenizer.eod_id, tokenizer.im_end_id, tokenizer.im_start_id}
    direct = greedy_logprobs(tiny_model, prompt, GREEDY["max_tokens"], ends)
    assert len(direct) == len(content)
    for entry, (token, scores) in zip(content, direct, strict=True):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert bytes(entry["bytes"]) == token_bytes(tokenizer, token)
        assert entry["logprob"] == pytest.approx(scores[token].item(), abs=LOGPROB_TOLERANCE)
        top = scores.topk(5)
        assert [bytes(t["bytes"]) for t in entry["top_logprobs"]] == [
            token_bytes(tokenizer, t) for t in top.indices.tolist()
        ]
        values = [t["logprob"] for t in entry["top_logprobs"]]
        assert values == pytest.approx(top.values.tolist(), abs=LOGPROB_TOLERANCE)
        # greedy: the chosen token is the likeliest, computed from the same logits
        assert entry["logprob"] == max(values) == values[0]
    text = b"".join(bytes(e["bytes"]) for e, (t, _) in zip(content, direct, strict=True) if t not in ends)
    assert text.decode("utf-8", errors="replace").strip() == result["choices"][0]["message"]["content"]


def test_streamed_logprobs_equal_the_whole_replys(url, tokenizer):
    body = {"messages": [{"role": "user", "content": QUESTION}], "logprobs": True, "top_logprobs": 2}
    whole = post(url, {**body, **GREEDY}).json()["choices"][0]["logprobs"]["content"]
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={**body, **GREEDY, "stream": True}, timeout=60
    ) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line and line != "data: [DONE]"]
    streamed = [e for event in events if (lp := event["choices"][0]["logprobs"]) for e in lp["content"]]
    assert events[0]["choices"][0]["logprobs"] is None  # the role's chunk holds no token
    assert [e["token"] for e in streamed] == [e["token"] for e in whole]
    # the second request may reuse the first's cached prompt: its logits then come another way
    for got, expected in zip(streamed, whole, strict=True):
        assert got["logprob"] == pytest.approx(expected["logprob"], abs=LOGPROB_TOLERANCE)
    # the openai client reads both shapes
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = body["messages"]
    read = client.chat.completions.create(
        model="tiny", messages=messages, logprobs=True, top_logprobs=2, **GREEDY
    )
    assert [e.token for e in read.choices[0].logprobs.content] == [e["token"] for e in whole]
    stream = client.chat.completions.create(
        model="tiny", messages=messages, logprobs=True, stream=True, **GREEDY
    )
    tokens = [
        e.token for chunk in stream if chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content
    ]
    assert tokens == [e["token"] for e in whole]


def test_logprobs_only_when_asked_and_within_bounds(url):
    messages = [{"role": "user", "content": "hi"}]
    assert post(url, {"messages": messages, **GREEDY}).json()["choices"][0]["logprobs"] is None
    bare = post(url, {"messages": messages, "logprobs": True, **GREEDY}).json()["choices"][0]["logprobs"]
    assert bare["content"] and all(e["top_logprobs"] == [] for e in bare["content"])
    assert_error(post(url, {"messages": messages, "top_logprobs": 2}), 400, "top_logprobs needs logprobs")
    error = assert_error(post(url, {"messages": messages, "logprobs": True, "top_logprobs": 21}), 400)
    assert error["param"] == "top_logprobs"
