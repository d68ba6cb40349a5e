"""HTTP helpers for the integration tests: plain and streamed completions, vLLM's
metrics."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

PROMPT = "the cat says"


def body(model: str, max_tokens: int, **extra) -> dict:
    return {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 1,
        **extra,
    }


async def complete(
    c: httpx.AsyncClient, model: str, max_tokens: int, headers: dict | None = None, **extra
) -> dict:
    r = await c.post("/v1/completions", json=body(model, max_tokens, **extra), headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def words(text: str) -> list[str]:
    return text.split()


@dataclass
class Stream:
    """A streamed completion running in the background."""

    model: str
    max_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None
    tokens: int = 0
    logprobs: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    usage: dict | None = None
    lora_versions: list[dict] | None = None
    # (tokens received after the chunk, the chunk's lora_versions or None) per chunk
    marks: list[tuple[int, list[dict] | None]] = field(default_factory=list)
    header_version: str | None = None
    chunks: list[float] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    task: asyncio.Task | None = None
    _progress: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self, c: httpx.AsyncClient, **extra) -> Stream:
        self.task = asyncio.create_task(self._run(c, extra))
        return self

    async def _run(self, c: httpx.AsyncClient, extra: dict) -> None:
        # 16 tokens a chunk: the client (on the same 2 cores) keeps pace with the engine,
        # so "the client saw tokens" implies "the engine is still generating".
        req = body(
            self.model, self.max_tokens, stream=True, stream_interval=16, return_token_ids=True
        )
        req.update(extra)
        req["stream_options"] = {"include_usage": True}
        async with c.stream("POST", "/v1/completions", json=req, headers=self.headers) as r:
            assert r.status_code == 200, await r.aread()
            self.header_version = r.headers.get("x-lora-version")
            async for line in r.aiter_lines():
                # A reader whose socket always has data never suspends; yield so one
                # fast stream cannot starve the other requests of this client.
                await asyncio.sleep(0)
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    self.usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    self.text += choice.get("text", "")
                    self.token_ids += choice.get("token_ids") or []
                    if choice.get("prompt_token_ids") and self.prompt_token_ids is None:
                        self.prompt_token_ids = choice["prompt_token_ids"]
                    lp = choice.get("logprobs") or {}
                    self.logprobs += len(lp.get("token_logprobs") or [])
                    self.tokens += len(choice.get("token_ids") or [])
                    self.marks.append((self.tokens, choice.get("lora_versions")))
                    if choice.get("finish_reason"):
                        self.finish_reason = choice["finish_reason"]
                        self.stop_reason = choice.get("stop_reason")
                        self.lora_versions = choice.get("lora_versions")
                self.chunks.append(asyncio.get_running_loop().time())
                self._progress.set()

    async def wait_tokens(self, n: int, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while self.tokens < n:
                assert self.task is not None
                if self.task.done():
                    self.task.result()
                    raise AssertionError(f"stream ended after {self.tokens} tokens, wanted {n}")
                self._progress.clear()
                await self._progress.wait()

    async def result(self, timeout: float = 120) -> Stream:
        assert self.task is not None
        await asyncio.wait_for(self.task, timeout)
        return self


async def loras(c: httpx.AsyncClient) -> dict[str, dict]:
    r = await c.get("/skyrl/v1/loras")
    assert r.status_code == 200
    return {a["lora_name"]: a for a in r.json()["adapters"]}


async def wait_in_flight(c: httpx.AsyncClient, name: str, n: int, timeout: float = 30) -> None:
    """Until ``n`` requests of ``name`` were admitted by the server (leased a version)."""
    async with asyncio.timeout(timeout):
        while (await loras(c))[name]["in_flight"] < n:  # noqa: ASYNC110 (remote state)
            await asyncio.sleep(0.02)


async def post(c: httpx.AsyncClient, path: str, payload: dict, status: int = 200) -> dict:
    r = await c.post(f"/skyrl/v1/{path}", json=payload)
    assert r.status_code == status, (r.status_code, r.text)
    return r.json()


def server_pid(url: str) -> int:
    """The process listening on ``url``'s port (the session server, or a debug one)."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    return next(
        c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid
    )


def vllm_metric(url: str, name: str) -> float:
    """A sample of a replica's ``/metrics`` (e.g. ``vllm:prefix_cache_hits_total``),
    summed over its series."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    families = text_string_to_metric_families(text)
    return sum(s.value for f in families for s in f.samples if s.name == name)
