"""The admin token: one check for our routes and for vLLM's control routes.

With ``admin_key`` set, every route that changes adapters or stops requests needs
``Authorization: Bearer <key>``: ours (``/skyrl/v1/...``) and vLLM's own that the RL
stacks call and the extension serves through the manager (LoRA load/unload, dev-mode
pause/resume/abort). vLLM's generation routes stay under vLLM's own ``--api-key``.
"""

from __future__ import annotations

import hmac
import json

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from vllm_lora_ext.protocol import error_body

#: vLLM's routes that change adapters or stop requests (present when enabled).
VLLM_CONTROL_PATHS = frozenset(
    {
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/pause",
        "/resume",
        "/abort_requests",
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


class VllmControlGuard:
    """Pure ASGI: vLLM's control routes answer 401 without the admin token."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") in VLLM_CONTROL_PATHS:
            manager = getattr(getattr(scope.get("app"), "state", None), "lora_ext", None)
            key = manager.config.admin_key if manager is not None else None
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not token_ok(given, key):
                body = json.dumps(error_body(MISSING, 401)).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
