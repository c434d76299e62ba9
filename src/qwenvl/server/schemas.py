"""The request bodies of `POST /v1/chat/completions` and `/v1/completions`: the OpenAI fields this
server reads.

A request field that would change the reply and that this server does not implement (tools,
response_format, ...) is refused with a 400 that names it, as is a field it does not know: a
client never gets a reply that silently ignored what it asked for. A few fields that change
nothing in the reply are accepted and ignored (`ChatCompletionRequest`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs
# OpenAI request fields this server does not implement, with the values that ask for nothing
# (accepted, as is null): any other value is a 400 naming the field.
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "logit_bias": ({},),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "audio": (),
    "modalities": (["text"],),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
}


def refuse_unsupported(value: Any, field: str) -> None:
    """None for an absent or neutral value of an UNSUPPORTED_FIELDS field; else the error, which
    pydantic locates at the field (call it from the field's validator)."""
    neutral = UNSUPPORTED_FIELDS[field]
    if value is None or any(value == n for n in neutral):
        return None
    hint = " or ".join(json.dumps(n) for n in neutral)
    raise PydanticCustomError(
        "unsupported_parameter",
        "not supported by this server" + (f"; send only {hint}, or leave it out" if hint else ""),
    )


def _refuse_unsupported(cls, value: Any, info: ValidationInfo) -> None:
    return refuse_unsupported(value, info.field_name)


# A request model's optional field for each of UNSUPPORTED_FIELDS, so that an error names it.
RefusedFields = create_model(
    "RefusedFields",
    __validators__={"refuse": field_validator(*UNSUPPORTED_FIELDS, mode="before")(_refuse_unsupported)},
    **{field: (Any, None) for field in UNSUPPORTED_FIELDS},
)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None  # accepted and ignored: every image becomes 256 features


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    # "developer" is OpenAI's newer name for "system"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(RefusedFields):
    """UNSUPPORTED_FIELDS are refused unless absent, null or neutral; `n` other than 1 is refused
    where the request is handled."""

    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it, as OpenAI does

    model: str | None = None  # one of the served names (another is a 404); none: the first
    messages: list[ChatMessage]
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    # Accepted and ignored, as they change nothing in the reply: who asks (user, safety_identifier:
    # for a provider's abuse monitoring), keeping the exchange on the provider's side (store,
    # metadata), billing priority (service_tier), hints for speed only (prompt_cache_key: the prefix
    # cache needs none; prediction: predicted output), and parallel_tool_calls, which means nothing
    # without tools.
    user: str | None = None
    safety_identifier: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prediction: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_asked(self) -> int | None:
        """How many of the likeliest tokens each token's logprobs list; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(BaseModel):
    """OpenAI's legacy completions, for raw prompts (`completions.py`)."""

    model_config = ConfigDict(extra="forbid")  # suffix, best_of, ...: a 400 naming the field

    model: str | None = None
    prompt: str | list[str]  # a list of one; never token ids, which could be image or control tokens
    # qwenvl's own: images named as in chat's image_url parts, each an image span before the prompt
    images: list[str] = []
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False  # only false: the prompt's own logprobs are not computed
    user: str | None = None  # accepted and ignored, as in chat
    logit_bias: Any = None  # refused unless absent or neutral, as in chat
    presence_penalty: Any = None
    frequency_penalty: Any = None

    @field_validator("logit_bias", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _refuse_unsupported(cls, value: Any, info) -> None:
        return refuse_unsupported(value, info.field_name)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def logprobs_asked(self) -> int | None:
        return self.logprobs
