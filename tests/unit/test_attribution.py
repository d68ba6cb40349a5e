"""Version attribution: the span book and the middleware that adds it to vLLM's
completion and chat responses (a tiny Starlette app stands in for vLLM's routes)."""

from __future__ import annotations

import json

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from vllm_lora_ext.server.attribution import AttributionMiddleware, SpanBook
from vllm_lora_ext.server.continuation import Sample, Span


def samples(*spans: list[tuple[int, int, int]]) -> list[Sample]:
    out = []
    for i, ss in enumerate(spans):
        s = Sample(i)
        s.spans = [Span(*t) for t in ss]
        out.append(s)
    return out


def test_book_joins_per_prompt_requests_in_choice_order_and_is_bounded():
    book = SpanBook(capacity=3)
    book.track("cmpl-a-0", samples([(1, 0, 4)], [(1, 0, 2), (2, 2, 5)]), admitted=1)
    book.track("cmpl-a-1", samples([(2, 0, 3)]), admitted=2)
    choices = book.choices("cmpl-a")
    assert [[s.version for s in c] for c in choices] == [[1], [1, 2], [2]]
    assert book.admitted("cmpl-a") == 1
    book.track("x", samples([]), 1)
    book.track("y", samples([]), 1)  # capacity 3: the oldest record goes
    # Prompt 0's record is gone: no attribution at all beats a misaligned one.
    assert book.choices("cmpl-a") is None and len(book) == 3


def test_finish_freezes_spans_and_drops_the_samples():
    book = SpanBook()
    live = samples([(1, 0, 2)])
    book.track("r", live, 1)
    live[0].spans.append(Span(2, 2, 3))  # live view while the request runs
    assert len(book.choices("r")[0]) == 2
    book.finish("r")
    live[0].spans.clear()
    assert book.choices("r") == [[Span(1, 0, 2), Span(2, 2, 3)]]


def app_with(book: SpanBook) -> Starlette:
    async def completions(request: Request):
        body = await request.json()
        if body.get("stream"):

            async def events():
                yield 'data: {"id":"cmpl-s","choices":[{"index":0,"text":"a",'
                yield '"finish_reason":null}]}\n\n'
                yield 'data: {"id":"cmpl-s","choices":[{"index":0,"text":"b",'
                yield '"finish_reason":"length"}]}\n\ndata: [DONE]\n\n'

            return StreamingResponse(events(), media_type="text/event-stream")
        rid = body["id"]
        return JSONResponse({"id": rid, "choices": [{"index": 0, "text": "ab"}]})

    app = Starlette(
        routes=[Route("/v1/completions", completions, methods=["POST"])],
        middleware=[Middleware(AttributionMiddleware)],
    )
    app.state.lora_ext = type("M", (), {"spans": book})()
    return app


async def test_middleware_annotates_json_and_streams_and_leaves_others_alone():
    book = SpanBook()
    book.track("cmpl-j-0", samples([(3, 0, 1), (4, 1, 2)]), admitted=3)
    book.track("cmpl-s-0", samples([(7, 0, 2)]), admitted=7)
    transport = httpx.ASGITransport(app=app_with(book))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post("/v1/completions", json={"id": "cmpl-j"})
        assert r.headers["x-lora-version"] == "4"  # the final version
        assert r.json()["choices"][0]["lora_versions"] == [
            {"version": 3, "start": 0, "end": 1},
            {"version": 4, "start": 1, "end": 2},
        ]
        assert int(r.headers["content-length"]) == len(r.content)
        assert book.choices("cmpl-j") is None  # read once, then forgotten

        plain = await c.post("/v1/completions", json={"id": "cmpl-base"})
        assert "x-lora-version" not in plain.headers
        assert plain.json() == {"id": "cmpl-base", "choices": [{"index": 0, "text": "ab"}]}

        async with c.stream("POST", "/v1/completions", json={"stream": True}) as s:
            assert s.headers["x-lora-version"] == "7"
            lines = [ln async for ln in s.aiter_lines() if ln.startswith("data: {")]
        chunks = [json.loads(ln[6:]) for ln in lines]
        assert "lora_versions" not in chunks[0]["choices"][0]
        assert chunks[1]["choices"][0]["lora_versions"] == [{"version": 7, "start": 0, "end": 2}]
        assert book.choices("cmpl-s") is None
