"""A scripted stand-in for a lora_ext server, for the client's unit tests.

``/v1/completions`` makes token ``100 + p`` at sequence position ``p`` (logprob
``-p / 1000``), so a continuation from ``prompt + tokens so far`` must reproduce exactly
what one uninterrupted run makes. Each call takes the next scripted action:
``("ok",)``, ``("abort", k)`` (stop after k tokens with finish ``abort``, sample 0 only
unless ``samples`` says), or ``(status, message)`` for an error answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

PROMPT_IDS = [1, 2, 3]


@dataclass
class FakeServer:
    script: list[tuple] = field(default_factory=list)
    version: int = 1
    calls: list[dict[str, Any]] = field(default_factory=list)
    control: list[tuple[str, dict | None]] = field(default_factory=list)
    control_fail: dict[str, int] = field(default_factory=dict)  # route -> status
    made: int = 0  # tokens generated in all
    call_versions: list[int] = field(default_factory=list)  # adapter version per call
    healthy: bool = True
    health_checks: int = 0
    short_logprobs: int = 0  # calls whose logprobs miss the last token (a broken server)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/skyrl/v1/{op}", self.op, methods=["GET", "POST"]),
            ]
        )

    async def completions(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.calls.append(body)
        action = self.script.pop(0) if self.script else ("ok",)
        if self.call_versions:
            self.version = self.call_versions[min(len(self.calls), len(self.call_versions)) - 1]
        if isinstance(action[0], int):
            return JSONResponse({"error": action[1]}, status_code=action[0])
        prompt = body["prompt"]
        ids = list(prompt) if isinstance(prompt, list) else list(PROMPT_IDS)
        choices = []
        for i in range(body["n"]):
            limit = body["max_tokens"]
            finish = "length"
            if action[0] == "abort" and i in (action[2] if len(action) > 2 else (0,)):
                limit, finish = min(action[1], limit), "abort"
            start = len(ids)
            tokens = [100 + p for p in range(start, start + limit)]
            self.made += len(tokens)
            logprobs = [-(p / 1000) for p in range(start, start + limit)]
            if self.short_logprobs and logprobs:
                self.short_logprobs -= 1
                logprobs.pop()
            choices.append(
                {
                    "index": i,
                    "text": "".join(f"<{t}>" for t in tokens),
                    "token_ids": tokens,
                    "prompt_token_ids": ids,
                    "logprobs": {"token_logprobs": logprobs},
                    "finish_reason": finish,
                    "stop_reason": None,
                    "lora_versions": [{"version": self.version, "start": 0, "end": limit}]
                    if limit
                    else [],
                }
            )
        return JSONResponse(
            {"id": "cmpl-x", "choices": choices}, headers={"x-lora-version": str(self.version)}
        )

    async def health(self, request: Request) -> JSONResponse:
        self.health_checks += 1
        return JSONResponse({}, status_code=200 if self.healthy else 503)

    async def op(self, request: Request) -> JSONResponse:
        op = request.path_params["op"]
        body = await request.json() if request.method == "POST" else None
        self.control.append((op, body))
        if op in self.control_fail:
            return JSONResponse({"error": f"{op} refused"}, status_code=self.control_fail[op])
        if op == "loras":
            return JSONResponse({"adapters": [{"lora_name": "meow", "version": self.version}]})
        if op == "load_lora_adapter":
            self.version += 1
            return JSONResponse({"lora_name": body["lora_name"], "version": self.version})
        return JSONResponse({"ok": True, **(body or {})})


class Replicas(httpx.AsyncBaseTransport):
    """Routes by host to fake servers; hosts in ``down`` refuse connections."""

    def __init__(self, servers: dict[str, FakeServer]) -> None:
        self.servers = servers
        self.transports = {h: httpx.ASGITransport(app=s.app()) for h, s in servers.items()}
        self.down: set[str] = set()
        self.refused: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host in self.down:
            self.refused.append(host)
            raise httpx.ConnectError("connection refused", request=request)
        return await self.transports[host].handle_async_request(request)


def expected_tokens(n: int, prompt_len: int = len(PROMPT_IDS)) -> list[int]:
    return [100 + p for p in range(prompt_len, prompt_len + n)]
