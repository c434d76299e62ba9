"""ASGI middleware that answers before the app reads a request: the API key, and the body's size."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers

from .errors import APIError

# Eight pictures as data URLs of 4-5 MB each, with room for a long conversation; a body is held
# whole in memory (and parsed into a copy), so the limit bounds what one request can take.
DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20


class RequireKey:
    """`/v1/...` needs `Authorization: Bearer <key>`, checked before the body is read."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.key):
                message = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                error = APIError(401, message, "authentication_error", code="invalid_api_key")
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


class LimitRequestBody:
    """A body over `limit` bytes is answered 413: at once when its Content-Length says so, else as
    soon as the bytes received pass the limit (a chunked upload). A body within it is read whole
    here and handed to the app as one message; later `receive` calls (the client hanging up) go
    through."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body was complete
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        # held only until the app takes it: the app's parsed copy is all that stays
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
        del chunks

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        error = APIError(
            413,
            f"the request body is larger than this server's limit of {self.limit} bytes",
            param=None,
            code="request_too_large",
        )
        await error.response()(scope, receive, send)
