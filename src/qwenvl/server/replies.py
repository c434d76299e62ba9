"""One request's way through the engine, in OpenAI's terms: its model name and sampling settings,
its place in the engine's queue, its tokens as text, and its answer, whole or streamed as
server-sent events, with the engine's failures as HTTP errors. The endpoints (`app`,
`completions`) read their requests and build their prompts; the rest is here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..chat_format import ReplyText
from ..engine import EngineBusyError, EngineStoppedError, RequestFailedError, RequestHandle
from ..generation import PromptTooLongError, SamplingParams
from ..grounding import parse_boxes
from .errors import APIError
from .logprobs import chat_logprobs
from .metrics import RequestTiming, request_timing
from .schemas import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)


# -- a request -> the engine --------------------------------------------------------------------------


def stop_strings(body: ChatCompletionRequest | CompletionRequest) -> list[str]:
    """The request's `stop`, one string or several, as a list."""
    return [body.stop] if isinstance(body.stop, str) else body.stop or []


def served_model(requested: str | None, names: Sequence[str]) -> str:
    """The model name a reply gives: the request's, one of the served `names` (another is a 404, in
    OpenAI's shape), or the first when the request names none."""
    if requested is None:
        return names[0]
    if requested not in names:
        raise APIError(
            404,
            f"the model {requested!r} does not exist; this server serves {', '.join(map(repr, names))}",
            param="model",
            code="model_not_found",
        )
    return requested


def sampling_params(
    body: ChatCompletionRequest | CompletionRequest,
    generation_config: Any,
    defaults: Mapping[str, Any],
    stop_ids,
) -> SamplingParams:
    options = dict(defaults)
    if body.temperature == 0:
        options["do_sample"] = False
    elif body.temperature is not None:
        options.update(do_sample=True, temperature=body.temperature)
    requested = {
        "top_p": body.top_p,
        "max_new_tokens": body.max_new_tokens,
        "seed": body.seed,
        "logprobs": body.logprobs_asked,
    }
    options.update({k: v for k, v in requested.items() if v is not None})
    try:
        return SamplingParams.from_config(generation_config, **options).with_stop_words(stop_ids)
    except ValueError as error:
        raise APIError(400, str(error)) from None


def submit(engine, ids: list[int], params: SamplingParams, images: list, param: str) -> RequestHandle:
    """Queue a prompt in the engine: a full queue is answered 503, a prompt past the context window
    400 (naming `param`)."""
    try:
        return engine.submit(ids, params, images, loop=asyncio.get_running_loop())
    except EngineBusyError as error:
        raise APIError(
            503, f"the server is busy ({error}); retry later", "server_error", code="busy"
        ) from None
    except PromptTooLongError as error:
        raise APIError(400, str(error), param=param, code="context_length_exceeded") from None


# -- tokens -> text -----------------------------------------------------------------------------------


async def reply_deltas(
    handle: RequestHandle, reply: ReplyText, deadline: float, timing: RequestTiming | None = None
) -> AsyncIterator[str]:
    """New reply text as tokens arrive; the request is cancelled if this ends before the engine does
    (a stop string, the deadline, or the client going away). `timing` gets the tokens' times."""
    loop = asyncio.get_running_loop()
    tokens = handle.stream()
    if timing is not None:
        timing.submitted(handle.prompt_tokens)
    try:
        while not reply.stopped:
            try:
                token = await asyncio.wait_for(anext(tokens), deadline - loop.time())
            except StopAsyncIteration:
                break
            if timing is not None:
                timing.token()
            delta = reply.add(token)
            if delta:
                yield delta
        if timing is not None:
            timing.ended("stop" if reply.stopped else handle.finish_reason or "stop")
        delta = reply.finish()
        if delta:
            yield delta
    finally:
        if handle.finish_reason is None:
            handle.cancel()  # frees the engine slot at its next step
        await tokens.aclose()


