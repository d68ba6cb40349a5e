"""The admin key: deny by default, decided on the routed path.

With ``admin_key`` set, every route of the app needs ``Authorization: Bearer <key>``
except an explicit list of generation and read-only routes (:data:`OPEN`). The list is
matched against the app's own route table, the way Starlette routes a request (so
``--root-path`` cannot open a guarded route, and a path that matches no route is
guarded), and the table is read at start-up and logged: a route a future vLLM adds is
guarded unless it is added here. vLLM's generation routes stay under vLLM's own
``--api-key``.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Iterable
from typing import Any

from pydantic import SecretStr
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from vllm_lora_ext.protocol import error_body

logger = logging.getLogger("vllm.lora_ext")

#: (method, route path) that answer without the admin key: generation, tokenization
#: and read-only state. Everything else (control, weight sync, sleep, collective RPC,
#: adapter registration, docs, routes we do not know yet) needs it.
OPEN: frozenset[tuple[str, str]] = frozenset(
    {
        *(
            ("POST", p)
            for p in (
                "/v1/completions",
                "/v1/chat/completions",
                "/v1/chat/completions/batch",
                "/v1/responses",
                "/v1/messages",
                "/v1/messages/count_tokens",
                "/inference/v1/generate",
                "/generative_scoring",
                "/invocations",
                "/tokenize",
                "/detokenize",
                "/ping",
                "/v1/embeddings",
                "/pooling",
                "/classify",
                "/score",
                "/v1/score",
                "/rerank",
                "/v1/rerank",
                "/v2/rerank",
                "/v1/audio/transcriptions",
                "/v1/audio/translations",
            )
        ),
        *(
            ("GET", p)
            for p in (
                "/health",
                "/liveness",  # prime-rl's probe (stack_routes)
                "/ping",
                "/version",
                "/load",
                "/metrics",
                "/v1/models",
                "/skyrl/v1/loras",
            )
        ),
    }
)
MISSING = "missing or wrong admin token (Authorization: Bearer ...)"


def token_ok(authorization: str | None, key: SecretStr | None) -> bool:
    if key is None:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.encode(), key.get_secret_value().encode()
    )


def is_open(method: str, path: str) -> bool:
    return (method, path) in OPEN or (method == "HEAD" and ("GET", path) in OPEN)


def _route_open(route: BaseRoute) -> bool:
    """A route is open only if every method it serves is on the list."""
    methods = getattr(route, "methods", None)
    path = getattr(route, "path", None)
    if not methods or path is None:  # mounts, websockets: guarded
        return False
    return all(is_open(m, path) for m in methods if m != "HEAD")


class RouteTable:
    """Which routes of one app answer without the key (read once, at start-up)."""

    MAX_CACHED = 4096

    def __init__(self, routes: Iterable[BaseRoute]) -> None:
        self.routes = list(routes)
        self._open = {id(r) for r in self.routes if _route_open(r)}
        self._cache: dict[tuple[str, str, str], bool] = {}

    def describe(self) -> tuple[list[str], list[str]]:
        """(open, guarded) as ``METHOD path`` lines."""
        opened, guarded = [], []
        for r in self.routes:
            methods = sorted(getattr(r, "methods", None) or ["*"])
            line = f"{','.join(methods)} {getattr(r, 'path', type(r).__name__)}"
            (opened if id(r) in self._open else guarded).append(line)
        return opened, guarded

    def allows(self, scope: Scope) -> bool:
        """Whether the route this request reaches is open (routed as Starlette does,
        root path included); no route, or only a partial match: guarded."""
        key = (scope.get("method", ""), scope.get("root_path", ""), scope.get("path", ""))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        allowed = False
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                allowed = id(route) in self._open
                break
        if len(self._cache) >= self.MAX_CACHED:
            self._cache.clear()
        self._cache[key] = allowed
        return allowed


def log_refusal(scope: Scope, status: int) -> None:
    client = scope.get("client")
    record = {
        "event": "lora_ext.control",
        "action": scope.get("path", "").rstrip("/").rsplit("/", 1)[-1],
        "method": scope.get("method"),
        "path": scope.get("path"),
        "who": client[0] if client else None,
        "status": status,
        "outcome": "refused",
        "error": MISSING,
        "latency_ms": 0.0,
    }
    logger.warning("%s", json.dumps(record))


class AdminGuard:
    """Pure ASGI, outermost: a request for a route not in :data:`OPEN` answers 401
    without the admin key. ``key_of`` gives the configured key (None: no key, every
    route open, as vLLM)."""

    def __init__(self, app: ASGIApp, key_of: Any) -> None:
        self.app = app
        self.key_of = key_of
        self.table: RouteTable | None = None

    def table_of(self, scope: Scope) -> RouteTable:
        if self.table is None:
            self.table = RouteTable(scope["app"].router.routes)
            opened, guarded = self.table.describe()
            if self.key_of() is None:
                logger.warning(
                    "lora_ext: no admin key set: all %d routes answer without one",
                    len(opened) + len(guarded),
                )
            else:
                logger.info(
                    "lora_ext: open without the admin key: %s | guarded: %s",
                    "; ".join(opened),
                    "; ".join(guarded),
                )
        return self.table

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Not a coroutine: a request that needs no key is handed on as it is, with no
        frame of ours in its chain (every request passes here)."""
        kind = scope["type"]
        if kind == "lifespan":
            self.table_of(scope)  # read and log the table before serving
        elif kind == "http" or kind == "websocket":
            key = self.key_of()
            if key is not None and not self.table_of(scope).allows(scope):
                return self._checked(scope, receive, send, key)
        return self.app(scope, receive, send)

    async def _checked(self, scope: Scope, receive: Receive, send: Send, key: SecretStr) -> None:
        """A guarded route: served with the admin key, else refused (401)."""
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        if not token_ok(given, key):
            await _refuse(scope, send)
            log_refusal(scope, 401)
            return
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, send: Send) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps(error_body(MISSING, 401)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
