"""Zero-stall versioned swaps on a real engine: what happens to requests in flight,
which version produced which tokens, and no stale prefix-cache hit after a swap.

The toy adapters make the failure visible in the text: ``meow`` weights say "meow",
``woof`` weights say "woof"; a swap under one name changes what that name says.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from engine_helpers import (
    PROMPT,
    Stream,
    complete,
    loras,
    post,
    server_pid,
    wait_in_flight,
    words,
)

from vllm_lora_ext.client import _clip_spans
from vllm_lora_ext.toy.soak import server_rss_mib


async def load(client, name: str, path: Path | str, **extra) -> int:
    r = await post(
        client, "load_lora_adapter", {"lora_name": name, "lora_path": str(path), **extra}
    )
    return r["version"]


@pytest.fixture
async def swp(client, toy):
    """A scratch adapter name, serving meow weights, unloaded afterwards."""
    version = await load(client, "swp", toy.adapters["meow"])
    yield version
    await post(client, "unload_lora_adapter", {"lora_name": "swp"})


async def test_responses_name_the_version_of_every_token(client, swp):
    r = await client.post(
        "/v1/completions",
        json={"model": "swp", "prompt": PROMPT, "max_tokens": 6, "n": 2, "temperature": 1.0},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-lora-version"] == str(swp)
    for choice in r.json()["choices"]:
        assert choice["lora_versions"] == [{"version": swp, "start": 0, "end": 6}]
    chat = await client.post(
        "/v1/chat/completions",
        json={"model": "swp", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    # The toy tokenizer has no chat template: whatever vLLM answers, it is not a 5xx,
    # and a 200 carries the attribution too.
    assert chat.status_code < 500, chat.text
    if chat.status_code == 200:
        assert chat.json()["choices"][0]["lora_versions"][0]["version"] == swp

    base = await client.post(
        "/v1/completions", json={"model": "toy-base", "prompt": PROMPT, "max_tokens": 4}
    )
    assert "x-lora-version" not in base.headers
    assert "lora_versions" not in base.json()["choices"][0]


async def test_default_swap_lets_running_requests_finish_on_their_version(client, toy, swp):
    running = Stream("swp", 600).start(client)
    await running.wait_tokens(32)
    await wait_in_flight(client, "swp", 1)
    new = await load(client, "swp", toy.adapters["woof"])
    # New requests get the new weights at once; no pause was needed.
    fresh = await complete(client, "swp", 8)
    assert set(words(fresh["choices"][0]["text"])) == {"woof"}
    await running.result()
    assert running.finish_reason == "length" and running.tokens == 600
    assert set(words(running.text)) == {"meow"}
    assert running.lora_versions == [{"version": swp, "start": 0, "end": 600}]
    assert new == swp + 1


async def test_swap_with_continue_moves_running_requests_and_says_where(client, toy, swp):
    running = Stream("swp", 1500).start(client)
    await running.wait_tokens(32)
    await wait_in_flight(client, "swp", 1)
    new = await load(client, "swp", toy.adapters["woof"], interrupt="continue")
    await running.result()
    assert running.finish_reason == "length" and running.tokens == 1500
    assert running.logprobs == 1500
    spans = running.lora_versions
    assert spans is not None and [s["version"] for s in spans] == [swp, new], spans
    cut = spans[0]["end"]
    assert spans[0]["start"] == 0 and spans[1]["start"] == cut and spans[1]["end"] == 1500
    assert 32 <= cut < 1500
    # Spans come where a version starts (the first tokens, the continuation's) and on
    # the last chunk; wherever the stream had broken off, the last spans received,
    # extended to the tokens kept (as sample_with_retry does), name the right versions.
    annotated = [mark for _, mark in running.marks if mark is not None]
    assert len(annotated) == 3 and len(running.marks) > 3, annotated
    seen = None
    for upto, mark in running.marks:
        seen = mark if mark is not None else seen
        assert seen is not None and _clip_spans(seen, upto) == _clip_spans(spans, upto)
    assert running.header_version == str(swp)  # the stream's headers left before the swap
    said = words(running.text)
    assert said[0] == "meow" and said[-1] == "woof"


async def test_swap_with_abort_returns_running_requests_partial(client, toy, swp):
    running = Stream("swp", 2000).start(client)
    await running.wait_tokens(32)
    await wait_in_flight(client, "swp", 1)
    await load(client, "swp", toy.adapters["woof"], interrupt="abort")
    await running.result()
    assert running.finish_reason == "abort"
    assert 32 <= running.tokens < 2000
    assert set(words(running.text)) == {"meow"}


def _long_prompt() -> str:
    # Several full KV blocks of prompt, so a prefix-cache hit is possible at all.
    return " ".join(["the cat and the dog"] * 60)


async def _prompt_run(client, model: str) -> tuple[str, int]:
    r = await client.post(
        "/v1/completions",
        json={"model": model, "prompt": _long_prompt(), "max_tokens": 12, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    cached = (body["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return body["choices"][0]["text"], cached


async def test_no_stale_prefix_cache_hit_after_in_place_rewrite(client, toy, tmp_path):
    """A trainer rewrites the same directory and loads it again under the same name:
    the new version must not reuse KV blocks computed with the old weights, while
    other adapters keep their cache hits across the swap."""
    adapter_dir = tmp_path / "ckpt"
    shutil.copytree(toy.adapters["meow"], adapter_dir)
    await load(client, "inplace", adapter_dir)
    try:
        first, _ = await _prompt_run(client, "inplace")
        again, cached = await _prompt_run(client, "inplace")
        assert again == first and cached > 0  # prefix caching is on and hits
        woof_text, _ = await _prompt_run(client, "woof")
        _, woof_cached = await _prompt_run(client, "woof")
        assert woof_cached > 0

        for f in adapter_dir.iterdir():  # in place: same path, same name, new weights
            shutil.copyfile(toy.adapters["woof"] / f.name, f)
        await load(client, "inplace", adapter_dir)

        after, after_cached = await _prompt_run(client, "inplace")
        assert after_cached == 0, "the new version reused KV computed with the old weights"
        assert after == woof_text  # exactly what the new weights say from a cold cache
        _, woof_cached_after = await _prompt_run(client, "woof")
        assert woof_cached_after >= woof_cached  # nobody flushed the other adapters
    finally:
        await post(client, "unload_lora_adapter", {"lora_name": "inplace"})


async def test_evicted_version_stays_until_its_queued_requests_finish(client, toy, tmp_path):
    """More requests than engine seats (some queued), then the version is pushed out of
    the retention window and its files deleted: every request still completes."""
    src = tmp_path / "race"
    shutil.copytree(toy.adapters["meow"], src)
    first = await load(client, "race", src)
    try:
        await complete(client, "race", 2)  # one-off adapter set-up out of the way
        streams = [Stream("race", 300).start(client) for _ in range(40)]  # > max-num-seqs
        await wait_in_flight(client, "race", 40, timeout=120)
        shutil.rmtree(src)  # the trainer cleaned up its step directory
        for _ in range(4):  # keep_versions (2) is exceeded twice over
            await load(client, "race", toy.adapters["woof"])
        state = (await loras(client))["race"]
        resident = {v["version"]: v for v in state["versions"]}
        assert resident[first]["in_flight"] == 40  # still referenced, so still resident
        for s in streams:
            await s.result(300)
            assert s.finish_reason == "length" and s.tokens == 300
            assert set(words(s.text)) == {"meow"}
        state = (await loras(client))["race"]
        assert first not in [v["version"] for v in state["versions"]]
        assert len(state["versions"]) <= 2
    finally:
        await post(client, "unload_lora_adapter", {"lora_name": "race"})


async def test_thousand_swaps_keep_memory_and_registered_adapters_flat(client, toy, server):
    """1,000 loads under one name with requests in between: engine adapters and resident
    versions stay bounded, memory stays flat, every answer comes from the version its
    header names."""
    said = {"meow": toy.adapters["meow"], "woof": toy.adapters["woof"]}
    requests: list[asyncio.Task] = []
    baseline: tuple[float, int] | None = None
    word_of: dict[int, str] = {}
    try:
        for i in range(1000):
            word = "meow" if i % 2 else "woof"
            word_of[await load(client, "churn", said[word])] = word
            if i % 20 == 0:
                requests.append(
                    asyncio.create_task(
                        client.post(
                            "/v1/completions",
                            json={
                                "model": "churn",
                                "prompt": PROMPT,
                                "max_tokens": 4,
                                "temperature": 0,
                            },
                        )
                    )
                )
            if i == 100:
                await asyncio.gather(*requests)
                state = await client.get("/skyrl/v1/loras")
                baseline = (server_rss_mib(server_pid(server)), state.json()["engine_adapters"])
        answers = await asyncio.gather(*requests)
        state = (await client.get("/skyrl/v1/loras")).json()
        rss = server_rss_mib(server_pid(server))
    finally:
        await post(client, "unload_lora_adapter", {"lora_name": "churn"})
    assert baseline is not None
    for r in answers:
        assert r.status_code == 200, r.text
        version = int(r.headers["x-lora-version"])
        assert set(words(r.json()["choices"][0]["text"])) == {word_of[version]}, r.text
    churn = next(a for a in state["adapters"] if a["lora_name"] == "churn")
    assert churn["version"] == max(word_of) and len(word_of) == 1000
    assert len(churn["versions"]) <= 2
    assert state["engine_adapters"] <= baseline[1]
    assert rss - baseline[0] < 64, f"server memory grew {rss - baseline[0]:.0f} MiB"
