"""The HTTP app: OpenAI chat requests -> qwenvl prompts -> the engine -> OpenAI responses.

Nothing here generates: the engine's worker loop batches every request, and handlers only
await their tokens, so the event loop stays free while the model runs. Images are loaded in
thread pools of their own (`image_loader`), under the operator's image policy; text a user types
is always plain text. A request that fails in the engine fails alone; a client that hangs up
frees its place in the batch within a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..chat_format import DEFAULT_SYSTEM, ReplyText, get_stop_words_ids, prompt_settings
from ..conversation import Message, build_prompt
from ..engine import EngineBusyError, EngineStoppedError, RequestFailedError, RequestHandle
from ..generation import PromptTooLongError, SamplingParams
from ..grounding import parse_boxes
from ..images import ImagePolicy, original_size
from .errors import APIError
from .image_loader import DEFAULT_FETCH_THREADS, ImageLoader
from .middleware import DEFAULT_MAX_REQUEST_BYTES, LimitRequestBody, RequireKey
from .schemas import ChatCompletionRequest, ChatMessage, ImagePart

logger = logging.getLogger(__name__)


# -- OpenAI messages -> a qwenvl conversation --------------------------------------------------------


async def read_conversation(
    messages: Sequence[ChatMessage], images: ImageLoader, max_images: int, default_system: str
) -> tuple[str, list[tuple[Message, str]], Message]:
    """(system prompt, history of (user message, reply), query). The conversation's shape is
    checked first; then its images are loaded, all at once."""
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    count = sum(isinstance(p, ImagePart) for m in messages if isinstance(m.content, list) for p in m.content)
    if count > max_images:
        raise APIError(
            400,
            f"{count} images; this server takes at most {max_images}",
            param="messages",
            code="too_many_images",
        )
    if messages[-1].role != "user":
        raise APIError(
            400, "the last message must be from the user", param=f"messages[{len(messages) - 1}].role"
        )
    systems: list[str] = []
    turns: list[tuple[list, str]] = []
    pending: list | None = None  # the parts of the user turn being read
    references: list[tuple[str, str]] = []  # (param, URL) of every image, in order
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.role in ("system", "developer"):
            systems.append(_text(message, where))
        elif message.role == "assistant":
            if pending is None:
                raise APIError(400, "an assistant message must follow a user message", param=f"{where}.role")
            turns.append((pending, _text(message, where)))
            pending = None
        else:  # consecutive user messages make one turn
            parts = _user_parts(message, where, references)
            pending = parts if pending is None else [*pending, "\n", *parts]
    loaded = await images.load_all(references)

    def with_images(parts: list) -> Message:  # an int part is the index of an image
        return Message([loaded[p] if isinstance(p, int) else p for p in parts])

    system = "\n".join(systems) if systems else default_system
    return system, [(with_images(parts), reply) for parts, reply in turns], with_images(pending)


def _text(message: ChatMessage, where: str) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    if any(isinstance(p, ImagePart) for p in message.content):
        raise APIError(400, f"only user messages may hold images ({message.role})", param=f"{where}.content")
    return "".join(p.text for p in message.content)


def _user_parts(message: ChatMessage, where: str, references: list[tuple[str, str]]) -> list:
    """The message's parts: texts (str, never parsed for <img> tags) and, for each image, its index
    in `references`, where it is added."""
    if message.content is None:
        raise APIError(400, "a user message needs content", param=f"{where}.content")
    if isinstance(message.content, str):
        return [message.content]
    parts: list = []
    for j, part in enumerate(message.content):
        if isinstance(part, ImagePart):
            parts.append(len(references))
            references.append((f"{where}.content[{j}].image_url", part.image_url.url))
        else:
            parts.append(part.text)
    return parts


def sampling_params(
    body: ChatCompletionRequest, generation_config: Any, defaults: Mapping[str, Any], stop_ids
) -> SamplingParams:
    options = dict(defaults)
    if body.temperature == 0:
        options["do_sample"] = False
    elif body.temperature is not None:
        options.update(do_sample=True, temperature=body.temperature)
    requested = {
        "top_p": body.top_p,
        "max_new_tokens": body.max_completion_tokens or body.max_tokens,
        "seed": body.seed,
    }
    options.update({k: v for k, v in requested.items() if v is not None})
    try:
        return SamplingParams.from_config(generation_config, **options).with_stop_words(stop_ids)
    except ValueError as error:
        raise APIError(400, str(error)) from None


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


# -- tokens -> text -----------------------------------------------------------------------------------


async def reply_deltas(handle: RequestHandle, reply: ReplyText, deadline: float) -> AsyncIterator[str]:
    """New reply text as tokens arrive; the request is cancelled if this ends before the engine does
    (a stop string, the deadline, or the client going away)."""
    loop = asyncio.get_running_loop()
    tokens = handle.stream()
    try:
        while not reply.stopped:
            try:
                token = await asyncio.wait_for(anext(tokens), deadline - loop.time())
            except StopAsyncIteration:
                break
            delta = reply.add(token)
            if delta:
                yield delta
        delta = reply.finish()
        if delta:
            yield delta
    finally:
        if handle.finish_reason is None:
            handle.cancel()  # frees the engine slot at its next step
        await tokens.aclose()


class Exchange:
    """One request's answer in OpenAI's shapes: the whole completion, or its stream chunks."""

    def __init__(self, model_id: str, handle: RequestHandle, reply: ReplyText):
        self.model_id, self.handle, self.reply = model_id, handle, reply
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def finish_reason(self) -> str:
        return "stop" if self.reply.stopped else self.handle.finish_reason or "stop"

    def usage(self) -> dict:
        prompt, completion = self.handle.prompt_tokens, len(self.reply.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

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
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason()}
        return {**self._envelope("chat.completion", choice), "usage": self.usage()}

    def chunk(self, delta: dict, reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return self._envelope("chat.completion.chunk", choice)


def _generation_error(error: BaseException, timeout: float) -> APIError:
    if isinstance(error, asyncio.TimeoutError):
        return APIError(504, f"the request took longer than {timeout:g}s", "timeout_error", code="timeout")
    if isinstance(error, EngineStoppedError):
        return APIError(503, "the server is shutting down", "server_error", code="unavailable")
    if isinstance(error, RequestFailedError):  # the engine logged the cause
        return APIError(500, f"generation failed: {error}", "server_error", code="generation_failed")
    logger.error("generation failed", exc_info=error)
    return APIError(500, "generation failed", "server_error")


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def cancel_on_disconnect(request: Request, handle: RequestHandle) -> None:
    """Cancel `handle` when the client hangs up (run as a task beside a non-streamed reply; a
    streamed one is cancelled by its response ending)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


