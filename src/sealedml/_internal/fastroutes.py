"""The hot POST routes, served in front of Starlette's routing and middleware.

Every inference crosses two servers (gateway, instance) with a body of up to
megabytes. Through Starlette a request goes through its error and exception
middleware, the router, a ``Request`` whose body stream copies each chunk, and
SealedML's ``read_body`` which copies them again: about 0.5 ms per hop on this
project's 2-core machine, a quarter of the whole +2 ms budget of the serving
path (decision 0016). :class:`FastRoutes` answers a few POST routes itself — the
body read once against the same size limit, the handler called with it, the
same error mapping as :func:`~sealedml._internal.http.guarded` — and hands
every other request to the Starlette app unchanged, which keeps listing the
fast routes (``/openapi.json``) and answering their other methods (405).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from sealedml._internal.http import error_response, receive_body
from sealedml.errors import Error, ServiceError

__all__ = ["FastRoute", "FastRoutes", "Handler"]

log = logging.getLogger("sealedml._internal.http")

#: A fast handler: the whole body and the path's parameters in, a response out.
Handler = Callable[[bytes, dict[str, str]], Awaitable[Response]]


@dataclass(frozen=True)
class FastRoute:
    """``POST path`` served by ``handler``; ``{name}`` in the path matches one segment."""

    path: str
    handler: Handler

    def pattern(self) -> re.Pattern[str]:
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.path))
        return re.compile(f"^{regex}$")

    def listed(self) -> Route:
        """The Starlette route that lists this one (``/openapi.json``, 405 for other methods).

        :class:`FastRoutes` answers every POST to the path before the router sees it.
        """

        async def unreachable(request: Request) -> Response:
            raise ServiceError("fast route reached the router")  # pragma: no cover

        unreachable.__wrapped__ = self.handler  # type: ignore[attr-defined]  # its summary: the handler's docstring
        return Route(self.path, unreachable, methods=["POST"])


class FastRoutes:
    """An ASGI app: the fast routes' POSTs here, everything else to ``app``.

    Args:
        app: the service's Starlette app (every other route, lifespan, ops routes).
        routes: the fast routes.
        max_body: the request body limit.
        setting: (whose limit, the flag that raises it) for the refusal's message.
    """

    def __init__(
        self, app: ASGIApp, routes: Sequence[FastRoute], *, max_body: int, setting: tuple[str, str] | None = None
    ) -> None:
        self.app = app
        self._exact = {r.path: r.handler for r in routes if "{" not in r.path}
        self._patterns = [(r.pattern(), r.handler) for r in routes if "{" in r.path]
        self._max_body = max_body
        self._setting = setting

    def _match(self, path: str) -> tuple[Handler, dict[str, str]] | None:
        handler = self._exact.get(path)
        if handler is not None:
            return handler, {}
        for pattern, handler in self._patterns:
            found = pattern.match(path)
            if found is not None:
                return handler, found.groupdict()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        matched = self._match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if matched is None:
            await self.app(scope, receive, send)
            return
        handler, params = matched
        try:
            body = await receive_body(receive, _content_length(scope), self._max_body, self._setting)
            response = await handler(body, params)
        except Exception as exc:  # the last line of defence, as guarded()
            if isinstance(exc, Error):
                log.info("POST %s failed: %s", scope["path"], exc.code)
            response = error_response(exc)
        await response(scope, receive, send)


def _content_length(scope: Scope) -> str | None:
    headers: Any = scope["headers"]
    for name, value in headers:
        if name == b"content-length":
            return str(value.decode("latin-1"))
    return None
