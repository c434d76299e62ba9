"""The server's Prometheus metrics: API requests, tokens, the engine's queue and batch, latencies.

Each app has a registry of its own, so that several apps in one process (tests, a benchmark)
never add to each other's counters; `GET /metrics` serves it in Prometheus' text format. Every
`/v1/...` request is counted once, by `RecordRequests`, from what its answer turned out to be;
the handlers add what only they see: the tokens as they arrive (`RequestTiming`), a client that
left before its reply was done, and errors reported inside a stream that had already begun.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.requests import ClientDisconnect

from .errors import APIError

# Bucket bounds, in seconds. The first token's delay holds the queue, the pictures' loading and the
# prefill: tens of milliseconds for a text prompt on a GPU, a minute for several pictures on CPU.
FIRST_TOKEN_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60, 120, 300)
# One decode step of the batch: a few milliseconds on a GPU, up to a second for a big batch on CPU.
OUTPUT_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)

# Where RecordRequests leaves a request's RequestRecord in its ASGI scope, for its handler.
RECORD_KEY = "qwenvl.request_record"
# An error's body is read only for its kind; a larger one (none of this server's) is not parsed.
MAX_ERROR_BODY = 2**16


class ServerMetrics:
    """The metrics of one app over `engine` (read for `running` and `waiting` at each scrape)."""

    def __init__(self, engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "qwenvl_requests",
            "API requests answered, by endpoint and outcome: success, client_error (4xx), "
            "server_error (5xx, or an error inside a stream) or cancelled (the client left first)",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.errors = Counter(
            "qwenvl_errors",
            "error answers, by kind: the error's code (e.g. busy, timeout, model_not_found), else its type",
            ["kind"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "qwenvl_prompt_tokens", "prompt tokens of the requests given to the engine", registry=registry
        )
        self.generation_tokens = Counter(
            "qwenvl_generation_tokens", "tokens generated for the requests", registry=registry
        )
        waiting = Gauge("qwenvl_requests_waiting", "requests queued for the engine", registry=registry)
        waiting.set_function(lambda: engine.waiting)
        running = Gauge(
            "qwenvl_requests_running", "requests in the running batch (its batch size)", registry=registry
        )
        running.set_function(lambda: engine.running)
        self.first_token = Histogram(
            "qwenvl_time_to_first_token_seconds",
            "from a request's arrival (its body read) to its first token",
            buckets=FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.per_output_token = Histogram(
            "qwenvl_time_per_output_token_seconds",
            "a request's mean time per token after its first (requests of two tokens or more)",
            buckets=OUTPUT_TOKEN_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "qwenvl_e2e_request_latency_seconds",
            "from a request's arrival to its last token, for requests that ran to their end",
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )

    def exposition(self) -> tuple[bytes, str]:
        """The metrics as Prometheus' text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestRecord:
    """What one request's answer turned out to be: filled by RecordRequests as the answer goes out,
    and by its handler (through its RequestTiming) for what the HTTP status does not tell."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.timing: RequestTiming | None = None  # request_timing's
        self.status: int | None = None
        self.complete = False  # the answer's last byte was sent
        self.error_body = b""
        self.outcome: str | None = None  # the handler's word, when the status does not tell
        self.error_kind: str | None = None  # an error the handler reported inside a stream

    def settle(self) -> tuple[str, str | None]:
        """(outcome, error kind or None)."""
        if self.outcome is not None:
            return self.outcome, self.error_kind
        if self.status is None:  # no answer, and no error: the client left before its body was whole
            return "cancelled", None
        if self.status >= 400:
            return ("client_error" if self.status < 500 else "server_error"), _error_kind(self)
        return ("success" if self.complete else "cancelled"), None


def _error_kind(record: RequestRecord) -> str:
    """An error answer's kind, from its body: OpenAI's {"error": {"code", "type", ...}}."""
    try:
        error = json.loads(record.error_body)["error"]
        return str(error.get("code") or error["type"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"http_{record.status}"


class RecordRequests:
    """ASGI middleware: gives each request a RequestRecord, and counts each `/v1/...` request by
    endpoint (one of `routes`' paths, else "other") and outcome, and each error answer by kind.
    Added last, it runs first, so it also sees the answers of the middleware inside it (a missing
    key, a body over the limit). /health and /metrics are not counted: they are no API requests."""

    def __init__(self, app, metrics: ServerMetrics, routes: Sequence):
        # `routes` is the app's own list, which grows as handlers are added after this middleware
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record = scope[RECORD_KEY] = RequestRecord(self.metrics)

        async def recording_send(message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            elif message["type"] == "http.response.body":
                if record.status >= 400 and len(record.error_body) < MAX_ERROR_BODY:
                    record.error_body += message.get("body", b"")
                record.complete = not message.get("more_body", False)
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except Exception as error:
            if record.outcome is None and not isinstance(error, ClientDisconnect):
                record.outcome, record.error_kind = "server_error", "server_error"
            raise
        finally:
            path = scope["path"]
            if path.startswith("/v1"):
                known = any(getattr(route, "path", None) == path for route in self.routes)
                outcome, kind = record.settle()
                self.metrics.requests.labels(path if known else "other", outcome).inc()
                if kind is not None:
                    self.metrics.errors.labels(kind).inc()


def request_timing(request) -> RequestTiming:
    """The request's RequestTiming (`request`: a starlette Request), started by the first call: its
    handler's, on arrival."""
    record: RequestRecord = request.scope[RECORD_KEY]
    if record.timing is None:
        record.timing = RequestTiming(record)
    return record.timing


class RequestTiming:
    """One request's tokens and their times, from its arrival: the first token's delay is observed
    when it comes, the time per further token and the whole latency when the reply is whole."""

    def __init__(self, record: RequestRecord):
        self.record, self.metrics = record, record.metrics
        self.arrived = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0

    def submitted(self, prompt_tokens: int) -> None:
        """The engine has the request."""
        self.metrics.prompt_tokens.inc(prompt_tokens)

    def token(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.metrics.first_token.observe(now - self.arrived)
        self.last = now
        self.tokens += 1
        self.metrics.generation_tokens.inc()

    def ended(self, finish_reason: str) -> None:
        """The reply is whole ("stop", "length"), or the client left ("cancelled")."""
        if finish_reason == "cancelled":
            self.record.outcome = "cancelled"
            return
        if self.tokens > 1:
            self.metrics.per_output_token.observe((self.last - self.first) / (self.tokens - 1))
        self.metrics.latency.observe(time.perf_counter() - self.arrived)

    def failed_in_stream(self, error: APIError) -> None:
        """An error sent inside a stream whose 200 had already gone out."""
        self.record.outcome = "client_error" if error.status < 500 else "server_error"
        self.record.error_kind = error.code or error.kind
