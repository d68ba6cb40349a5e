"""The client against real servers: retries across pauses and swaps, fan-out over two
replicas with one killed mid-sync, a group and its continuations kept on the replica
holding their prefix, and the OpenAI SDK reaching the same adapters."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
from collections.abc import Awaitable

import httpx
import openai
import psutil
import pytest
from engine_helpers import PROMPT, loras, post, vllm_metric, wait_in_flight, words

from vllm_lora_ext.client import FanoutError, RemoteInferenceClient, RetryPolicy, SampleResponse
from vllm_lora_ext.toy.server import free_port, lora_ext_cmd, start_server, warm_up

MAX_TOKENS = 300


async def test_sample_with_retry_survives_pauses_and_swaps(client, server, toy):
    """Many concurrent retried samples on two adapters while one is paused (abort),
    swapped and resumed, three times over: every call completes with exactly its budget,
    logprobs 1:1, and the attribution shows the swaps; the other tenant never retries."""
    await post(
        client, "load_lora_adapter", {"lora_name": "rl", "lora_path": str(toy.adapters["meow"])}
    )
    weights = [toy.adapters["woof"], toy.adapters["meow"], toy.adapters["woof"]]
    policy = RetryPolicy(deadline_s=300, max_attempts=50)
    try:
        async with RemoteInferenceClient(server, retry=policy) as rc:

            def run(name: str) -> asyncio.Task:
                return asyncio.create_task(
                    rc.sample_with_retry(
                        name, prompt=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0
                    )
                )

            rl = [run("rl") for _ in range(6)]
            other = [run("woof") for _ in range(3)]
            for path in weights:
                await wait_in_flight(client, "rl", 1, timeout=120)
                await asyncio.sleep(0.3)  # some tokens before the interruption
                paused = await rc.pause_generation("rl", mode="abort")
                assert all(p["paused"] for p in paused.values())
                await rc.load_lora_adapter("rl", str(path))
                await rc.resume_generation("rl")
            results = await asyncio.wait_for(asyncio.gather(*rl, *other), 600)
    finally:
        await post(client, "unload_lora_adapter", {"lora_name": "rl"})

    for r in results:
        (s,) = r.samples
        assert s.finish_reason == "length"
        assert len(s.token_ids) == MAX_TOKENS == len(s.logprobs)
        assert all(lp <= 0 for lp in s.logprobs)
        spans = s.lora_versions
        assert spans[0]["start"] == 0 and spans[-1]["end"] == MAX_TOKENS
        assert all(a["end"] == b["start"] for a, b in itertools.pairwise(spans))
    retried = [r.samples[0] for r in results[:6] if r.samples[0].attempts > 1]
    assert retried, "no sample was interrupted: the test proved nothing"
    assert any(len({sp["version"] for sp in s.lora_versions}) > 1 for s in retried)
    for r in results[6:]:
        assert r.samples[0].attempts == 1 and set(words(r.samples[0].text)) == {"woof"}


async def test_openai_sdk_reaches_the_same_adapters(client, server):
    sdk = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused")
    try:
        out = await sdk.completions.create(
            model="meow",
            prompt=PROMPT,
            max_tokens=6,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert words(out.choices[0].text) == ["meow"] * 6
        assert (out.choices[0].model_extra or {}).get("lora_versions")
        models = {m.id async for m in sdk.models.list()}
        assert {"meow", "woof", "toy-base"} <= models
    finally:
        await sdk.close()


@pytest.fixture(scope="module")
def second_server(toy, tmp_path_factory):
    """A second replica for this module's tests; the last one kills it."""
    port = free_port()
    log = tmp_path_factory.mktemp("second") / "second.log"
    server = start_server(lora_ext_cmd(toy, port), port, log, {})
    warm_up(server.url, ["meow"])
    yield server
    server.stop()


class KillOnLoad(httpx.AsyncBaseTransport):
    """Kills one replica's process the moment the client sends it the load: a crash in
    the middle of a sync, at a point the test chooses."""

    def __init__(self, victim_url: str, proc) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.victim = httpx.URL(victim_url)
        self.proc = proc

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.port == self.victim.port and request.url.path.endswith("/load_lora_adapter"):
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        return await self.inner.handle_async_request(request)


