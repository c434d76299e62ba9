"""A web demo served on loopback and Debian's Chromium driven by Playwright, for tests/test_web.py."""

from __future__ import annotations

import contextlib
import shutil
import socket
from collections.abc import Iterator

import pytest

# As the machine notes ask: no sandbox as root, and no background connections to closed networks.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_or_skip() -> str:
    """The system Chromium (Playwright may not download its own here); skip the test without it."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served(demo) -> Iterator[str]:
    """`demo` launched in the background on a free loopback port; yields its address."""
    from qwenvl.web import launch

    port = free_port()
    launch(demo, host="127.0.0.1", port=port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@contextlib.contextmanager
def browser_page(executable: str, timeout_ms: int = 20_000):
    """A fresh headless Chromium page (a new profile each time)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 1100})
            context.set_default_timeout(timeout_ms)
            yield context.new_page()
        finally:
            browser.close()
