"""`vllm serve <folder> --tensor-parallel-size 2` on loopback: OpenAI chat requests with `image_url`
pictures get qwenvl's `model.chat` replies, token for token.

Tensor parallelism on CPU needs a core for each worker; with one core the server runs unsplit and
the tensor-parallel test is skipped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cases import CASES, NEW_TOKENS, cpu_binding, openai_messages, vllm_engine_options

pytest.importorskip(
    "vllm", reason="the vLLM plugin's tests need vLLM: `make venv-vllm` builds its environment"
)
httpx = pytest.importorskip("httpx")

STARTUP_LIMIT = 900  # seconds: loading takes about a minute on two busy cores; a dead server fails at once


def tensor_parallel() -> int:
    return 2 if len(os.sched_getaffinity(0)) >= 2 else 1


def serve_arguments(checkpoint: Path, port: int, tp: int) -> list[str]:
    options = vllm_engine_options()
    return [
        str(Path(sys.executable).with_name("vllm")),
        "serve",
        str(checkpoint),
        "--host=127.0.0.1",
        f"--port={port}",
        f"--tensor-parallel-size={tp}",
        f"--dtype={options['dtype']}",
        f"--max-model-len={options['max_model_len']}",
        f"--kv-cache-memory-bytes={options['kv_cache_memory_bytes']}",
        "--enforce-eager",
    ]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """(base URL, tensor-parallel size, log file) of a running `vllm serve`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tp = tensor_parallel()
    log_path = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            serve_arguments(checkpoint, port, tp),
            env={**os.environ, **cpu_binding(tp)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(process, base, log_path)
        yield base, tp, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_healthy(process: subprocess.Popen, base: str, log_path: Path) -> None:
    started = time.monotonic()
    while time.monotonic() - started < STARTUP_LIMIT:
        if process.poll() is not None:
            pytest.fail(f"vllm serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"vllm serve did not start in {STARTUP_LIMIT} s:\n{log_path.read_text()[-4000:]}")


def chat(base: str, checkpoint: Path, messages: list[dict]) -> httpx.Response:
    body = {
        "model": str(checkpoint),
        "messages": messages,
        "temperature": 0,
        "max_tokens": NEW_TOKENS,
        "return_token_ids": True,
    }
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)


@pytest.mark.parametrize("name", ["one_image", "two_images", "history", "long_text"])
def test_served_replies_are_model_chat_replies(server, checkpoint, references, name):
    base, _, _ = server
    response = chat(base, checkpoint, openai_messages(CASES[name]))
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["token_ids"] == references[name]["tokens"]
    assert isinstance(choice["message"]["content"], str)


def test_the_replies_came_from_two_tensor_parallel_workers(server):
    _, tp, log_path = server
    if tp < 2:
        pytest.skip("tensor parallelism on CPU binds each worker to a core of its own: this machine has one")
    assert "(Worker_TP1 " in log_path.read_text()  # vLLM names the second worker's log lines so


def test_a_turn_the_format_cannot_hold_is_a_400(server, checkpoint):
    base, _, _ = server
    messages = [
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}
    ]
    response = chat(base, checkpoint, messages)
    assert response.status_code == 400
    assert "audio" in response.json()["error"]["message"]