def prefix_cache(url: str) -> tuple[float, float]:
    """(queried, hit) prompt tokens of a replica's prefix cache, from vLLM's counters."""
    return (
        vllm_metric(url, "vllm:prefix_cache_queries_total"),
        vllm_metric(url, "vllm:prefix_cache_hits_total"),
    )


async def test_a_group_and_its_continuations_stay_where_their_prefix_is(
    client, server, second_server
):
    """GRPO sends a group's samples as separate requests with one session key: all land
    on one replica, whose prefix cache serves the shared prompt; a sample aborted
    mid-way is continued on the replica that made its tokens (cache hits there, not a
    single token queried on the other)."""
    urls = [server, second_server.url]
    long_prompt = " ".join([PROMPT] * 120)
    async with RemoteInferenceClient(urls) as rc:
        before = {u: prefix_cache(u) for u in urls}

        def one() -> Awaitable[SampleResponse]:
            return rc.sample_with_retry(
                "meow", prompt=long_prompt, max_tokens=4, session="group-7", temperature=1.0
            )

        # The first alone (requests prefilled in one engine step cannot hit each other's
        # blocks), then the rest of the group together.
        group = [await one(), *await asyncio.gather(*(one() for _ in range(3)))]
        (home,) = {r.replica for r in group}
        (away,) = set(urls) - {home}
        prompt_len = len(group[0].prompt_token_ids)
        after = {u: prefix_cache(u) for u in urls}
        assert after[away] == before[away], "a sample of the group went elsewhere"
        assert after[home][1] - before[home][1] >= 3 * (prompt_len // 2)  # 3 of 4 hit

        # A long sample, aborted mid-way where it runs, continues where its prefix is.
        made = {u: vllm_metric(u, "vllm:generation_tokens_total") for u in urls}
        sample = asyncio.create_task(
            rc.sample_with_retry(
                "meow", prompt=long_prompt, max_tokens=1500, ignore_eos=True, temperature=0
            )
        )
        async with httpx.AsyncClient(timeout=30) as c:
            for _ in range(600):  # until it runs on one of them
                states = {u: (await c.get(f"{u}/skyrl/v1/loras")).json() for u in urls}
                where = [
                    u
                    for u, body in states.items()
                    for a in body["adapters"]
                    if a["lora_name"] == "meow" and a["in_flight"]
                ]
                if where:
                    break
                await asyncio.sleep(0.02)
            (made_on,) = where
            for _ in range(600):  # some tokens are made (a state that lasts, not a time)
                if vllm_metric(made_on, "vllm:generation_tokens_total") >= made[made_on] + 2:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the long sample made no tokens in 30 s")
            mark = {u: prefix_cache(u) for u in urls}
            r = await c.post(f"{made_on}/skyrl/v1/abort_lora_requests", json={"lora_name": "meow"})
            assert r.json()["aborted"] == 1, r.text
        result = await asyncio.wait_for(sample, 120)
        done = {u: prefix_cache(u) for u in urls}
        (other,) = set(urls) - {made_on}
        assert result.samples[0].attempts == 2 and len(result.samples[0].token_ids) == 1500
        assert result.replica == made_on and done[other] == mark[other]
        assert done[made_on][1] - mark[made_on][1] >= prompt_len // 2  # the prefix was cached


async def test_sync_over_two_replicas_with_one_killed(client, server, second_server, toy):
    victim = second_server.url
    transport = KillOnLoad(victim, second_server.proc)
    async with RemoteInferenceClient([server, victim], transport=transport) as rc:
        before = (await rc.list_loras())[server]["meow"]["version"]
        with pytest.raises(FanoutError) as err:
            await rc.sync_lora("meow", str(toy.adapters["meow"]), pause=True)
        assert set(err.value.failures) == {victim}
        assert "load" in err.value.failures[victim]
        state = await loras(client)  # the survivor: on the new version, not paused
        assert not state["meow"]["paused"] and state["meow"]["version"] == before + 1
        # Sampling goes on through the survivor.
        r = await rc.sample_with_retry("meow", prompt=PROMPT, max_tokens=4, ignore_eos=True)
        assert r.replica == server and len(r.samples[0].token_ids) == 4
    for child in second_server.children:  # orphans of the crashed server
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
