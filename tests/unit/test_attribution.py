"""Version attribution: the span book and the endpoint wrapper that adds it to vLLM's
completion and chat responses (a tiny FastAPI app stands in for vLLM's routes; vLLM's
own route table is checked at the end)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from exploration import SEED, examples
from fastapi import FastAPI
from hypothesis import given, seed, settings
from hypothesis import strategies as st
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from vllm.entrypoints.openai.chat_completion import protocol as chat
from vllm.entrypoints.openai.completion import protocol as completion
from vllm.entrypoints.scale_out.token_in_token_out import protocol as generate

from vllm_lora_ext.server.attribution import (
    ATTRIBUTED_PATHS,
    SpanBook,
    _splice,
    _splice_one,
    annotate_body,
    annotate_routes,
    current_book,
    recording,
    reencode,
)
from vllm_lora_ext.server.continuation import Sample, Span


def samples(*spans: list[tuple[int, int, int]]) -> list[Sample]:
    out = []
    for i, ss in enumerate(spans):
        s = Sample(i)
        s.spans = [Span(*t) for t in ss]
        out.append(s)
    return out


def test_book_joins_per_prompt_requests_in_choice_order():
    book = SpanBook()
    book.track("cmpl-a-0", samples([(1, 0, 4)], [(1, 0, 2), (2, 2, 5)]), admitted=1)
    book.track("cmpl-a-1", samples([(2, 0, 3)]), admitted=2)
    choices = book.choices("cmpl-a")
    assert [[s.version for s in c] for c in choices] == [[1], [1, 2], [2]]
    assert book.admitted("cmpl-a") == 1
    assert book.choices("cmpl-b") is None


def test_spans_are_read_live_while_the_request_runs():
    book = SpanBook()
    live = samples([(1, 0, 2)])
    book.track("r", live, 1)
    live[0].spans.append(Span(2, 2, 3))
    assert book.choices("r") == [[Span(1, 0, 2), Span(2, 2, 3)]]


def test_the_final_version_is_the_newest_that_made_a_choices_last_tokens():
    """``x-lora-version`` of a whole response: the newest version among the choices'
    last spans (a choice continued on a newer version raises it), else the admitted one;
    the same through the splice (one choice) and the parsing path (several)."""
    book = SpanBook()
    book.track("r", samples([(3, 0, 2)], [(3, 0, 1), (5, 1, 4)], [(4, 0, 2)], []), admitted=3)
    body = {"id": "r", "choices": [{"index": i, "text": "x"} for i in range(4)]}
    assert annotate_body(json.dumps(body).encode(), book)[1] == 5
    book.track("one", samples([(2, 0, 1), (6, 1, 2)]), admitted=2)
    assert annotate_body(b'{"id":"one","choices":[{"index":0,"text":"x"}]}', book)[1] == 6
    book.track("none", samples([]), admitted=7)  # no token made yet
    assert annotate_body(b'{"id":"none","choices":[{"index":0,"text":""}]}', book)[1] == 7


def test_recording_gives_each_request_its_own_book():
    assert current_book() is None
    with recording() as outer:
        assert current_book() is outer
        with recording() as inner:
            assert current_book() is inner and inner is not outer
        assert current_book() is outer
    assert current_book() is None


def app() -> FastAPI:
    """A stand-in for vLLM's route: it records spans in the request's book, as the gate
    does inside ``generate``, for the request ids the body names."""

    async def completions(request: Request):
        body = await request.json()
        if body.get("gone"):  # vLLM's with_cancellation: the client left
            return None
        book = current_book()
        for rid, spans in body.get("record", {}).items():
            assert book is not None, "the route must give every request a book"
            book.track(rid, samples(*spans), admitted=spans[0][0][0])
        if body.get("stream"):
            live = samples([(7, 0, 1)])

            def track(rid: str, made: list[Sample]) -> None:
                # As vLLM runs generate: once the response is being sent.
                now = current_book()
                assert now is not None, "a stream must have its book while it is sent"
                now.track(rid, made, admitted=7)

            def chunk(text: str, finish: str | None = None) -> str:
                end = json.dumps(finish)
                return f'data: {{"id":"cmpl-s","choices":[{{"index":0,"text":"{text}",' + (
                    f'"finish_reason":{end}}}]}}\n\n'
                )

            async def events():
                # As the gate records them: the spans grow while the stream runs.
                track("cmpl-s-0", live)
                yield chunk("a")
                live[0].spans[-1].end = 2
                yield chunk("b")
                live[0].spans.append(Span(8, 2, 3))  # a continuation on a new version
                c = chunk("c")
                yield c[:20]  # one event in two writes: the buffering path
                yield c[20:]
                live[0].spans[-1].end = 4
                yield chunk("d")
                live[0].spans.append(Span(9, 4, 5))  # another, in one whole event
                yield chunk("e")
                live[0].finish_reason = "length"  # the gate records it before the chunk
                yield chunk("", "length") + "data: [DONE]\n\n"

            async def two_choices():
                # A chunk of choice 0 that carries choice 1 too (vLLM sends one choice
                # per chunk; this one must still be read whole, not passed as is).
                track("cmpl-s-0", live)
                yield chunk("a")
                live[0].spans[-1].end = 2
                yield chunk("b")
                second = samples([(7, 0, 1)])[0]
                second.index = 1
                track("cmpl-s-1", [second])
                both = chunk("c")[:-4] + ',{"index":1,"text":"z","finish_reason":null}]}\n\n'
                yield both

            stream = two_choices if body.get("two_choices") else events
            return StreamingResponse(stream(), media_type="text/event-stream")
        if body.get("parts"):  # a JSON body in several writes (vLLM sends one)

            async def parts():
                whole = json.dumps({"id": body["id"], "choices": [{"index": 0, "text": "ab"}]})
                for i in range(0, len(whole), 7):
                    yield whole[i : i + 7]

            return StreamingResponse(parts(), media_type="application/json")
        return JSONResponse({"id": body["id"], "choices": [{"index": 0, "text": "ab"}]})

    served = FastAPI()
    served.post("/v1/completions")(completions)
    served.post("/v1/other")(completions)
    annotate_routes(served)
    annotate_routes(served)  # (attached twice: wrapped once)
    return served


async def test_routes_annotate_json_and_streams_and_leave_others_alone():
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post(
            "/v1/completions",
            json={"id": "cmpl-j", "record": {"cmpl-j-0": [[(3, 0, 1), (4, 1, 2)]]}},
        )
        assert r.headers["x-lora-version"] == "4"  # the final version
        assert r.json()["choices"][0]["lora_versions"] == [
            {"version": 3, "start": 0, "end": 1},
            {"version": 4, "start": 1, "end": 2},
        ]
        assert int(r.headers["content-length"]) == len(r.content)

        plain = await c.post("/v1/completions", json={"id": "cmpl-base"})
        assert "x-lora-version" not in plain.headers
        assert plain.json() == {"id": "cmpl-base", "choices": [{"index": 0, "text": "ab"}]}

        async with c.stream("POST", "/v1/completions", json={"stream": True}) as s:
            assert s.headers["x-lora-version"] == "7"
            lines = [ln async for ln in s.aiter_lines() if ln.startswith("data: {")]
        # Spans where one starts (the first tokens, the new version) and on the last
        # chunk; the chunks between are left as vLLM wrote them.
        chunks = [json.loads(ln[6:])["choices"][0] for ln in lines]
        assert [c["text"] for c in chunks] == ["a", "b", "c", "d", "e", ""]
        v7, v8 = {"version": 7, "start": 0, "end": 2}, {"version": 8, "start": 2, "end": 4}
        assert [c.get("lora_versions") for c in chunks] == [
            [{"version": 7, "start": 0, "end": 1}],
            None,
            [v7, {"version": 8, "start": 2, "end": 3}],
            None,
            [v7, v8, {"version": 9, "start": 4, "end": 5}],
            [v7, v8, {"version": 9, "start": 4, "end": 5}],
        ]


async def test_a_json_body_sent_in_parts_is_annotated_whole():
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        body = {"id": "cmpl-p", "parts": True, "record": {"cmpl-p-0": [[(5, 0, 2)]]}}
        r = await c.post("/v1/completions", json=body)
    assert r.headers["x-lora-version"] == "5"
    assert int(r.headers["content-length"]) == len(r.content)
    assert r.json()["choices"] == [
        {"index": 0, "text": "ab", "lora_versions": [{"version": 5, "start": 0, "end": 2}]}
    ]


@seed(SEED)
@settings(max_examples=examples(local=300, ci=1000), deadline=None, derandomize=False)
@given(
    keys=st.lists(st.text(alphabet="ab-01", max_size=4), max_size=3, unique=True),
    response_id=st.text(alphabet="ab-01", max_size=3),
)
def test_a_response_finds_the_engine_requests_its_id_names(keys, response_id):
    """Chat: the response id itself; completions: ``<id>-0``, ``<id>-1``... in prompt
    order (as vLLM names a prompt's engine request). Whatever ids a book holds (one, as
    most requests, or several; ids that merely start alike), lookup finds exactly those."""
    book = SpanBook()
    made = {k: samples([(i + 1, 0, 1)]) for i, k in enumerate(keys)}
    for k in keys:
        book.track(k, made[k], admitted=1)
    if response_id in made:
        named = [response_id]
    else:
        named = []
        while f"{response_id}-{len(named)}" in made:
            named.append(f"{response_id}-{len(named)}")
    found = book.lookup(response_id)
    if not named:
        assert found is None
    else:
        assert found is not None
        assert list(found[0]) == [s for k in named for s in made[k]]


async def test_a_chunk_with_a_second_choice_is_annotated_for_it():
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        body = {"stream": True, "two_choices": True}
        async with c.stream("POST", "/v1/completions", json=body) as s:
            lines = [ln async for ln in s.aiter_lines() if ln.startswith("data: {")]
    last = json.loads(lines[-1][6:])["choices"]
    assert [c["text"] for c in last] == ["c", "z"]
    assert last[1]["lora_versions"] == [{"version": 7, "start": 0, "end": 1}]


async def test_requests_sharing_an_id_never_see_each_others_spans():
    """Two tenants send the same X-Request-Id: each response carries its own spans."""
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        a, b = await asyncio.gather(
            c.post("/v1/completions", json={"id": "cmpl-x", "record": {"cmpl-x-0": [[(1, 0, 2)]]}}),
            c.post("/v1/completions", json={"id": "cmpl-x", "record": {"cmpl-x-0": [[(9, 0, 5)]]}}),
        )
    assert a.json()["choices"][0]["lora_versions"] == [{"version": 1, "start": 0, "end": 2}]
    assert b.json()["choices"][0]["lora_versions"] == [{"version": 9, "start": 0, "end": 5}]


async def test_routes_that_are_not_annotated_record_nothing():
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post("/v1/other", json={"id": "o"})
        assert r.status_code == 200
        with pytest.raises(AssertionError, match="must give every request a book"):
            await c.post("/v1/other", json={"id": "o", "record": {"o": [[(1, 0, 1)]]}})


async def test_a_json_response_is_annotated_once_and_a_left_client_gets_nothing_new():
    """Wrapped once however often the plugin attaches (one lora_versions, not two); an
    endpoint that returns no response (its client left) is passed through as is."""
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post(
            "/v1/completions", json={"id": "cmpl-o", "record": {"cmpl-o-0": [[(2, 0, 1)]]}}
        )
        assert r.content.count(b"lora_versions") == 1
        assert r.headers["x-lora-version"] == "2"
        assert int(r.headers["content-length"]) == len(r.content)
        gone = await c.post("/v1/completions", json={"gone": True})
        assert gone.status_code == 200 and gone.json() is None  # FastAPI's answer to None


def test_vllms_generation_routes_are_the_ones_annotated():
    """On vLLM's own app (its build_app, scale-out on), the plugin wraps exactly the
    routes named in ATTRIBUTED_PATHS: a vLLM that renamed one fails here rather than
    serving it without attribution."""
    from fastapi.routing import APIRoute
    from test_routes import _vllm_app

    app = _vllm_app(None)
    wrapped = {
        r.path
        for r in app.routes
        if isinstance(r, APIRoute) and hasattr(r.dependant.call, "lora_ext_annotated")
    }
    assert wrapped == ATTRIBUTED_PATHS


# ---- the splice path: vLLM's own serialization, without parsing ---------------------------

text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12
) | st.sampled_from(['"index": 1', '\\"', '"choices":[{"index":0', "é\u2028", '{"id":"x"}'])


@st.composite
def vllm_body(draw) -> tuple[bytes, str]:
    """One response or chunk as vLLM serializes it (its own pydantic models)."""
    # Ids with a quote or a backslash (escaped in JSON) are not the splice's: parsed.
    rid = draw(st.sampled_from(["cmpl-a", "cmpl-b", "chatcmpl-c", 'cmpl-"q', "cmpl-\\b"]))
    kinds = ["stream", "chat-stream", "response", "usage", "generate-stream", "generate"]
    kind = draw(st.sampled_from(kinds))
    n = draw(st.integers(1, 3)) if kind in ("response", "generate") else 1
    index = draw(st.integers(0, 3))
    if kind == "stream":
        choice = completion.CompletionResponseStreamChoice(index=index, text=draw(text))
        body = completion.CompletionStreamResponse(id=rid, model="m", choices=[choice])
        return body.model_dump_json(exclude_unset=draw(st.booleans())).encode(), rid
    if kind == "chat-stream":
        tools = draw(st.booleans())
        delta = chat.DeltaMessage(
            content=draw(text),
            tool_calls=[{"index": 0, "function": {"arguments": draw(text)}}] if tools else [],
        )
        choice = chat.ChatCompletionResponseStreamChoice(index=index, delta=delta)
        body = chat.ChatCompletionStreamResponse(id=rid, model="m", choices=[choice])
        return body.model_dump_json(exclude_unset=True).encode(), rid
    usage = chat.UsageInfo(prompt_tokens=1, completion_tokens=2, total_tokens=3)
    if kind == "generate-stream":  # /inference/v1/generate, named by request_id
        finish = draw(st.sampled_from([None, "length"]))
        if draw(st.booleans()):
            choice = generate.GenerateTokensStreamChoice(
                index=index, token_ids=[1, 2], finish_reason=finish
            )
            body = generate.GenerateTokensStreamResponse(request_id=rid, choices=[choice])
        else:
            choice = generate.GenerateTextStreamChoice(
                index=index, text=draw(text), finish_reason=finish
            )
            body = generate.GenerateTextStreamResponse(request_id=rid, choices=[choice])
        return body.model_dump_json(
            exclude=draw(st.sampled_from([None, {"metrics"}]))
        ).encode(), rid
    if kind == "generate":
        choices = [
            generate.GenerateTokensChoice(index=i, token_ids=[i], finish_reason="length")
            for i in range(n)
        ]
        body = generate.GenerateTokensResponse(
            request_id=rid,
            choices=choices,
            usage=usage,
            kv_transfer_params=draw(st.sampled_from([None, {"index": 1}, {"k": '"index":'}])),
        )
        return body.model_dump_json().encode(), rid
    if kind == "usage":
        body = completion.CompletionStreamResponse(id=rid, model="m", choices=[], usage=usage)
        return body.model_dump_json(exclude_unset=True).encode(), rid
    choices = [completion.CompletionResponseChoice(index=i, text=draw(text)) for i in range(n)]
    body = completion.CompletionResponse(id=rid, model="m", choices=choices, usage=usage)
    return body.model_dump_json().encode(), rid


@seed(SEED)
@settings(max_examples=examples(local=400, ci=2000), deadline=None, derandomize=False)
@given(
    body=vllm_body(),
    spans=st.lists(st.lists(st.integers(1, 9), min_size=1), max_size=3),
    prior=st.integers(0, 3),
    named=st.sampled_from(["response", "prompt", "other"]),
)
def test_the_splice_annotates_exactly_as_parsing_does(body, spans, prior, named):
    """Byte-spliced annotations equal what parsing and re-encoding gives, for vLLM's
    own chunks and responses (text that looks like the keys included); single-choice
    bodies take the splice, others the parser. In a stream (``sent``: the spans count
    each choice was last annotated with), both skip the same chunks. A response of one
    engine request of one sample (named as a chat's, or a completion prompt's
    ``<id>-0``) takes the one-sample splice, with the same result; a book of another
    request's leaves the body as it is."""
    raw, rid = body
    book = SpanBook()
    if spans:  # the request is ours: per choice, versions in order
        per = [[(v, i, i + 1) for i, v in enumerate(sorted(vs))] for vs in spans]
        name = {"response": rid, "prompt": f"{rid}-0", "other": f"{rid}-1"}[named]
        book.track(name, samples(*per), admitted=per[0][0][0])
    out, version, got_rid = annotate_body(raw, book)
    slow, slow_version, slow_rid = reencode(raw, book)
    assert json.loads(out) == json.loads(slow)
    assert (version, got_rid) == (slow_version, slow_rid)
    one = _splice_one(raw, book)
    if one is not None:
        assert json.loads(one[0]) == json.loads(out) and one[1] == version
    elif len(spans) == 1 and named != "other" and b'"choices":[{"index":0,' in raw:
        assert (
            not raw.startswith(b'{"id":"') or '"' in rid or "\\" in rid
        )  # any other body of vLLM's takes it
    if version is None:
        assert out == raw  # not ours (or nothing to add): vLLM's bytes as they were
    if raw.count(b'"index":') <= 1 and '"' not in rid and "\\" not in rid:
        assert _splice(raw, book) is not None
        # The same splice done in place on a whole SSE event, as the stream's hot path does.
        event, _, _ = _splice(b"data: " + raw + b"\n\n", book, want_version=False, pos=6)
        assert event == b"data: " + out + b"\n\n"
    fast_sent = dict.fromkeys(range(4), prior)
    slow_sent = dict(fast_sent)
    fast, _, _ = annotate_body(raw, book, want_version=False, sent=fast_sent)
    slow, _, _ = reencode(raw, book, sent=slow_sent)
    assert json.loads(fast) == json.loads(slow) and fast_sent == slow_sent


def test_a_body_the_splice_cannot_read_is_parsed():
    """An id with escapes, or an index that is not a number: the parsing path decides
    (the splice reads neither)."""
    book = SpanBook()
    book.track('cmpl-"q', samples([(3, 0, 1)]), admitted=3)
    raw = json.dumps({"id": 'cmpl-"q', "choices": [{"index": 0, "text": "x"}]}).encode()
    raw = raw.replace(b": ", b":").replace(b", ", b",")
    assert _splice(raw, book) is None
    out, version, rid = annotate_body(raw, book)
    assert json.loads(out)["choices"][0]["lora_versions"] == [{"version": 3, "start": 0, "end": 1}]
    assert (version, rid) == (3, 'cmpl-"q')
    odd = b'{"id":"cmpl-a","choices":[{"index":"0","text":"x"}]}'
    assert _splice(odd, book) is None
    assert annotate_body(odd, book) == (odd, None, "cmpl-a")
