"""The server as an operator runs it: Prometheus metrics, the served model names, boxes in a
streamed reply, OpenAI fields it refuses, and the port it listens on.

One app over the tiny golden model (behind a real Engine, with an API key) serves most tests,
on loopback, as in test_server.py.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import threading
import time

import httpx
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from qwenvl.engine import Engine
from qwenvl.images import ImagePolicy
from qwenvl.request_handle import Event, RequestHandle
from qwenvl.server.app import create_app
from qwenvl.server.replies import reply_boxes

from .server_helpers import GREEDY, SHAPES, assert_error, data_url, image_part, post, serving, user

CHAT = "/v1/chat/completions"
KEY = {"Authorization": "Bearer k"}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine(tiny_model):
    with Engine(tiny_model, max_batch_size=4) as engine:
        yield engine


@pytest.fixture(scope="module")
def url(engine, tokenizer):
    policy = ImagePolicy.strict()
    app = create_app(engine, tokenizer, model_id=["tiny", "tiny-chat"], image_policy=policy, api_key="k")
    with serving(app) as base:
        yield base


def scrape(base: str) -> dict[tuple, float]:
    """Every sample /metrics shows, by (name, labels); the scrape needs no key."""
    response = httpx.get(f"{base}/metrics", timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    families = text_string_to_metric_families(response.text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def sample(samples: dict[tuple, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_until(base: str, done) -> dict[tuple, float]:
    """A scrape once `done(samples)` holds: a request is counted just after its answer's last byte
    went out, so the client may read the answer first."""
    deadline = time.monotonic() + 30
    while not done(samples := scrape(base)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return samples


def stream_events(base: str, body: dict, **kwargs) -> list[dict]:
    with httpx.stream("POST", f"{base}{CHAT}", json={**body, "stream": True}, timeout=60, **kwargs) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


# -- /metrics ---------------------------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_times(url):
    before = scrape(url)
    body = {"messages": [{"role": "user", "content": "Count to ten."}], **GREEDY}
    usages = [post(url, body, headers=KEY).json()["usage"]]
    events = stream_events(url, {**body, "stream_options": {"include_usage": True}}, headers=KEY)
    usages.append(events[-1]["usage"])

    def grew(samples, name: str, **labels: str) -> float:
        return sample(samples, name, **labels) - sample(before, name, **labels)

    def settled(samples) -> bool:  # both counted, and the engine has retired both rows
        counted = grew(samples, "qwenvl_requests_total", endpoint=CHAT, outcome="success") >= 2
        return counted and sample(samples, "qwenvl_requests_running") == 0

    after = scrape_until(url, settled)
    assert grew(after, "qwenvl_requests_total", endpoint=CHAT, outcome="success") == 2
    assert grew(after, "qwenvl_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert grew(after, "qwenvl_generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert grew(after, "qwenvl_time_to_first_token_seconds_count") == 2
    assert grew(after, "qwenvl_e2e_request_latency_seconds_count") == 2
    several = sum(u["completion_tokens"] > 1 for u in usages)
    assert grew(after, "qwenvl_time_per_output_token_seconds_count") == several
    # each request's latency holds the delay of its first token (both are taken from its arrival)
    latency = grew(after, "qwenvl_e2e_request_latency_seconds_sum")
    assert latency >= grew(after, "qwenvl_time_to_first_token_seconds_sum") > 0
    inf = {"le": "+Inf"}
    assert grew(after, "qwenvl_e2e_request_latency_seconds_bucket", **inf) == 2
    assert sample(after, "qwenvl_requests_running") == sample(after, "qwenvl_requests_waiting") == 0


def test_metrics_count_errors_by_kind(url):
    before = scrape(url)
    assert_error(post(url, {"model": "gpt-4", "messages": HI}, headers=KEY), 404)
    assert_error(post(url, {"messages": HI, "tools": [{"type": "function"}]}, headers=KEY), 400)
    assert_error(post(url, {"messages": []}, headers=KEY), 400)
    assert_error(post(url, {"messages": HI}), 401)  # no key
    assert_error(httpx.get(f"{url}/v1/nothing", headers=KEY), 404)

    def grew(samples, name: str, **labels: str) -> float:
        return sample(samples, name, **labels) - sample(before, name, **labels)

    def refused(samples) -> list[float]:
        return [
            grew(samples, "qwenvl_requests_total", endpoint=e, outcome="client_error")
            for e in (CHAT, "other")
        ]

    after = scrape_until(url, lambda s: refused(s) == [4, 1])
    assert refused(after) == [4, 1]
    kinds = ["model_not_found", "unsupported_parameter", "invalid_request_error", "invalid_api_key"]
    assert [grew(after, "qwenvl_errors_total", kind=kind) for kind in kinds] == [1, 1, 1, 1]
    assert grew(after, "qwenvl_errors_total", kind="not_found_error") == 1
    assert grew(after, "qwenvl_prompt_tokens_total") == 0  # none reached the engine


def test_running_gauge_and_a_client_that_leaves(url):
    before = scrape(url)
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 4000}
    with httpx.stream(
        "POST", f"{url}{CHAT}", json={**body, "temperature": 0, "stream": True}, headers=KEY, timeout=60
    ) as response:
        lines = response.iter_lines()  # kept: a dropped line iterator would close the connection
        for line in lines:
            if line and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # some text arrived: the request is decoding
        assert sample(scrape(url), "qwenvl_requests_running") == 1

    def grew(samples, name: str, **labels: str) -> float:
        return sample(samples, name, **labels) - sample(before, name, **labels)

    after = scrape_until(url, lambda s: grew(s, "qwenvl_requests_total", endpoint=CHAT, outcome="cancelled"))
    assert grew(after, "qwenvl_requests_total", endpoint=CHAT, outcome="cancelled") == 1
    assert grew(after, "qwenvl_requests_total", endpoint=CHAT, outcome="success") == 0
    assert grew(after, "qwenvl_e2e_request_latency_seconds_count") == 0  # a reply cut short has none
    assert grew(after, "qwenvl_time_to_first_token_seconds_count") == 1


def test_waiting_gauge_and_errors_inside_a_stream(tiny_model, tokenizer):
    # An engine never started admits nothing: requests wait in its queue until it fails them.
    engine = Engine(tiny_model, max_batch_size=1, max_queue=2)
    app = create_app(engine, tokenizer, model_id="tiny", image_policy=ImagePolicy.strict(), api_key=None)
    body = {"messages": HI, **GREEDY}
    with serving(app) as base:
        whole: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: whole.append(post(base, body)))
        waiting.start()
        with httpx.stream("POST", f"{base}{CHAT}", json={**body, "stream": True}, timeout=60) as response:
            lines = (line for line in response.iter_lines() if line)
            assert json.loads(next(lines)[6:])["choices"][0]["delta"]["role"] == "assistant"  # submitted
            deadline = time.monotonic() + 30
            while engine.waiting < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            samples = scrape(base)
            assert sample(samples, "qwenvl_requests_waiting") == 2
            assert sample(samples, "qwenvl_requests_running") == 0
            engine.stop()  # fails both
            error = json.loads(next(lines)[6:])["error"]
            assert error["code"] == "unavailable"
            assert list(lines) == []  # the stream ends after its error
        waiting.join()
        assert_error(whole[0], 503, "shutting down")
        after = scrape_until(base, lambda s: sample(s, "qwenvl_errors_total", kind="unavailable") >= 2)
    # the stream's answer was a 200, but its request failed all the same
    assert sample(after, "qwenvl_errors_total", kind="unavailable") == 2
    assert sample(after, "qwenvl_requests_total", endpoint=CHAT, outcome="server_error") == 2
    assert sample(after, "qwenvl_time_to_first_token_seconds_count") == 0


def test_every_app_counts_alone(engine, tokenizer):
    """Two apps in one process: each has its own registry."""
    apps = [
        create_app(engine, tokenizer, model_id="tiny", image_policy=ImagePolicy.strict(), api_key=None)
        for _ in range(2)
    ]
    with serving(apps[0]) as first, serving(apps[1]) as second:
        assert_error(post(first, {"messages": []}), 400)
        refused = {"endpoint": CHAT, "outcome": "client_error"}
        counted = scrape_until(first, lambda s: sample(s, "qwenvl_requests_total", **refused))
        assert sample(counted, "qwenvl_requests_total", **refused) == 1
        assert sample(scrape(second), "qwenvl_requests_total", **refused) == 0


# -- served model names -----------------------------------------------------------------------------


def test_served_model_names(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny", "tiny-chat"]
    assert client.chat.completions.create(model="tiny-chat", messages=HI, **GREEDY).model == "tiny-chat"
    assert post(url, {"messages": HI, **GREEDY}, headers=KEY).json()["model"] == "tiny"  # none named
    response = post(url, {"model": "gpt-4", "messages": HI}, headers=KEY)
    assert response.status_code == 404
    error = response.json()["error"]
    assert "gpt-4" in error["message"] and "'tiny', 'tiny-chat'" in error["message"]
    assert {k: error[k] for k in ("type", "param", "code")} == {
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=HI, **GREEDY)


# -- boxes in a streamed reply ----------------------------------------------------------------------


def scripted(ids: list[int]):
    """An engine's submit whose every request gets the tokens `ids`, then its end."""

    def submit(prompt, params, images=(), loop=None) -> RequestHandle:
        handle = RequestHandle(0, loop)
        handle.prompt_tokens = len(prompt)
        for i, token in enumerate(ids):
            handle._publish(Event(token=token, finish_reason="stop" if i == len(ids) - 1 else None))
        return handle

    return submit


