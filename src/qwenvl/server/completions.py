"""`POST /v1/completions`: OpenAI's legacy completions, for raw prompts such as the base Qwen-VL's
captioning and grounding ones (`<img>...</img>Generate the caption in English:`).

The prompt is text a client typed, encoded with only the grounding tags (`<ref>`, `<box>`,
`<quad>`) as tokens: a typed `<img>` stays text and names no file, and `<|endoftext|>` or
`<|im_start|>` stay text, never control tokens. Pictures come in the `images` field, qwenvl's
own: references as chat's `image_url` parts give them, loaded under the same policy, each one an
image span before the prompt's text, in order (where the base model's prompts put them).

The text continues the prompt's, unstripped, up to the end of text (or `<|im_end|>`), a stop
string or `max_tokens`. One completion per request (n=1). `echo` is refused: echoing with
logprobs needs the prompt's own, which the decoder does not compute.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request

from ..chat_format import GROUNDING_TAGS, ReplyText
from ..in_memory_images import image_name
from ..tokenizer import QwenVLTokenizer
from .errors import APIError
from .image_loader import ImageLoader
from .logprobs import LegacyLogprobs
from .metrics import request_timing
from .replies import (
    Exchange,
    event_stream,
    reply_deltas,
    sampling_params,
    served_model,
    sse_event,
    stop_strings,
    stream_failure,
    submit,
    whole_reply,
)
from .schemas import CompletionRequest


def prompt_text(body: CompletionRequest, max_images: int) -> str:
    """The prompt's text, once the request asks only for what this endpoint serves."""
    if body.n != 1:
        raise APIError(400, f"only n=1 is supported, got n={body.n}", param="n")
    if body.echo:
        raise APIError(400, "echo is not supported: the prompt's logprobs are not computed", param="echo")
    if isinstance(body.prompt, list) and len(body.prompt) != 1:
        raise APIError(400, f"one prompt per request, got {len(body.prompt)}", param="prompt")
    text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    if len(body.images) > max_images:
        message = f"{len(body.images)} images; this server takes at most {max_images}"
        raise APIError(400, message, param="images", code="too_many_images")
    if not text and not body.images:
        raise APIError(400, "the prompt is empty", param="prompt")
    return text


def prompt_ids(tokenizer: QwenVLTokenizer, text: str, pictures: Sequence) -> list[int]:
    """Each picture's image span, then the text with only the grounding tags as tokens."""
    ids: list[int] = []
    for picture in pictures:
        ids += tokenizer.image_span_ids(image_name(picture))
    return ids + tokenizer.encode(text, allowed_special=set(GROUNDING_TAGS))


class Completion(Exchange):
    """A completion's answer in the legacy shapes: the whole of it, or its stream chunks."""

    def __init__(self, model_id: str, handle, reply: ReplyText):
        super().__init__(model_id, handle, reply)
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.legacy_logprobs = LegacyLogprobs(reply.tokenizer)

    def choice(self, text: str, reason: str | None) -> dict:
        entries = self.new_logprobs()
        logprobs = self.legacy_logprobs.shape(entries) if entries else None
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def whole(self) -> dict:
        choice = self.choice(self.reply.text, self.finish_reason())
        return {**self._envelope("text_completion", choice), "usage": self.usage()}

    def chunk_of(self, text: str, reason: str | None = None) -> dict:
        return self._envelope("text_completion", self.choice(text, reason))


def add_completions(
    app: FastAPI,
    engine,
    tokenizer: QwenVLTokenizer,
    *,
    model_names: Sequence[str],
    images: ImageLoader,
    max_images: int,
    generation_config: Any,
    sampling_defaults: Mapping[str, Any],
    request_timeout: float,
) -> None:
    """Serve `POST /v1/completions` from `app`, over the chat endpoint's engine and images."""
    # a completion is a raw continuation: it ends where a text, or a ChatML turn, would
    stop_ids = [[tokenizer.eod_id], [tokenizer.im_end_id], [tokenizer.im_start_id]]

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        timing = request_timing(request)  # from its arrival
        model_name = served_model(body.model, model_names)
        text = prompt_text(body, max_images)
        params = sampling_params(body, generation_config, sampling_defaults, stop_ids)
        pictures = await images.load_all([(f"images[{i}]", ref) for i, ref in enumerate(body.images)])
        ids = await asyncio.to_thread(prompt_ids, tokenizer, text, pictures)
        handle = submit(engine, ids, params, pictures, param="prompt")
        del pictures  # in the engine until its prefill
        reply = ReplyText(tokenizer, stops=stop_strings(body), strip=False)
        completion = Completion(model_name, handle, reply)
        deadline = asyncio.get_running_loop().time() + request_timeout
        if not body.stream:
            await whole_reply(request, completion, deadline, request_timeout)
            return completion.whole()

        async def events() -> AsyncIterator[str]:
            try:
                async for delta in reply_deltas(handle, completion.reply, deadline, timing):
                    yield sse_event(completion.chunk_of(delta))
            except Exception as error:  # the response has started: report in the stream, then end it
                yield stream_failure(error, request_timeout, timing)
                return
            yield sse_event(completion.chunk_of("", completion.finish_reason()))
            if body.stream_options is not None and body.stream_options.include_usage:
                yield sse_event({**completion.chunk_of(""), "choices": [], "usage": completion.usage()})
            yield sse_event("[DONE]")

        return event_stream(events())
