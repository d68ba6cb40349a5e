"""A scripted stand-in for a lora_ext server, for the client's unit tests.

``/v1/completions`` makes token ``100 + p`` at sequence position ``p`` (logprob
``-p / 1000``), so a continuation from ``prompt + tokens so far`` must reproduce exactly
what one uninterrupted run makes. Each call takes the next scripted action:
``("ok",)``, ``("abort", k)`` (stop after k tokens with finish ``abort``, sample 0 only
unless ``samples`` says), or ``(status, message)`` for an error answer. Streamed
(``"stream": true``), it sends what vLLM sends (per choice: token and logprob deltas,
prompt ids on the first, the finish reason on the last; nothing for a choice without a
token), with our version spans so far on every chunk; ``("die", k)`` breaks the stream
off after k tokens of each choice (the replica died: :class:`Replicas` turns it into the
transport error httpx raises), and ``("error", k[, code])`` ends it with vLLM's
mid-stream error event (code 500 unless given).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
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

    async def completions(self, request: Request) -> Response:
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
            finish: str | None = "length"
            if action[0] == "abort" and i in (action[2] if len(action) > 2 else (0,)):
                limit, finish = min(action[1], limit), "abort"
            if action[0] in ("die", "error"):
                limit, finish = min(action[1], limit), None
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
        headers = {"x-lora-version": str(self.version)}
        if body.get("stream"):
            events = list(self.stream_events(choices))
            if action[0] == "die":
                events.append("data: [DIE]\n\n")
            elif action[0] == "error":
                code = action[2] if len(action) > 2 else 500
                error = {"error": {"message": f"failed with {code}", "code": code}}
                events.append(f"data: {json.dumps(error)}\n\n")
            else:
                events.append("data: [DONE]\n\n")
            return StreamingResponse(iter(events), media_type="text/event-stream", headers=headers)
        return JSONResponse({"id": "cmpl-x", "choices": choices}, headers=headers)

    @staticmethod
    def stream_events(choices: list[dict[str, Any]]):
        for c in choices:
            i, tokens, lps = c["index"], c["token_ids"], c["logprobs"]["token_logprobs"]
            span = c["lora_versions"][0]["version"] if c["lora_versions"] else 0
            for k, t in enumerate(tokens):
                last = k == len(tokens) - 1
                delta = {
                    "index": i,
                    "text": f"<{t}>",
                    "token_ids": [t],
                    # a broken server's logprobs miss the last token
                    "logprobs": {"token_logprobs": lps[k : k + 1]},
                }
                # Like our server: spans where one starts (the first token) and on the
                # choice's last chunk; the client extends them over the chunks between.
                if k == 0 or (last and c["finish_reason"] is not None):
                    delta["lora_versions"] = [{"version": span, "start": 0, "end": k + 1}]
                if k == 0:
                    delta["prompt_token_ids"] = c["prompt_token_ids"]
                if last and c["finish_reason"] is not None:
                    delta["finish_reason"] = c["finish_reason"]
                yield _event(delta)
            # Like vLLM: a choice that ends without a token sends nothing at all (its
            # empty chunk is skipped, prompt ids with it).

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


def _event(choice: dict[str, Any]) -> str:
    return "data: " + json.dumps({"id": "cmpl-x", "choices": [choice]}) + "\n\n"


class _BrokenOff(httpx.AsyncByteStream):
    """A body that stops where the server died, as httpx reports it."""

    def __init__(self, sent: bytes) -> None:
        self.sent = sent

    async def __aiter__(self):
        yield self.sent
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")


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
        response = await self.transports[host].handle_async_request(request)
        body = await response.aread()
        if b"data: [DIE]" not in body:
            return httpx.Response(response.status_code, headers=response.headers, content=body)
        sent = body[: body.index(b"data: [DIE]")]
        return httpx.Response(
            response.status_code, headers=response.headers, stream=_BrokenOff(sent)
        )


def expected_tokens(n: int, prompt_len: int = len(PROMPT_IDS)) -> list[int]:
    return [100 + p for p in range(prompt_len, prompt_len + n)]
