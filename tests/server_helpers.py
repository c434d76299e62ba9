"""What the server tests share: a loopback server for an app, request bodies, error checks."""

from __future__ import annotations

import base64
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

IMAGES = Path(__file__).parent / "data" / "images"
SHAPES, GRAY = IMAGES / "shapes.png", IMAGES / "gray.png"
GREEDY = {"temperature": 0, "max_tokens": 8}
IMAGE_SPAN = 258  # <img>, 256 image tokens, </img>


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts) -> dict:
    return {
        "role": "user",
        "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts],
    }


@contextmanager
def serving(app):
    """Run `app` on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def post(base: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]
    return error


def greedy_logprobs(model, prompt: list[int], steps: int, ends: set[int]) -> list[tuple]:
    """Greedy decoding by whole forwards over the prompt and the tokens so far (no cache, no engine):
    each step's token and the log-softmax of the logits it was chosen from."""
    import torch

    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            scores = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
            token = int(scores.argmax())
            out.append((token, scores))
            ids.append(token)
            if token in ends:
                break
    return out
