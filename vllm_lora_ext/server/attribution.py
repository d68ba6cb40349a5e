"""Which adapter version produced which tokens, reported in the OpenAI responses.

An RL trainer needs this for off-policy correction when a continuation spans a swap.
The gate records, per engine request, the spans of each sample in the book of the HTTP
request being served (:class:`SpanBook`, one per request, found through a context
variable); :func:`annotate_routes` adds them to vLLM's own responses:

- every choice gets ``lora_versions: [{"version", "start", "end"}]`` (token offsets into
  that choice's completion). In a stream, a chunk carries its choice's spans so far when
  they gained a span since the choice's last annotated chunk (its first tokens, a new
  version) and on the choice's last chunk; the chunks between carry none, as stock vLLM
  sends them. So a client whose stream broke off knows which version made each token it
  kept: the last spans it received, the last one extended to its tokens (no version
  changes without a chunk saying so). Annotating every chunk was most of what the plugin
  added to a streamed token's cost;
- the response header ``x-lora-version`` names the final version (for a stream, whose
  headers leave before any token, the version the request was admitted on).

Requests on the base model or on adapters we do not manage are left untouched.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from vllm_lora_ext.server.continuation import Sample, Span

VERSION_HEADER = "x-lora-version"
_VERSION_KEY = VERSION_HEADER.encode()
ATTRIBUTED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/inference/v1/generate"})


class SpanBook:
    """The spans of the engine requests one HTTP request made (engine request id ->
    per-sample spans). One book per HTTP request, so ids repeated across requests (a
    shared ``X-Request-Id``) never mix, and a book ends with its request.

    Per request, every object and every line of code is memory the CPU fetches again
    (the path's cost beyond its instructions, bench/RESULTS.md): a record is a tuple,
    the join cache is made when a response needs one, and the ``send`` of an annotated
    stream is its book."""

    __slots__ = ("_records", "_resolved")

    def __init__(self) -> None:
        # engine request id -> (admitted version, its samples)
        self._records: dict[str, tuple[int, Sequence[Sample]]] = {}
        # response id -> (records seen when resolved, its samples in choice order,
        # admitted version): resolved once per response, not per streamed chunk.
        self._resolved: dict[str, tuple[int, list[Sample], int]] | None = None

    def __len__(self) -> int:
        return len(self._records)

    def track(self, request_id: str, samples: Sequence[Sample], admitted: int) -> None:
        self._records.setdefault(request_id, (admitted, samples))

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

    def lookup(self, response_id: str) -> tuple[Sequence[Sample], int] | None:
        """The response's samples in choice order (live: their spans grow) and the
        version it was admitted on; None if the response is not ours."""
        records = self._records
        if len(records) == 1:  # most requests: one engine request, nothing to join
            record = records.get(response_id) or records.get(response_id + "-0")
            if record is not None:
                return record[1], record[0]
        resolved = self._resolved
        if resolved is None:
            resolved = self._resolved = {}
        known = resolved.get(response_id)
        if known is not None and known[0] == len(self._records):
            return known[1], known[2]
        ids = self._ids(response_id)
        if not ids:
            return None
        joined = [s for rid in ids for s in self._records[rid][1]]
        admitted = self._records[ids[0]][0]
        resolved[response_id] = (len(self._records), joined, admitted)
        return joined, admitted

    def admitted(self, response_id: str) -> int | None:
        found = self.lookup(response_id)
        return found[1] if found is not None else None

    def choices(self, response_id: str) -> list[list[Span]] | None:
        """Spans per choice index (a copy), or None if the response is not ours."""
        found = self.lookup(response_id)
        return [list(s.spans) for s in found[0]] if found is not None else None


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


def final_version(samples: Sequence[Sample], admitted: int) -> int:
    """The newest version that made a choice's last tokens; ``admitted`` if none did."""
    final = None
    for sample in samples:
        spans = sample.spans
        if spans and (final is None or spans[-1].version > final):
            final = spans[-1].version
    return admitted if final is None else final


def annotate(
    body: dict[str, Any], book: SpanBook, sent: dict[int, int] | None = None
) -> int | None:
    """Add ``lora_versions`` to the choices of one response or stream chunk (the spans
    so far); returns the final version, or None. ``sent``: see :func:`_splice`."""
    rid = _response_id(body)
    choices = body.get("choices")
    if not isinstance(rid, str) or not isinstance(choices, list):
        return None
    found = book.lookup(rid)
    if found is None:
        return None
    samples, admitted = found
    for choice in choices:
        index = choice.get("index") if isinstance(choice, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(samples):
            continue
        spans = samples[index].spans
        if sent is not None:
            # Not its last chunk only when it says so (as the splice reads it).
            open_ = "finish_reason" in choice and choice["finish_reason"] is None
            if len(spans) == sent.get(index, 0) and open_:
                continue
            sent[index] = len(spans)
        choice["lora_versions"] = spans_json(spans)
    return final_version(samples, admitted)


# vLLM's own serialization of one response or chunk with a single choice (pydantic's
# compact JSON, the id first: ``id``, or ``request_id`` on the token-in/token-out
# route): the spans are spliced in after the choice's index,
# without parsing and re-encoding the body (per streamed token, that was most of our
# cost on the request path). Anything else takes the parsing path. Found with
# ``partition``, ``in`` and slices and written with str formatting and ``+``, not a
# regex, ``find``, ``startswith`` (bytes methods that parse their arguments with C code
# nothing else on a request's path runs) or a join: per request, code no other part of
# the path runs is code the CPU fetches from memory again (see bench/RESULTS.md).
_ID_KEYS = (b'{"id":"', b'{"request_id":"')
_CHOICES_OPEN = b'"choices":[{'
_INDEX_KEY = b'"index":'
_CHOICE_KEY = _CHOICES_OPEN + _INDEX_KEY
_OPEN = b'"finish_reason":null'  # a chunk that does not end its choice
_LEAD = _CHOICE_KEY + b"0,"  # a chunk of the first choice
# An id longer than this takes the parsing path (vLLM's are ~40 bytes).
_ID_WINDOW = 256


def _id_at(raw: bytes, pos: int) -> str | None:
    """The response id the JSON at ``pos`` starts with (no escapes in it), or None."""
    for key in _ID_KEYS:
        start = pos + len(key)
        if raw[pos:start] == key:
            rid, quote, _ = raw[start : start + _ID_WINDOW].partition(b'"')
            return rid.decode() if quote and rid and b"\\" not in rid else None
    return None


def _spans_bytes(spans: list[Span]) -> bytes:
    """A choice's spans as its ``lora_versions`` key and list, to follow its index."""
    if len(spans) == 1:  # most choices: one version made them
        s = spans[0]
        return (
            f',"lora_versions":[{{"version":{s.version},"start":{s.start},"end":{s.end}}}]'.encode()
        )
    listed = ",".join([f'{{"version":{s.version},"start":{s.start},"end":{s.end}}}' for s in spans])
    return f',"lora_versions":[{listed}]'.encode()


def _splice(
    raw: bytes,
    book: SpanBook,
    want_version: bool = True,
    pos: int = 0,
    sent: dict[int, int] | None = None,
) -> tuple[bytes, int | None, str | None] | None:
    """(annotated body, final version, response id) for a body of vLLM's shape with at
    most one choice; None when the parsing path must decide. A ``"index":`` outside a
    string is always a key (a quote inside a JSON string is escaped), so one occurrence
    means one object with an index: the only choice. ``want_version=False`` (a stream
    chunk: its header left with the first one) skips working out the final version.
    ``pos``: where the JSON starts (a whole SSE event is spliced in place). ``sent``: a
    stream's spans count per choice as last annotated; a chunk whose choice gained no
    span since and does not end it is left as is."""
    rid = _id_at(raw, pos)
    if rid is None:
        return None
    head, key, tail = raw.partition(_INDEX_KEY)
    at = end = -1
    if key:  # one choice: its index is the only one, the choice's first key
        if _INDEX_KEY in tail or head[-len(_CHOICES_OPEN) :] != _CHOICES_OPEN:
            return None
        at = end = len(head) + len(key)
        while raw[end : end + 1].isdigit():
            end += 1
        if end == at:
            return None
    found = book.lookup(rid)
    if found is None:
        return raw, None, rid
    samples, admitted = found
    version = final_version(samples, admitted) if want_version else None
    index = int(raw[at:end]) if key else len(samples)
    if index >= len(samples):  # no choice (a usage chunk), or not one of ours
        return raw, version, rid
    spans_of = samples[index].spans
    if sent is not None:
        if len(spans_of) == sent.get(index, 0) and _OPEN in raw:
            return raw, version, rid  # the client extends the spans it has
        sent[index] = len(spans_of)
    return raw[:end] + _spans_bytes(spans_of) + raw[end:], version, rid


_ID_KEY = _ID_KEYS[0]
_FIRST = b"0,"  # the first choice's index, and more keys after it


def _splice_one(raw: bytes, book: SpanBook) -> tuple[bytes, int] | None:
    """(annotated body, final version) for the most common response: the whole JSON
    body of an HTTP request that made one engine request of one sample (one prompt,
    n=1), named as vLLM names it (the engine request's id, less its ``-0`` for a
    completion). Its choice is that sample's, so only the choice's index is looked for:
    nothing is decoded and no second choice searched for (an ``"index":`` after it is
    inside it: a tool call's). None when the body is not of that shape: :func:`_splice`
    and the parser decide, as before."""
    for rid, (admitted, samples) in book._records.items():  # the only one
        if len(samples) != 1 or raw[:7] != _ID_KEY:
            return None
        name = rid.encode()
        if name[-2:] == b"-0":  # a completion's: "<response id>-<prompt>"
            name = name[:-2]
        if raw[7 : 8 + len(name)] != name + b'"':
            return None
        head, key, _ = raw.partition(_CHOICE_KEY)
        at = len(head) + len(key)
        if not key or raw[at : at + 2] != _FIRST:
            return None
        spans = samples[0].spans
        version = spans[-1].version if spans else admitted
        return raw[: at + 1] + _spans_bytes(spans) + raw[at + 1 :], version
    return None


def _response_id(body: dict[str, Any]) -> Any:
    """OpenAI responses name it ``id``; vLLM's token-in/token-out ``request_id``."""
    return body.get("id") or body.get("request_id")


class _Kept:
    """What ``send`` returns for a message it keeps back (the headers of a response it
    annotates): an awaitable that is done at once, with no coroutine made for it."""

    __slots__ = ()

    def __await__(self) -> Iterator[None]:
        return iter(())


_KEPT = _Kept()


def _set_headers(headers: list[tuple[bytes, bytes]], values: dict[bytes, str]) -> None:
    """Set (replace) headers in place, named in lower case: one pass over the others
    (kept as they are; Starlette's names are lower case already)."""
    kept = []
    for item in headers:
        key = item[0]
        if (key if key.islower() else key.lower()) not in values:
            kept.append(item)
    for name, value in values.items():
        kept.append((name, value.encode("latin-1")))
    headers[:] = kept


def annotate_routes(app: FastAPI) -> None:
    """Annotate the responses of vLLM's generation routes: each route's endpoint is
    wrapped where FastAPI calls it (``route.dependant.call``), once. Not a middleware:
    a layer on every request's way through the app cost each one more than the
    annotation itself (bench/RESULTS.md); routed paths, so ``--root-path`` is moot."""
    for route in app.routes:
        if (
            isinstance(route, APIRoute)
            and route.path in ATTRIBUTED_PATHS
            and "POST" in route.methods
            and route.dependant.call is not None
            and not hasattr(route.dependant.call, "lora_ext_annotated")
        ):
            route.dependant.call = _annotated(route.dependant.call)


def _annotated(call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(call)
    async def endpoint(**values: Any) -> Any:
        """The endpoint with a book of its own: a whole JSON response is annotated
        here; a stream (any response sent later) through :class:`_Sent`."""
        book = SpanBook()
        token = _BOOK.set(book)  # as recording() does, without a generator per request
        try:
            response = await call(**values)
        finally:
            _BOOK.reset(token)
        if not isinstance(response, Response):  # (None: vLLM saw the client leave)
            return response
        body = response.__dict__.get("body")  # a StreamingResponse has none
        if body is None:
            return _Sent(response, book)
        records = book._records
        if not records:  # the base model, an adapter we do not manage
            return response
        raw_headers = response.raw_headers
        if (
            len(records) == 1
            and len(raw_headers) == 2
            and raw_headers[0][0] == _CONTENT_LENGTH
            and raw_headers[1][0] == _CONTENT_TYPE
            and raw_headers[1][1][: len(_JSON)] == _JSON
            and response.status_code == 200
        ):
            # Most responses: vLLM's JSONResponse of one engine request, with the
            # headers Starlette gave it (its length, its type), annotated in one step.
            one = _splice_one(body, book)
            if one is not None:
                response.body, version = one
                raw_headers[0] = (_CONTENT_LENGTH, str(len(response.body)).encode())
                raw_headers.append((_VERSION_KEY, str(version).encode()))
                return response
        mode = _mode(response.status_code, raw_headers)
        if mode == "sse":  # (a whole stream in one body)
            return _Sent(response, book)
        if mode == "json":
            out, version, _ = annotate_body(body, book)
            headers = {_CONTENT_LENGTH: str(len(out))}
            if version is not None:
                headers[_VERSION_KEY] = str(version)
            response.body = out
            _set_headers(raw_headers, headers)
        return response

    endpoint.lora_ext_annotated = True  # type: ignore[attr-defined]
    return endpoint


class _Sent(Response):
    """A response whose body is made as it is sent (a stream): sent through an
    annotating book, current meanwhile (the gate records into it as the body runs),
    that continues the endpoint's."""

    def __init__(self, response: Response, book: SpanBook) -> None:
        self.response = response
        self.book = book
        self.status_code = response.status_code
        self.raw_headers = response.raw_headers
        self.background = response.background  # FastAPI sets it when None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = self.response
        response.background = self.background
        book = _Annotating(send, self.book._records)
        token = _BOOK.set(book)
        try:
            await response(scope, receive, book.send)
        finally:
            _BOOK.reset(token)


class _Annotating(SpanBook):
    """The book of one annotated request and the ``send`` of its response: a JSON body
    is annotated whole, a stream event by event; any other response (an error, another
    type) passes as is. The headers wait for the body (JSON) or the first whole event
    (its id names the request, and so the version for ``x-lora-version``)."""

    # One per annotated request (slotted: nothing more to allocate or traverse).
    __slots__ = (
        "_send",
        "chunks",
        "lead",
        "mode",
        "prefix",
        "quiet",
        "response_id",
        "sent",
        "skip",
        "start",
        "tail",
    )

    def __init__(self, send: Send, records: dict[str, tuple[int, Sequence[Sample]]]) -> None:
        SpanBook.__init__(self)  # (not super(): one object fewer per request)
        self._records = records  # the endpoint's book's, shared: one request's
        self._send = send
        self.start: Message | None = None  # held back until the body decides the headers
        self.mode = "pass"  # "json", "sse" or "pass"
        self.chunks: list[bytes] | None = None  # a JSON body sent in parts, so far
        self.tail = b""  # an SSE event not complete yet
        self.response_id: str | None = None
        # choice index -> spans in its last annotated chunk (a stream's, made with it)
        self.sent: dict[int, int] | None = None
        self.lead: Sample | None = None  # the first choice's sample, once known
        # How this stream's chunks of the first choice start (id, created, model and
        # the choice's index are the same in each); never matches until learnt.
        self.prefix = b"\xff"
        self.skip = 1  # len(prefix): where a second choice's index would be
        # The first choice's spans as its client last saw them; -1 while unknown or an
        # event is incomplete (the fast path of send compares against it).
        self.quiet = -1

    def send(self, message: Message) -> Awaitable[None]:
        """Not a coroutine: most of a stream is handed to the server's ``send`` as is,
        with no frame of ours awaited and no scan for the finish (per streamed token,
        every step counts): whole events of the first choice while its sample is not
        finished and has no span its client was not told of. The gate records a
        finish or a span before vLLM serializes the chunk that shows it."""
        lead = self.lead
        if lead is not None and len(lead.spans) == self.quiet and lead.finish_reason is None:
            body = message.get("body", b"")
            if (
                body.startswith(self.prefix)  # this stream's chunk of choice 0
                and body.endswith(b"\n\n")
                and body.find(_INDEX_KEY, self.skip) < 0  # of it alone
            ):
                return self._send(message)
        kind = message["type"]
        if kind == "http.response.start":
            self.mode = _mode(message.get("status", 0), message.get("headers", ()))
            if self.mode == "pass":
                return self._send(message)
            if self.mode == "sse":
                self.sent = {}
            # Its headers are set before it leaves (a list of ours: set in place).
            self.start = {**message, "headers": list(message.get("headers", ()))}
            return _KEPT
        if kind != "http.response.body" or self.mode == "pass":
            return self._send(message)
        if self.mode == "json":
            return self._json(message)
        return self._sse(message)

    async def _json(self, message: Message) -> None:
        body, more = message.get("body", b""), message.get("more_body", False)
        if more or self.chunks is not None:  # in parts (vLLM sends a JSON body whole)
            if self.chunks is None:
                self.chunks = []
            self.chunks.append(body)
            if more:
                return
            body = b"".join(self.chunks)
        out, version, _ = annotate_body(body, self)
        assert self.start is not None
        values = {_CONTENT_LENGTH: str(len(out))}
        if version is not None:
            values[_VERSION_KEY] = str(version)
        _set_headers(self.start["headers"], values)
        await self._send(self.start)
        await self._send({"type": "http.response.body", "body": out, "more_body": False})

    async def _sse(self, message: Message) -> None:
        body = message.get("body", b"")
        if not self.tail and self.start is None and body.endswith(b"\n\n"):
            if body.find(b"\n\n") == len(body) - 2:  # one whole event, as vLLM sends
                spliced = None
                if body.startswith(b"data: {"):  # spliced in place, no copies
                    spliced = _splice(body, self, False, 6, self.sent)
                if spliced is None:  # the parsing path (it learns the prefix too)
                    event = body[:-2]
                    out = self._event(event)
                    if out is not event:
                        message = {**message, "body": out + b"\n\n"}
                else:
                    if spliced[0] is not body:
                        message = {**message, "body": spliced[0]}
                    if self.lead is not None:
                        self._learn(body)
                self.quiet = self.sent.get(0, -1)
                await self._send(message)
                return
        events = (self.tail + body).split(b"\n\n")
        self.tail = events.pop()
        out = [self._event(e) + b"\n\n" for e in events]
        more = message.get("more_body", False)
        if not more and self.tail:
            out.append(self.tail)
            self.tail = b""
        self.quiet = -1 if self.tail else self.sent.get(0, -1)
        if not out and more:
            return  # no whole event yet
        if self.start is not None:
            admitted = self.admitted(self.response_id) if self.response_id else None
            if admitted is not None:
                _set_headers(self.start["headers"], {_VERSION_KEY: str(admitted)})
            await self._send(self.start)
            self.start = None
        await self._send({"type": "http.response.body", "body": b"".join(out), "more_body": more})

    def _learn(self, event: bytes) -> None:
        """The prefix of the first choice's chunks, from one of them (a route may send
        fields in its first chunk only: the prefix is learnt again from the next)."""
        at = event.find(_LEAD)
        if at >= 0:
            self.prefix = event[: at + len(_LEAD)]
            self.skip = len(self.prefix)

    def _event(self, event: bytes) -> bytes:
        """One whole SSE event, its choices annotated with their spans so far."""
        if not event.startswith(b"data: {"):
            return event  # [DONE], a comment, an empty event
        body = event[6:]
        out, _, rid = annotate_body(body, self, want_version=False, sent=self.sent)
        if self.response_id is None and rid is not None:
            self.response_id = rid
            found = self.lookup(rid)
            self.lead = found[0][0] if found is not None and found[0] else None
        if self.lead is not None:
            self._learn(event)
        return event if out is body else b"data: " + out


_CONTENT_TYPE = b"content-type"
_CONTENT_LENGTH = b"content-length"
_JSON = b"application/json"
_SSE = b"text/event-stream"


def _mode(status: int, headers: Any) -> str:
    """How a response is annotated: "json" whole, "sse" event by event, or "pass"."""
    if status != 200:
        return "pass"
    ctype = b""
    for key, value in headers:
        # Starlette's names are lower case already (others of its length are lowered)
        if key == _CONTENT_TYPE or (
            len(key) == len(_CONTENT_TYPE) and key.lower() == _CONTENT_TYPE
        ):
            ctype = value
            break
    if ctype[: len(_JSON)] == _JSON:  # (slices: no startswith on a JSON path)
        return "json"
    if ctype[: len(_SSE)] == _SSE:
        return "sse"
    return "pass"


def annotate_body(
    raw: bytes, book: SpanBook, want_version: bool = True, sent: dict[int, int] | None = None
) -> tuple[bytes, int | None, str | None]:
    """(the body with its choices' spans, the final version or None, the response id)
    of one JSON response or stream chunk; the body itself when it is not ours."""
    spliced = _splice(raw, book, want_version, sent=sent)
    return spliced if spliced is not None else reencode(raw, book, sent)


def reencode(
    raw: bytes, book: SpanBook, sent: dict[int, int] | None = None
) -> tuple[bytes, int | None, str | None]:
    """:func:`annotate_body` by parsing and re-encoding: any shape."""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw, None, None
    if not isinstance(body, dict):
        return raw, None, None
    rid = _response_id(body)
    version = annotate(body, book, sent)
    if version is None:
        return raw, None, rid if isinstance(rid, str) else None
    out = json.dumps(body, separators=(",", ":")).encode("utf-8")
    return out, version, rid if isinstance(rid, str) else None