def test_streamed_reply_ends_with_the_boxes(url, engine, tokenizer, monkeypatch):
    """The engine's tokens are scripted here: a random tiny model draws no boxes."""
    text = "<ref>the square</ref><box>(100,200),(300,400)</box> and <box>(0,0),(500,500)</box>"
    monkeypatch.setattr(engine, "submit", scripted(tokenizer.encode(text)))
    body = {"messages": [user(image_part(data_url(SHAPES)), "Where is the square?")]}
    boxes = reply_boxes(text, Image.open(SHAPES).size)
    assert len(boxes) == 2 and boxes[0]["pixels"] is not None
    message = post(url, body, headers=KEY).json()["choices"][0]["message"]
    assert message["content"] == text and message["boxes"] == boxes
    events = stream_events(url, body, headers=KEY)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == text
    *before, last = events
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["choices"][0]["delta"] == {"boxes": boxes}
    assert all("boxes" not in e["choices"][0]["delta"] for e in before)
    # a reply without boxes ends with an empty list, as a whole reply has one
    monkeypatch.setattr(engine, "submit", scripted(tokenizer.encode("none here")))
    assert stream_events(url, body, headers=KEY)[-1]["choices"][0]["delta"] == {"boxes": []}


# -- fields the server does not take ----------------------------------------------------------------


