"""The DICOMweb read routes (QIDO-RS and WADO-RS GETs) without FastAPI's per-request machinery.

A viewer sends these by the hundred per study. Through FastAPI each one is matched against the routers in
turn, has its dependencies solved, and crosses into the thread pool twice (the token check, then the route).
:class:`DicomwebReads` (pure ASGI, inside the hardening middleware) answers them itself: it matches the path
with the routes' own matchers, in the routers' order, and runs in *one* thread-pool call exactly what the
route would: :func:`viewer_api.security.authenticate_request` (the bearer token, the route's capability as
declared with ``require(...)``, refusals audited), then the route's own function. Errors become responses
through the application's exception handlers, as Starlette's ExceptionMiddleware does (built only when a route
raised: a success is sent as the route returned it). The thread-pool call goes to an executor of the process
(:data:`READ_THREADS` threads, as many as Starlette's own pool has tokens) with the request's context variables:
the same hop without anyio's capacity limiter, cancel scopes and backend lookups on each request. Routes are taken
only when their signature is the request, path parameters and the principal, with the one ``require(...)``
dependency; anything else (another method, an unknown path, another kind of route) goes on to FastAPI. Only the
routes whose path has as many segments as the request's are tried. The routes stay declared there (OpenAPI, the
route matrix) and answer the same.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi.routing import APIRoute
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from pacs.security.roles import Capability
from viewer_api.security import REQUIREMENTS, authenticate_request

PREFIX = "/dicom-web/"
READ_THREADS = 40  # anyio's default thread limit, which bounds Starlette's run_in_threadpool


@dataclass(frozen=True)
class ReadRoute:
    route: APIRoute
    capability: Capability | None


def read_routes(routes: Iterable[Any]) -> list[ReadRoute]:
    """The GET routes among ``routes`` (in order) that this path can serve as FastAPI would."""
    found = []
    for route in routes:
        if not isinstance(route, APIRoute) or route.methods != {"GET"} or not route.path.startswith(PREFIX):
            continue
        if inspect.iscoroutinefunction(route.endpoint) or route.dependencies:
            continue
        calls = [d.call for d in route.dependant.dependencies]
        if len(calls) != 1 or calls[0] not in REQUIREMENTS:
            continue
        params = set(inspect.signature(route.endpoint).parameters)
        if params != {"request", "principal", *route.param_convertors}:
            continue
        found.append(ReadRoute(route, REQUIREMENTS[calls[0]]))
    return found


_threads: tuple[int, ThreadPoolExecutor] | None = None  # (the process it was started in, the executor)
_threads_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """The process's executor for the read routes, started with its first request (a forked child starts its own:
    the parent's threads do not exist there)."""
    global _threads
    started = _threads
    if started is None or started[0] != os.getpid():
        with _threads_lock:
            if _threads is None or _threads[0] != os.getpid():
                _threads = (os.getpid(), ThreadPoolExecutor(READ_THREADS, thread_name_prefix="dicomweb-read"))
            started = _threads
    return started[1]


def _may_match(route: APIRoute, depth: int) -> bool:
    """Whether ``route`` can match a path with ``depth`` slashes."""
    own = route.path.count("/")
    return depth == own or (depth > own and ":path}" in route.path)


class DicomwebReads:
    """ASGI middleware answering the routes of ``routes`` (see the module's description)."""

    def __init__(self, app: ASGIApp, routes: Iterable[Any]) -> None:
        self.app = app
        self.routes = read_routes(routes)
        # the routes a path of n segments may match, in order (a str parameter is one segment, a path one or more):
        # the others cannot match it, and trying each one's pattern costs more than the route itself on the loop
        self._by_depth: dict[int, tuple[ReadRoute, ...]] = {}

    def _candidates(self, path: str) -> tuple[ReadRoute, ...]:
        depth = path.count("/")
        found = self._by_depth.get(depth)
        if found is None:
            found = tuple(read for read in self.routes if _may_match(read.route, depth))
            if len(self._by_depth) < 64:  # depths a client can send: bounded
                self._by_depth[depth] = found
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"].startswith(PREFIX):
            for read in self._candidates(get_route_path(scope)):
                match, child = read.route.matches(scope)
                if match is Match.FULL:
                    scope.update(child)
                    await self._serve(read, scope, receive, send)
                    return
                if match is not Match.NONE:
                    break  # FastAPI decides what a partial match means
        await self.app(scope, receive, send)

    async def _serve(self, read: ReadRoute, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        params = dict(scope.get("path_params") or {})

        def call() -> Response:
            # an API token verified within the last second is not looked up again (pacs.security.token_cache)
            principal = authenticate_request(request, read.capability, cached=True)
            response: Response = read.route.endpoint(request=request, principal=principal, **params)
            return response

        context = contextvars.copy_context()  # as run_in_threadpool: the route sees the request's context
        try:
            response = await asyncio.get_running_loop().run_in_executor(_executor(), context.run, call)
        except Exception as exc:
            failure = exc

            async def failed(scope: Scope, receive: Receive, send: Send) -> None:
                raise failure

            await self._with_handlers(scope["app"], failed)(scope, receive, send)
            return
        await response(scope, receive, send)

    def _with_handlers(self, app: Any, endpoint: ASGIApp) -> ASGIApp:
        """``endpoint`` wrapped as Starlette wraps the router: the application's exception handlers (all but
        the one for ``Exception``/500, which the outermost ServerErrorMiddleware applies)."""
        handlers = {key: value for key, value in app.exception_handlers.items() if key not in (500, Exception)}
        return ExceptionMiddleware(endpoint, handlers=handlers)  # a few dict entries: built per request
