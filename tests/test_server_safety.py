"""The server under requests meant to harm it or its other users, all on loopback.

A request that fails in the engine fails alone; a client that hangs up frees its slot; bodies are
bounded; image URLs never reach a non-public address (nor connect at all when refused) and every
fetch failure reads the same; fetches that hang hold only the fetch pool.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import qwenvl.engine
from qwenvl.decode import Decoder
from qwenvl.engine import Engine
from qwenvl.images import ImagePolicy
from qwenvl.server.app import create_app

from .http_helpers import QuietHandler, start_http_server, stop_http_server
from .server_helpers import GREEDY, SHAPES, assert_error, data_url, image_part, post, serving, user

WAIT = 30  # seconds to wait for something that takes milliseconds: only a broken server needs it


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def app_for(engine, tokenizer, policy: ImagePolicy | None = None, **options):
    policy = policy or ImagePolicy.strict()
    return create_app(engine, tokenizer, model_id="tiny", image_policy=policy, api_key=None, **options)


def one_batch_then_alone(tiny_model, tokenizer, bodies: list[dict]):
    """The responses to `bodies` decoded in one batch (all queued before the engine starts), and
    then to each sent alone to the same server."""
    engine = Engine(tiny_model, max_batch_size=len(bodies))
    with serving(app_for(engine, tokenizer)) as base, ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(post, base, body) for body in bodies]
        wait_until(lambda: engine.waiting == len(bodies), "every request waits")
        engine.start()
        together = [future.result() for future in futures]
        alone = [post(base, body) for body in bodies]
        engine.stop()
    return together, alone


def ask(text: str, **options) -> dict:
    return {"messages": [{"role": "user", "content": text}], **GREEDY, **options}


# -- one request cannot fail the others --------------------------------------------------------------


def test_a_temperature_too_small_to_sample_is_greedy_and_harms_no_one(tiny_model, tokenizer):
    """1e-40 overflowed the logits and failed every request in the batch; it now decodes greedily."""
    bodies = [
        ask("What is 2+2?", temperature=1e-40, seed=1),
        ask("Name a colour."),
        ask("Count to three.", temperature=0.8, seed=7),
        ask("Say hello."),
    ]
    together, alone = one_batch_then_alone(tiny_model, tokenizer, bodies)
    assert [r.status_code for r in together + alone] == [200] * 8
    replies = [[r.json()["choices"][0]["message"]["content"] for r in rs] for rs in (together, alone)]
    assert replies[0] == replies[1]
    greedy = post_alone(tiny_model, tokenizer, ask("What is 2+2?"))
    assert replies[0][0] == greedy


def post_alone(tiny_model, tokenizer, body: dict) -> str:
    with Engine(tiny_model) as engine, serving(app_for(engine, tokenizer)) as base:
        return post(base, body).json()["choices"][0]["message"]["content"]


def test_a_request_failing_in_the_engine_is_a_500_for_it_alone(tiny_model, tokenizer, monkeypatch):
    poison = tokenizer.encode("POISON")

    class FailingDecoder(Decoder):
        def prefill(self, rows, image_features=None):
            text = list(rows[0])
            if any(text[i : i + len(poison)] == poison for i in range(len(text))):
                raise RuntimeError("broken prompt (simulated)")
            return super().prefill(rows, image_features)

    monkeypatch.setattr(qwenvl.engine, "Decoder", FailingDecoder)
    bodies = [ask("Name a colour."), ask("POISON"), ask("Count to three."), ask("Say hello.")]
    together, alone = one_batch_then_alone(tiny_model, tokenizer, bodies)
    for responses in (together, alone):
        error = assert_error(responses[1], 500, "generation failed", "preparing its prompt")
        assert error["code"] == "generation_failed" and "simulated" not in error["message"]
        good = [responses[i] for i in (0, 2, 3)]
        assert [r.status_code for r in good] == [200] * 3
    assert [together[i].json()["choices"] for i in (0, 2, 3)] == [
        alone[i].json()["choices"] for i in (0, 2, 3)
    ]


# -- a client that hangs up ---------------------------------------------------------------------------


def test_a_client_that_hangs_up_frees_its_slot_without_streaming(tiny_model, tokenizer, monkeypatch):
    engine = Engine(tiny_model).start()
    handles = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda *a, **k: handles.append(submit(*a, **k)) or handles[-1])
    payload = httpx.Request("POST", "http://127.0.0.1/", json=ask("Tell me a long story.", max_tokens=4000))
    try:
        with serving(app_for(engine, tokenizer)) as base:
            port = int(base.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port)) as client:
                head = (
                    f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(payload.read())}\r\n\r\n"
                )
                client.sendall(head.encode() + payload.read())
                wait_until(lambda: engine.running == 1, "the request decodes")
            # the connection is closed: the engine stops decoding for it at its next step
            wait_until(lambda: engine.running == 0, "the request is cancelled")
    finally:
        engine.stop()
    assert handles[0].cancelled.is_set()


# -- bounded bodies -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_body_url(tiny_model, tokenizer):
    with Engine(tiny_model) as engine, serving(app_for(engine, tokenizer, max_request_bytes=4096)) as base:
        yield base


def test_a_body_over_the_limit_is_413(small_body_url):
    big = ask("hello " * 1000)  # about 6 kB
    error = assert_error(post(small_body_url, big), 413, "larger than", "4096 bytes")
    assert error["code"] == "request_too_large"
    assert post(small_body_url, ask("hello")).status_code == 200


def test_a_chunked_body_over_the_limit_is_413(small_body_url):
    """Without a Content-Length the server counts what arrives."""
    chunks = [b'{"messages": [{"role": "user", "content": "', b"x" * 3000, b"x" * 3000, b'"}]}']
    response = httpx.post(
        f"{small_body_url}/v1/chat/completions",
        content=iter(chunks),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "larger than")
    fits = [b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}']
    response = httpx.post(
        f"{small_body_url}/v1/chat/completions",
        content=iter(fits),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200, response.text


def test_the_key_is_checked_before_the_body_is_measured(tiny_model, tokenizer):
    with Engine(tiny_model) as engine:
        app = create_app(
            engine,
            tokenizer,
            model_id="tiny",
            image_policy=ImagePolicy.strict(),
            api_key="k",
            max_request_bytes=10,
        )
        with serving(app) as base:
            assert_error(post(base, ask("hello " * 100)), 401, "API key")


# -- images from URLs ---------------------------------------------------------------------------------


class _ImageHandler(QuietHandler):
    png = SHAPES.read_bytes()
    release = threading.Event()  # /hang answers once it is set
    hanging = 0
    lock = threading.Lock()

    def do_GET(self) -> None:  # the name is fixed by http.server
        if self.path.startswith("/hang"):
            with self.lock:
                type(self).hanging += 1
            self.release.wait()
            self.send(200, self.png)
        elif self.path == "/image.png":
            self.send(200, self.png)
        elif self.path == "/text":
            self.send(200, b"this is not a picture")
        else:
            self.send(404, b"not found")


@pytest.fixture
def image_server() -> Iterator[str]:
    _ImageHandler.release.clear()
    _ImageHandler.hanging = 0
    httpd = start_http_server(_ImageHandler)
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        _ImageHandler.release.set()
        stop_http_server(httpd)


@pytest.fixture
def fetch_connections(monkeypatch) -> list:
    """Every address the server's fetch threads connect to (the test's own clients are not counted)."""
    attempts = []
    connect = socket.socket.connect

    def recording_connect(sock, address):
        if threading.current_thread().name.startswith("qwenvl-fetch"):
            attempts.append(address)
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    return attempts


def image_request(*urls: str) -> dict:
    return {"messages": [user(*(image_part(u) for u in urls), "What is this?")], **GREEDY}


def fetch_refusal(url: str) -> str:
    return f"messages[0].content[0].image_url: could not fetch the image at {url!r}"


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "127.1",
        "2130706433",
        "0x7f000001",
        "0.0.0.0",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "10.0.0.1",
        "192.168.1.1",
        "172.16.0.1",
        "169.254.169.254",
        "100.64.0.1",
    ],
)
def test_remote_images_never_reach_a_non_public_address(
    tiny_model, tokenizer, image_server, fetch_connections, host
):
    port = image_server.rsplit(":", 1)[1]
    policy = ImagePolicy.strict(allow_remote=True)
    with Engine(tiny_model) as engine, serving(app_for(engine, tokenizer, policy)) as base:
        url = f"http://{host}:{port}/image.png"
        response = post(base, image_request(url))
    error = assert_error(response, 400)
    assert error["message"] == fetch_refusal(url) and error["code"] == "invalid_image"
    assert fetch_connections == []  # refused before any connection


def test_every_fetch_failure_reads_the_same(tiny_model, tokenizer, image_server, fetch_connections):
    """A lab server that lets private addresses be fetched: refused connection, a 404 and a page
    that is not a picture give the client the same words, or it could scan the network."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]  # nothing listens once the socket is closed
    policy = ImagePolicy.strict(allow_remote=True, allow_private_addresses=True)
    with Engine(tiny_model) as engine, serving(app_for(engine, tokenizer, policy)) as base:
        for url in (
            f"{image_server}/missing.png",
            f"{image_server}/text",
            f"http://127.0.0.1:{closed_port}/a",
        ):
            assert assert_error(post(base, image_request(url)), 400)["message"] == fetch_refusal(url)
        assert post(base, image_request(f"{image_server}/image.png")).status_code == 200
    assert ("127.0.0.1", closed_port) in fetch_connections


