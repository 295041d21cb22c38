"""HTTP answers for requests that go wrong: query parameters outside their range get a 400
naming the parameter, in each API's own error shape, and anything unexpected a 500 that
leaves the keep-alive connection usable."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("deeptrace.server")


def describe(e: RequestValidationError) -> str:
    """`offset: Input should be less than or equal to 1000000`, one clause per bad parameter."""
    return "; ".join(f"{'.'.join(map(str, err['loc'][1:])) or 'request'}: {err['msg']}" for err in e.errors())


def answering_400(respond: Callable[[str], Response]) -> type[APIRoute]:
    """A route class whose invalid parameters get respond(message), a 400: the issue asked for
    400 where FastAPI answers 422, and Jaeger's clients read errors from its envelope."""

    class Route(APIRoute):
        def get_route_handler(self) -> Callable:
            handle = super().get_route_handler()

            async def checked(request: Request) -> Response:
                try:
                    return await handle(request)
                except RequestValidationError as e:
                    return respond(describe(e))

            return checked

    return Route


class InternalErrors:
    """A 500 in JSON for an unexpected exception. Starlette's own handler re-raises after its
    500, and uvicorn then drops the connection: a client's next request on it was reset."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if started:  # half an answer is out: only closing the connection ends it
                raise
            await JSONResponse({"detail": "internal error"}, status_code=500)(scope, receive, send)


def install(app: FastAPI) -> None:
    """Once per app; a second call changes nothing."""
    if not any(m.cls is InternalErrors for m in app.user_middleware):
        app.add_middleware(InternalErrors)