async def whole_reply(request: Request, exchange: Exchange, deadline: float, timeout: float) -> None:
    """Wait for the whole reply of a request answered in one piece."""
    watcher = asyncio.create_task(cancel_on_disconnect(request, exchange.handle))
    try:
        async for _ in reply_deltas(exchange.handle, exchange.reply, deadline, request_timing(request)):
            pass
    except Exception as error:  # engine errors and the deadline
        raise generation_error(error, timeout) from None
    finally:
        watcher.cancel()


async def cancel_on_disconnect(request: Request, handle: RequestHandle) -> None:
    """Cancel `handle` when the client hangs up (run as a task beside a non-streamed reply; a
    streamed one is cancelled by its response ending)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


def generation_error(error: BaseException, timeout: float) -> APIError:
    """The HTTP error of a request whose generation failed or ran past `timeout` seconds."""
    if isinstance(error, asyncio.TimeoutError):
        return APIError(504, f"the request took longer than {timeout:g}s", "timeout_error", code="timeout")
    if isinstance(error, EngineStoppedError):
        return APIError(503, "the server is shutting down", "server_error", code="unavailable")
    if isinstance(error, RequestFailedError):  # the engine logged the cause
        return APIError(500, f"generation failed: {error}", "server_error", code="generation_failed")
    logger.error("generation failed", exc_info=error)
    return APIError(500, "generation failed", "server_error")


def stream_failure(error: BaseException, timeout: float, timing: RequestTiming) -> str:
    """The event that reports `generation_error` inside a stream whose 200 has gone out."""
    failure = generation_error(error, timeout)
    timing.failed_in_stream(failure)
    return sse_event(failure.body())


# -- text -> OpenAI's shapes --------------------------------------------------------------------------


def reply_boxes(text: str, size: tuple[int, int] | None) -> list[dict]:
    """The reply's grounding boxes; `pixels` refer to a picture of `size` (the conversation's last,
    as stored), if any."""
    return [
        {
            "phrase": box.phrase,
            "box": list(box.coords),
            "pixels": list(box.to_pixels(*size)) if size is not None else None,
        }
        for box in parse_boxes(text)
    ]


class Exchange:
    """One request's answer in OpenAI's shapes: the whole completion, or its stream chunks."""

    def __init__(self, model_id: str, handle: RequestHandle, reply: ReplyText):
        self.model_id, self.handle, self.reply = model_id, handle, reply
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self._logprobs_given = 0  # tokens whose logprobs went out

    def finish_reason(self) -> str:
        return "stop" if self.reply.stopped else self.handle.finish_reason or "stop"

    def usage(self) -> dict:
        prompt, completion = self.handle.prompt_tokens, len(self.reply.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def new_logprobs(self) -> list:
        """The handle's logprobs of the reply's tokens not given yet: one for each token counted in
        `usage` (an end token too), none where the request did not ask for them."""
        entries = self.handle.logprobs[self._logprobs_given : len(self.reply.tokens)]
        self._logprobs_given += len(entries)
        return entries

    def _chat_logprobs(self) -> dict | None:
        entries = self.new_logprobs()
        return chat_logprobs(self.reply.tokenizer, entries) if entries else None

    def _envelope(self, kind: str, choice: dict) -> dict:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model_id,
            "choices": [choice],
        }

    def completion(self, picture_size: tuple[int, int] | None) -> dict:
        text = self.reply.text
        message = {"role": "assistant", "content": text, "boxes": reply_boxes(text, picture_size)}
        logprobs = self._chat_logprobs()
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": self.finish_reason()}
        return {**self._envelope("chat.completion", choice), "usage": self.usage()}

    def chunk(self, delta: dict, reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": self._chat_logprobs(), "finish_reason": reason}
        return self._envelope("chat.completion.chunk", choice)


def sse_event(data: dict | str) -> str:
    """A server-sent event carrying `data`: a JSON object, or a plain string such as "[DONE]"."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """The response that streams `events` (`sse_event`s) as they come, past caches and proxies."""
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)
