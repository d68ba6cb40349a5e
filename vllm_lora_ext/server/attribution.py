"""Which adapter version produced which tokens, reported in the OpenAI responses.

An RL trainer needs this for off-policy correction when a continuation spans a swap.
The gate records, per engine request, the spans of each sample in the book of the HTTP
request being served (:class:`SpanBook`, one per request, found through a context
variable); :class:`AttributionMiddleware` adds them to vLLM's own responses:

- every choice gets ``lora_versions: [{"version", "start", "end"}]`` (token offsets into
  that choice's completion; in a stream, every chunk carries its choice's spans so far,
  so a client whose stream broke off knows which version made each token it kept);
- the response header ``x-lora-version`` names the final version (for a stream, whose
  headers leave before any token, the version the request was admitted on).

Requests on the base model or on adapters we do not manage are left untouched.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_lora_ext.server.continuation import Sample, Span

VERSION_HEADER = "x-lora-version"
ATTRIBUTED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/inference/v1/generate"})


@dataclass
class _Record:
    admitted: int
    samples: Sequence[Sample]

    def per_sample(self) -> list[list[Span]]:
        return [list(s.spans) for s in self.samples]


class SpanBook:
    """The spans of the engine requests one HTTP request made (engine request id ->
    per-sample spans). One book per HTTP request, so ids repeated across requests (a
    shared ``X-Request-Id``) never mix, and a book ends with its request."""

    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}

    def __len__(self) -> int:
        return len(self._records)

    def track(self, request_id: str, samples: Sequence[Sample], admitted: int) -> None:
        self._records.setdefault(request_id, _Record(admitted, samples))

    def _ids(self, response_id: str) -> list[str]:
        # Chat uses the response id itself; completions run one engine request per
        # prompt, "<id>-<i>", whose samples make up the choices in prompt order.
        if response_id in self._records:
            return [response_id]
        ids, i = [], 0
        while f"{response_id}-{i}" in self._records:
            ids.append(f"{response_id}-{i}")
            i += 1
        return ids

    def admitted(self, response_id: str) -> int | None:
        ids = self._ids(response_id)
        return self._records[ids[0]].admitted if ids else None

    def choices(self, response_id: str) -> list[list[Span]] | None:
        """Spans per choice index, or None if the response is not ours."""
        ids = self._ids(response_id)
        if not ids:
            return None
        return [spans for rid in ids for spans in self._records[rid].per_sample()]


_BOOK: ContextVar[SpanBook | None] = ContextVar("lora_ext_span_book", default=None)


def current_book() -> SpanBook | None:
    """The book of the HTTP request being served, if its route is annotated."""
    return _BOOK.get()


@contextlib.contextmanager
def recording() -> Iterator[SpanBook]:
    """Record the spans of the engine requests made inside this block (one HTTP
    request) in a new book."""
    book = SpanBook()
    token = _BOOK.set(book)
    try:
        yield book
    finally:
        _BOOK.reset(token)


def spans_json(spans: list[Span]) -> list[dict[str, int]]:
    return [{"version": s.version, "start": s.start, "end": s.end} for s in spans]


def final_version(per_choice: list[list[Span]], admitted: int) -> int:
    last = [spans[-1].version for spans in per_choice if spans]
    return max(last) if last else admitted


def annotate(body: dict[str, Any], book: SpanBook) -> int | None:
    """Add ``lora_versions`` to the choices of one response or stream chunk (the spans
    so far); returns the final version, or None."""
    rid = _response_id(body)
    choices = body.get("choices")
    if not isinstance(rid, str) or not isinstance(choices, list):
        return None
    per_choice = book.choices(rid)
    admitted = book.admitted(rid)
    if per_choice is None or admitted is None:
        return None
    for choice in choices:
        index = choice.get("index") if isinstance(choice, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(per_choice):
            continue
        choice["lora_versions"] = spans_json(per_choice[index])
    return final_version(per_choice, admitted)


def _response_id(body: dict[str, Any]) -> Any:
    """OpenAI responses name it ``id``; vLLM's token-in/token-out ``request_id``."""
    return body.get("id") or body.get("request_id")


def _header(message: Message, name: str) -> str | None:
    for key, value in message.get("headers", []):
        if key.decode("latin-1").lower() == name:
            return value.decode("latin-1")
    return None


def _set_header(message: Message, name: str, value: str) -> None:
    headers = [(k, v) for k, v in message.get("headers", []) if k.decode("latin-1").lower() != name]
    headers.append((name.encode("latin-1"), value.encode("latin-1")))
    message["headers"] = headers


class AttributionMiddleware:
    """Pure ASGI (no buffering of other routes; streams stay streams)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _annotated(scope):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        mode: str | None = None  # "json", "sse" or "pass"
        chunks: list[bytes] = []
        sse_tail = b""
        response_id: str | None = None

        async def wrapped(message: Message) -> None:
            nonlocal start, mode, sse_tail, response_id
            if message["type"] == "http.response.start":
                start = message
                ctype = _header(message, "content-type") or ""
                if message.get("status") != 200:
                    mode = "pass"
                elif ctype.startswith("application/json"):
                    mode = "json"
                elif ctype.startswith("text/event-stream"):
                    mode = "sse"
                else:
                    mode = "pass"
                if mode == "pass":
                    await send(message)
                    start = None
                return
            if message["type"] != "http.response.body" or mode == "pass":
                await send(message)
                return
            if mode == "json":
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                raw = b"".join(chunks)
                out, version = _annotate_json(raw, book)
                assert start is not None
                if version is not None:
                    _set_header(start, VERSION_HEADER, str(version))
                _set_header(start, "content-length", str(len(out)))
                await send(start)
                await send({"type": "http.response.body", "body": out, "more_body": False})
                return
            # Server-sent events: annotate whole events, pass the rest on as it comes.
            data = sse_tail + message.get("body", b"")
            events = data.split(b"\n\n")
            sse_tail = events.pop()
            out_events = []
            for event in events:
                text = event.decode("utf-8")
                if text.startswith("data: ") and text != "data: [DONE]":
                    try:
                        body = json.loads(text[6:])
                    except ValueError:
                        body = None
                    if isinstance(body, dict):
                        response_id = response_id or _response_id(body)
                        if annotate(body, book) is not None:
                            text = "data: " + json.dumps(body, separators=(",", ":"))
                out_events.append(text.encode("utf-8") + b"\n\n")
            more = message.get("more_body", False)
            if not more and sse_tail:
                out_events.append(sse_tail)
                sse_tail = b""
            if not out_events and more:
                return  # no whole event yet: headers wait for the first one (its id)
            if start is not None:
                admitted = book.admitted(response_id) if response_id else None
                if admitted is not None:
                    _set_header(start, VERSION_HEADER, str(admitted))
                await send(start)
                start = None
            if out_events or not more:
                await send(
                    {"type": "http.response.body", "body": b"".join(out_events), "more_body": more}
                )

        with recording() as book:
            await self.app(scope, receive, wrapped)


def _annotated(scope: Scope) -> bool:
    return (
        scope["type"] == "http"
        and scope.get("method") == "POST"
        and scope.get("path") in ATTRIBUTED_PATHS
    )


def _annotate_json(raw: bytes, book: SpanBook) -> tuple[bytes, int | None]:
    try:
        body = json.loads(raw)
    except ValueError:
        return raw, None
    if not isinstance(body, dict):
        return raw, None
    version = annotate(body, book)
    if version is None:
        return raw, None
    return json.dumps(body, separators=(",", ":")).encode("utf-8"), version
