"""A request's side of the serving engine: the handle its caller reads tokens from, and the errors
that end it."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .decode.sequence import TokenLogprobs


class EngineBusyError(RuntimeError):
    """The request queue is full: the caller should retry later (a server answers 503)."""


class EngineStoppedError(RuntimeError):
    """The engine was stopped before the request finished."""


class RequestFailedError(RuntimeError):
    """This request failed in the engine, while `stage`; the cause is chained. Others went on."""

    def __init__(self, stage: str):
        super().__init__(f"the request failed while {stage}")
        self.stage = stage


@dataclass
class Event:
    token: int | None = None
    finish_reason: str | None = None  # "stop", "length" or "cancelled" on the last event
    error: BaseException | None = None
    logprobs: TokenLogprobs | None = None  # the token's, when its sampling parameters ask for them


class RequestHandle:
    """What `Engine.submit` returns: the stream of a request's tokens, and a way to cancel it."""

    def __init__(self, request_id: int, loop: asyncio.AbstractEventLoop | None):
        self.id = request_id
        self.prompt_tokens = 0
        self.reused_tokens = 0
        self.finish_reason: str | None = None
        # each token's TokenLogprobs, in order, when the request's parameters ask for them: the
        # entry of a token is here before the token is yielded
        self.logprobs: list[TokenLogprobs] = []
        self._loop = loop
        self._sync: queue.Queue[Event] = queue.Queue()
        self._async: asyncio.Queue[Event] | None = asyncio.Queue() if loop is not None else None
        self.cancelled = threading.Event()
        self.done = threading.Event()  # set once the engine has published the request's last event

    def cancel(self) -> None:
        """Stop generating for this request; its slot is freed at the next step."""
        self.cancelled.set()

    def _publish(self, event: Event) -> None:
        if event.finish_reason is not None or event.error is not None:
            self.done.set()
        if self._async is None:
            self._sync.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._async.put_nowait, event)
        except RuntimeError:  # the reader's event loop is closed: nobody is listening any more
            self.cancelled.set()

    def _read(self, event: Event) -> int | None:
        if event.error is not None:
            raise event.error
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        if event.logprobs is not None:
            self.logprobs.append(event.logprobs)
        return event.token

    def __iter__(self) -> Iterator[int]:
        """Token ids as they are generated (blocking); ends when the request finishes."""
        while True:
            event = self._sync.get()
            token = self._read(event)
            if token is not None:
                yield token
            if event.finish_reason is not None:
                return

    async def stream(self) -> AsyncIterator[int]:
        """The same, for asyncio code (the handle must come from `submit(..., loop=...)`)."""
        if self._async is None:
            raise RuntimeError("submit the request with loop=asyncio.get_running_loop() to stream it")
        while True:
            event = await self._async.get()
            token = self._read(event)
            if token is not None:
                yield token
            if event.finish_reason is not None:
                return
