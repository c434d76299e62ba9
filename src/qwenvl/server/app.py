"""The HTTP app: OpenAI chat requests -> qwenvl prompts -> the engine -> OpenAI responses.

Nothing here generates: the engine's worker loop batches every request, and handlers only
await their tokens (`replies`), so the event loop stays free while the model runs. Images are loaded in
thread pools of their own (`image_loader`), under the operator's image policy; text a user types
is always plain text. A request that fails in the engine fails alone; a client that hangs up
frees its place in the batch within a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from ..chat_format import DEFAULT_SYSTEM, ReplyText, get_stop_words_ids, prompt_settings
from ..conversation import Message, build_prompt
from ..images import ImagePolicy, original_size
from .completions import add_completions
from .errors import APIError
from .image_loader import DEFAULT_FETCH_THREADS, ImageLoader
from .metrics import RecordRequests, ServerMetrics, request_timing
from .middleware import DEFAULT_MAX_REQUEST_BYTES, LimitRequestBody, RequireKey
from .replies import (
    Exchange,
    event_stream,
    reply_boxes,
    reply_deltas,
    sampling_params,
    served_model,
    sse_event,
    stop_strings,
    stream_failure,
    submit,
    whole_reply,
)
from .schemas import ChatCompletionRequest, ChatMessage, ImagePart

logger = logging.getLogger(__name__)

# OpenAI's error codes for pydantic's errors of a request field it does not know, and of one it
# knows but this server does not take (schemas.UNSUPPORTED_FIELDS)
VALIDATION_CODES = {"extra_forbidden": "unknown_parameter", "unsupported_parameter": "unsupported_parameter"}


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


# -- the app ------------------------------------------------------------------------------------------


def create_app(
    engine,
    tokenizer,
    *,
    model_id: str | Sequence[str],
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
    applied before each request's own (the `qwenvl serve` sampling flags).

    `model_id`: the model's name, or its names, as requests give it (`served_model`). `/metrics`
    (Prometheus) and `/health` need no API key, as in vLLM: a scraper or a load balancer's probe
    usually has none, and they show counts and timings, never a request's content."""
    model_names = (model_id,) if isinstance(model_id, str) else tuple(model_id)
    if not model_names:
        raise ValueError("the model needs at least one name")
    metrics = ServerMetrics(engine)
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
        problems, param, code = [], None, None
        for item in error.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
            param = param or where or None
            code = code or VALIDATION_CODES.get(item.get("type"))
            message = "unknown parameter" if item.get("type") == "extra_forbidden" else item.get("msg")
            problems.append(f"{where}: {message}" if where else str(message))
        return APIError(400, "invalid request: " + "; ".join(problems), param=param, code=code).response()

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
    app.add_middleware(RecordRequests, metrics=metrics, routes=app.router.routes)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        content, content_type = metrics.exposition()
        return Response(content, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        cards = [
            {"id": name, "object": "model", "created": started, "owned_by": "qwenvl"} for name in model_names
        ]
        return {"object": "list", "data": cards}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        timing = request_timing(request)  # from its arrival
        model_name = served_model(body.model, model_names)
        if body.n != 1:
            raise APIError(400, f"only n=1 is supported, got n={body.n}", param="n")
        system_text, history, query = await read_conversation(body.messages, images, max_images, system)
        # in a thread: a long conversation takes a while to tokenize
        prompt = await asyncio.to_thread(
            build_prompt, tokenizer, query, history, system_text, max_window, chat_format
        )
        del history, query  # the pictures now live in the prompt, and in the engine until its prefill
        params = sampling_params(body, config, defaults, stop_ids)
        handle = submit(engine, prompt.ids, params, prompt.images, param="messages")
        # the boxes' pixels need only the last picture's size
        picture_size = original_size(prompt.images[-1]) if prompt.images else None
        del prompt
        exchange = Exchange(model_name, handle, ReplyText(tokenizer, chat_format, stop_strings(body)))
        deadline = asyncio.get_running_loop().time() + request_timeout
        if not body.stream:
            await whole_reply(request, exchange, deadline, request_timeout)
            return exchange.completion(picture_size)

        async def events() -> AsyncIterator[str]:
            yield sse_event(exchange.chunk({"role": "assistant", "content": ""}))
            try:
                async for delta in reply_deltas(handle, exchange.reply, deadline, timing):
                    yield sse_event(exchange.chunk({"content": delta}))
            except Exception as error:  # the response has started: report in the stream, then end it
                yield stream_failure(error, request_timeout, timing)
                return
            # the whole reply's boxes, as a reply in one piece has them in its message
            boxes = reply_boxes(exchange.reply.text, picture_size)
            yield sse_event(exchange.chunk({"boxes": boxes}, exchange.finish_reason()))
            if body.stream_options is not None and body.stream_options.include_usage:
                yield sse_event({**exchange.chunk({}), "choices": [], "usage": exchange.usage()})
            yield sse_event("[DONE]")

        return event_stream(events())

    add_completions(
        app,
        engine,
        tokenizer,
        model_names=model_names,
        images=images,
        max_images=max_images,
        generation_config=config,
        sampling_defaults=defaults,
        request_timeout=request_timeout,
    )
    return app