def test_only_the_allowed_media_domains(tiny_model, tokenizer, fetch_connections, monkeypatch):
    looked_up = []
    getaddrinfo = socket.getaddrinfo

    def recording_getaddrinfo(host, *args, **kwargs):
        if threading.current_thread().name.startswith("qwenvl-fetch"):
            looked_up.append(host)
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording_getaddrinfo)
    policy = ImagePolicy.strict(allowed_domains=("images.example.org",))
    with Engine(tiny_model) as engine, serving(app_for(engine, tokenizer, policy)) as base:
        for url in (
            "http://evil.example/a.png",
            "http://example.org/a.png",
            "https://images.example.org.evil/a",
        ):
            assert assert_error(post(base, image_request(url)), 400)["message"] == fetch_refusal(url)
    assert looked_up == [] and fetch_connections == []  # refused before the name was even looked up


def test_hanging_fetches_do_not_hold_up_other_requests(tiny_model, tokenizer, image_server):
    """Six requests whose pictures never arrive fill the fetch pool; a picture sent inline is still
    decoded, and the prompt built, at once."""
    policy = ImagePolicy.strict(allow_remote=True, allow_private_addresses=True, timeout=2 * WAIT)
    with Engine(tiny_model) as engine:
        app = app_for(engine, tokenizer, policy, fetch_threads=2)
        with serving(app) as base, ThreadPoolExecutor(6) as pool:
            hanging = [pool.submit(post, base, image_request(f"{image_server}/hang{i}")) for i in range(6)]
            wait_until(lambda: _ImageHandler.hanging == 2, "both fetch threads hang")
            # the fetches hang for 2 * WAIT seconds; this answer must come well within WAIT
            inline = httpx.post(
                f"{base}/v1/chat/completions", json=image_request(data_url(SHAPES)), timeout=WAIT
            )
            assert inline.status_code == 200, inline.text
            assert not any(future.done() for future in hanging)
            _ImageHandler.release.set()
            assert [future.result().status_code for future in hanging] == [200] * 6


def test_a_requests_images_are_fetched_at_once(tiny_model, tokenizer, image_server):
    policy = ImagePolicy.strict(allow_remote=True, allow_private_addresses=True, timeout=2 * WAIT)
    with Engine(tiny_model) as engine, serving(app_for(engine, tokenizer, policy, max_images=3)) as base:
        with ThreadPoolExecutor(1) as pool:
            urls = [f"{image_server}/hang{i}" for i in range(3)]
            response = pool.submit(post, base, image_request(*urls))
            wait_until(lambda: _ImageHandler.hanging == 3, "the three fetches are under way together")
            _ImageHandler.release.set()
            assert response.result().status_code == 200