# -- the app ------------------------------------------------------------------------------------------


def create_app(
    engine,
    tokenizer,
    *,
    model_id: str,
    image_policy: ImagePolicy,
    api_key: str | None,
    max_images: int = 8,
    request_timeout: float = 300,
    generation_config=None,
    sampling_defaults: Mapping[str, Any] | None = None,
    system: str = DEFAULT_SYSTEM,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    fetch_threads: int = DEFAULT_FETCH_THREADS,
) -> FastAPI:
    """The server app over a started `engine`; `sampling_defaults` are SamplingParams overrides
    applied before each request's own (the `qwenvl serve` sampling flags)."""
    config = generation_config if generation_config is not None else engine.model.generation_config
    images = ImageLoader(image_policy, fetch_threads)
    chat_format, max_window = prompt_settings(config)
    stop_ids = get_stop_words_ids(chat_format, tokenizer)
    defaults = dict(sampling_defaults or {})
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        images.close()

    app = FastAPI(title="qwenvl", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems, param = [], None
        for item in error.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
            param = param or where or None
            problems.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
        return APIError(400, "invalid request: " + "; ".join(problems), param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(
            error.status_code, f"{request.method} {request.url.path}: {error.detail}", kind
        ).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return APIError(500, "internal server error", "server_error").response()

    # the last added runs first: the key is checked before the body is read
    app.add_middleware(LimitRequestBody, limit=max_request_bytes)
    if api_key is not None:
        app.add_middleware(RequireKey, key=api_key)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        model = {"id": model_id, "object": "model", "created": started, "owned_by": "qwenvl"}
        return {"object": "list", "data": [model]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.n != 1:
            raise APIError(400, f"only n=1 is supported, got n={body.n}", param="n")
        system_text, history, query = await read_conversation(body.messages, images, max_images, system)
        # in a thread: a long conversation takes a while to tokenize
        prompt = await asyncio.to_thread(
            build_prompt, tokenizer, query, history, system_text, max_window, chat_format
        )
        del history, query  # the pictures now live in the prompt, and in the engine until its prefill
        params = sampling_params(body, config, defaults, stop_ids)
        try:
            handle = engine.submit(prompt.ids, params, prompt.images, loop=asyncio.get_running_loop())
        except EngineBusyError as error:
            raise APIError(
                503, f"the server is busy ({error}); retry later", "server_error", code="busy"
            ) from None
        except PromptTooLongError as error:
            raise APIError(400, str(error), param="messages", code="context_length_exceeded") from None
        # the boxes' pixels need only the last picture's size
        picture_size = original_size(prompt.images[-1]) if prompt.images else None
        del prompt
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        exchange = Exchange(model_id, handle, ReplyText(tokenizer, chat_format, stops))
        deadline = asyncio.get_running_loop().time() + request_timeout
        if not body.stream:
            watcher = asyncio.create_task(cancel_on_disconnect(request, handle))
            try:
                async for _ in reply_deltas(handle, exchange.reply, deadline):
                    pass
            except Exception as error:  # engine errors and the deadline
                raise _generation_error(error, request_timeout) from None
            finally:
                watcher.cancel()
            return exchange.completion(picture_size)

        async def events() -> AsyncIterator[str]:
            yield _sse(exchange.chunk({"role": "assistant", "content": ""}))
            try:
                async for delta in reply_deltas(handle, exchange.reply, deadline):
                    yield _sse(exchange.chunk({"content": delta}))
            except Exception as error:  # the response has started: report in the stream, then end it
                yield _sse(_generation_error(error, request_timeout).body())
                return
            yield _sse(exchange.chunk({}, exchange.finish_reason()))
            if body.stream_options is not None and body.stream_options.include_usage:
                yield _sse({**exchange.chunk({}), "choices": [], "usage": exchange.usage()})
            yield _sse("[DONE]")

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return app
