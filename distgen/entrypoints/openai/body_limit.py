"""A cap on request bodies: larger ones are answered 413 before they are read, so no route parses,
validates or tokenizes them, and the event loop serves everyone else meanwhile."""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from distgen.entrypoints.openai.errors import error_response


class BodyLimit:
    """ASGI middleware: a declared ``Content-Length`` over ``limit`` bytes is refused at once; a body
    sent without one (chunked) is counted as it arrives and refused when it passes the limit. The
    route then sees the client gone, and whatever it would answer is dropped."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    def _too_large(self, size: str) -> JSONResponse:
        return error_response(
            f"the request body is {size}, over this server's limit of {self.limit} bytes "
            "(--max-request-body-size)",
            413,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.limit <= 0:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(f"{int(declared)} bytes")(scope, receive, send)
            return
        received, refused = 0, False

        async def counted() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = True
                    await self._too_large(f"over {self.limit} bytes")(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted, guarded_send)