def test_unsupported_openai_fields_are_refused_by_name(url):
    refused = {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "auto",
        "functions": [{"name": "f"}],
        "function_call": {"name": "f"},
        "response_format": {"type": "json_object"},
        "logit_bias": {"42": 5},
        "presence_penalty": 0.5,
        "frequency_penalty": -1,
        "audio": {"voice": "alloy", "format": "wav"},
        "modalities": ["text", "audio"],
        "reasoning_effort": "high",
    }
    for field, value in refused.items():
        error = assert_error(
            post(url, {"messages": HI, field: value}, headers=KEY), 400, field, "not supported"
        )
        assert (error["param"], error["code"]) == (field, "unsupported_parameter")
    error = assert_error(
        post(url, {"messages": HI, "top_k": 5}, headers=KEY), 400, "top_k", "unknown parameter"
    )
    assert (error["param"], error["code"]) == ("top_k", "unknown_parameter")
    error = assert_error(post(url, {"messages": HI, "n": 3}, headers=KEY), 400, "n=1")
    assert error["param"] == "n"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="tiny", messages=HI, tools=refused["tools"])


def test_harmless_fields_and_neutral_values_are_accepted(url):
    plain = post(url, {"messages": HI, **GREEDY}, headers=KEY).json()["choices"][0]["message"]["content"]
    harmless = {
        "user": "u-1",
        "safety_identifier": "s-1",
        "store": False,
        "metadata": {"team": "a"},
        "service_tier": "auto",
        "prompt_cache_key": "c",
        "parallel_tool_calls": False,
        "n": 1,
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "logit_bias": {},
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "modalities": ["text"],
        "audio": None,
    }
    response = post(url, {"messages": HI, **GREEDY, **harmless}, headers=KEY)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == plain


# -- the command --------------------------------------------------------------------------------------


def test_serve_help_documents_the_operations_flags(capsys):
    from qwenvl import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--served-model-name NAME [NAME ...]", "model_not_found", "GET /metrics", "API key"):
        assert words in text, words
    parser = argparse.ArgumentParser()
    from qwenvl.server import add_arguments

    add_arguments(parser)
    assert parser.parse_args([]).served_model_name is None
    names = parser.parse_args(["--served-model-name", "a", "b", "--served-model-name", "c"]).served_model_name
    assert names == ["a", "b", "c"]
    for bad in (["--served-model-name", " "], ["--port", "70000"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_a_taken_port_is_one_line_before_the_model_loads(monkeypatch, capsys):
    from qwenvl import cli, frontend

    monkeypatch.setattr(frontend, "load_from_args", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli.main(["serve", "--port", str(port)])
    out, err = capsys.readouterr()
    assert code != 0
    assert out == ""  # no "serving at"
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}: address already in use" in err


def test_serve_prints_where_it_listens_and_serves_its_names(tiny_model, tokenizer, monkeypatch, capsys):
    """`qwenvl serve` in this process, over the tiny model; Ctrl-C ends it."""
    from qwenvl import cli, frontend

    loaded = frontend.LoadedModel("/models/ckpt", tokenizer, tiny_model)
    monkeypatch.setattr(frontend, "load_from_args", lambda *a, **k: loaded)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    seen: dict = {}

    def client() -> None:
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while "models" not in seen and time.monotonic() < deadline:
                try:
                    seen["models"] = [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]]
                except httpx.TransportError:
                    time.sleep(0.05)
            seen["model"] = post(base, {"model": "b", "messages": HI, **GREEDY}).json()["model"]
        finally:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C: handled by the server, in the main thread

    thread = threading.Thread(target=client)
    thread.start()
    code = cli.main(["serve", "--served-model-name", "a", "b", "--port", str(port)])
    thread.join()
    assert code == 0
    # the line comes first; uvicorn's access log follows it on stdout
    assert capsys.readouterr().out.splitlines()[0] == f"serving a, b at http://127.0.0.1:{port}/v1"
    assert seen == {"models": ["a", "b"], "model": "b"}
