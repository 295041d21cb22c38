"""Request bodies refused while they stream in, once past their route's limit.

Without it a handler reads a whole body before it can tell it is too large: 100 MiB took a
second of the server's time and its memory to refuse. Here a declared Content-Length over the
limit is refused before a byte is read, and a body that runs past it is refused at that chunk.
"""

from __future__ import annotations

import json
from collections.abc import Callable

BodyLimitFor = Callable[[str, str], int | None]  # (method, path) -> max bytes, None: no body expected


class BodyLimit:
    """ASGI middleware: reads the body up to the limit, then hands it on as if unread. A request
    `admits` turns away (no or a wrong token) is handed on unread, so that the app refuses it
    without the server reading its body first."""

    def __init__(self, app, limit_for: BodyLimitFor, on_refused: Callable[[str], None] = lambda path: None,
                 admits: Callable[[dict], bool] = lambda scope: True) -> None:  # fmt: skip
        self.app, self.limit_for, self.on_refused, self.admits = app, limit_for, on_refused, admits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["method"], scope["path"]) or 0
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await self._refuse(scope, send, limit)
        if not self.admits(scope):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return await self._refuse(scope, send, limit)
            chunks.append(body)
            if not message.get("more_body"):
                break
        body, handed = b"".join(chunks), False

        async def replay():
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, send, limit: int) -> None:
        self.on_refused(scope["path"])
        detail = json.dumps({"detail": f"request body is larger than {limit} bytes"}).encode()
        # The rest of the body is never read: the connection cannot carry another request.
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(detail)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": detail})
