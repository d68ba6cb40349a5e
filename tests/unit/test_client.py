"""The client's retry state machine and fan-out against scripted fake servers."""

from __future__ import annotations

import asyncio
import threading

import pytest
from fake_server import PROMPT_IDS, FakeServer, Replicas, expected_tokens
from pydantic import ValidationError

from vllm_lora_ext.client import (
    FanoutError,
    RemoteInferenceClient,
    RequestRejected,
    RetryPolicy,
    SampleRetryError,
    SyncInferenceClient,
)

FAST = RetryPolicy(deadline_s=5, max_attempts=20, backoff_initial_s=0.001, backoff_max_s=0.01)


def make(
    *scripts: list[tuple], **kwargs
) -> tuple[RemoteInferenceClient, list[FakeServer], Replicas]:
    servers = [FakeServer(script=list(s)) for s in scripts]
    transport = Replicas({f"r{i}": s for i, s in enumerate(servers)})
    urls = [f"http://r{i}" for i in range(len(servers))]
    kwargs.setdefault("retry", FAST)
    return RemoteInferenceClient(urls, transport=transport, **kwargs), servers, transport


def check_aligned(sample, max_tokens: int) -> None:
    assert sample.token_ids == expected_tokens(max_tokens)  # none dropped, none repeated
    assert sample.logprobs == [-(t - 100) / 1000 for t in sample.token_ids]  # 1:1, in order
    assert len(sample.token_ids) == max_tokens  # never over-generated


async def test_no_abort_is_one_dispatch():
    client, (server,), _ = make([])
    r = await client.sample_with_retry("meow", prompt_token_ids=PROMPT_IDS, max_tokens=8)
    check_aligned(r.samples[0], 8)
    assert r.samples[0].finish_reason == "length" and len(server.calls) == 1
    assert server.calls[0]["logprobs"] == 0 and server.calls[0]["prompt"] == PROMPT_IDS


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("cuts", [[3], [0, 5], [2, 0, 0, 1], [7]])
async def test_aborts_are_continued_to_exactly_max_tokens(cuts, stream):
    client, (server,), _ = make([("abort", k) for k in cuts])
    r = await client.sample_with_retry(
        "meow", prompt_token_ids=PROMPT_IDS, max_tokens=10, stream=stream
    )
    assert all(call["stream"] is stream for call in server.calls)
    check_aligned(r.samples[0], 10)
    assert r.samples[0].finish_reason == "length"
    assert server.made == 10
    # Each resubmission carries the prompt plus the tokens so far, and only what is left.
    done = 0
    for call, k in zip(server.calls[1:], cuts, strict=False):
        done += k
        assert call["prompt"] == PROMPT_IDS + expected_tokens(done)
        assert call["max_tokens"] == 10 - done and call["n"] == 1


async def test_abort_at_the_budget_is_a_length_finish():
    client, (server,), _ = make([("abort", 6)])
    r = await client.sample_with_retry("meow", prompt_token_ids=PROMPT_IDS, max_tokens=6)
    assert r.samples[0].finish_reason == "length" and len(server.calls) == 1


async def test_each_of_n_samples_is_continued_on_its_own():
    client, (server,), _ = make([("abort", 2, (1, 3))])
    r = await client.sample_with_retry("meow", prompt_token_ids=PROMPT_IDS, max_tokens=5, n=4)
    for s in r.samples:
        check_aligned(s, 5)
    assert [s.attempts for s in r.samples] == [1, 2, 1, 2]
    assert len(server.calls) == 3 and all(c["n"] == 1 for c in server.calls[1:])


async def test_version_spans_join_across_a_swap():
    client, (server,), _ = make([("abort", 4)])
    server.call_versions = [1, 2]  # the adapter was swapped between the two calls
    r = await client.sample_with_retry("meow", prompt_token_ids=PROMPT_IDS, max_tokens=10)
    assert r.samples[0].lora_versions == [
        {"version": 1, "start": 0, "end": 4},
        {"version": 2, "start": 4, "end": 10},
    ]
    assert r.version == 2


async def test_slow_resume_503s_are_retried_with_backoff():
    client, (server,), _ = make([("abort", 3), (503, "paused"), (503, "paused")])
    r = await client.sample_with_retry("meow", prompt_token_ids=PROMPT_IDS, max_tokens=6)
    check_aligned(r.samples[0], 6)
    assert len(server.calls) == 4


async def test_deadline_expiry_raises_with_the_partial_result():
    policy = RetryPolicy(deadline_s=0.2, max_attempts=1000, backoff_initial_s=0.01)
    client, _, _ = make([("abort", 4), *[(503, "paused")] * 1000], retry=policy)
    with pytest.raises(SampleRetryError, match="deadline") as err:
        await client.sample_with_retry("meow", prompt_token_ids=PROMPT_IDS, max_tokens=10)
    partial = err.value.partial.samples[0]
    assert partial.token_ids == expected_tokens(4) and partial.finish_reason == "abort"


@pytest.mark.parametrize("field", ["deadline_s", "backoff_initial_s", "backoff_max_s"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e9, 0])
def test_a_retry_without_a_bound_is_refused(field, value):
    """An infinite deadline (or backoff) would retry a paused adapter for ever."""
    with pytest.raises(ValidationError, match=field):
        RetryPolicy(**{field: value})


async def test_max_attempts_bounds_an_abort_storm():
    policy = FAST.model_copy(update={"max_attempts": 3})
    client, _, _ = make([("abort", 1)] * 10, retry=policy)
    with pytest.raises(SampleRetryError, match="3 attempts") as err:
        await client.sample_with_retry("meow", prompt_token_ids=PROMPT_IDS, max_tokens=10)
    assert err.value.partial.samples[0].token_ids == expected_tokens(3)


async def test_client_errors_are_not_retried():
    client, (server,), _ = make([(404, "unknown adapter 'nope'")])
    with pytest.raises(RequestRejected, match="unknown adapter") as err:
        await client.sample_with_retry("nope", prompt_token_ids=PROMPT_IDS, max_tokens=4)
    assert err.value.status == 404 and len(server.calls) == 1


async def test_a_dead_replica_is_skipped_then_readmitted_by_its_health_check():
    client, servers, transport = make([], [], down_for_s=60)
    transport.down.add("r0")
    client.replicas[1].in_flight += 100  # r0 is the first choice (not a coin toss)...
    for _ in range(6):
        r = await client.sample("meow", prompt_token_ids=PROMPT_IDS, max_tokens=2)
        assert r.replica == "http://r1"
    client.replicas[1].in_flight -= 100
    assert transport.refused.count("r0") == 1  # ...tried once, then left alone
    transport.down.clear()
    servers[0].healthy = False  # back up, but not healthy yet
    client.replicas[0].down_until = 0  # its time out is over
    client.replicas[1].in_flight += 100  # so r0, once up, is always the first choice
    for _ in range(4):
        r = await client.sample("meow", prompt_token_ids=PROMPT_IDS, max_tokens=2)
        assert r.replica == "http://r1"
    assert servers[0].health_checks == 1 and not servers[0].calls  # probed, refused
    servers[0].healthy = True
    client.replicas[0].down_until = 0
    # r1 stays busy: with equal loads each pick is a coin toss (CI once drew r1 8 times)
    await asyncio.gather(
        *(client.sample("meow", prompt_token_ids=PROMPT_IDS, max_tokens=2) for _ in range(8))
    )
    client.replicas[1].in_flight -= 100
    assert servers[0].health_checks == 2  # probed once more, passed...
    assert len(servers[0].calls) == 8 and not client.replicas[0].suspect  # ...back in rotation


async def test_sync_lora_names_the_failed_replica_and_leaves_none_paused():
    client, servers, transport = make([], [], [])
    servers[1].control_fail["load_lora_adapter"] = 400
    transport.down.add("r2")
    with pytest.raises(FanoutError) as err:
        await client.sync_lora("meow", "/ckpt/7", pause=True)
    assert set(err.value.failures) == {"http://r1", "http://r2"}
    assert "load" in err.value.failures["http://r1"]
    assert "pause" in err.value.failures["http://r2"]
    for server in servers[:2]:  # both reachable replicas were paused, then resumed
        ops = [op for op, _ in server.control]
        assert ops[0] == "pause" and ops[-1] == "resume"
    assert servers[0].version == 2 and servers[1].version == 1


async def test_fanout_reaches_every_replica():
    client, servers, _ = make([], [])
    state = await client.list_loras()
    assert set(state) == {"http://r0", "http://r1"}
    assert state["http://r0"]["meow"]["version"] == 1
    await client.sync_lora("meow", "/ckpt/2")
    assert [s.version for s in servers] == [2, 2]


async def test_a_versioned_sync_sends_the_version_to_every_replica():
    client, servers, _ = make([], [])
    await client.sync_lora("meow", "/ckpt/step_12", version=12)
    await client.sync_lora("meow", "/ckpt/step_13", pause=True, version=13)
    for server in servers:
        loads = [body for op, body in server.control if op == "load_lora_adapter"]
        assert [b.get("version") for b in loads] == [12, 13]
        assert [b["lora_path"] for b in loads] == ["/ckpt/step_12", "/ckpt/step_13"]


# ---- routing ------------------------------------------------------------------------
async def test_a_session_sticks_to_one_replica_and_sessions_spread():
    client, _, _ = make([], [], [])
    homes = {}
    for k in range(24):
        seen = {
            (await client.sample("meow", prompt_token_ids=PROMPT_IDS, session=f"g{k}")).replica
            for _ in range(3)
        }
        assert len(seen) == 1, seen  # every request of the group on one replica
        homes[k] = seen.pop()
    assert len(set(homes.values())) == 3  # and the groups spread over the replicas


async def test_a_session_moves_only_while_its_replica_is_down():
    client, _, transport = make([], [], [], down_for_s=0.0)
    home = (await client.sample("meow", prompt_token_ids=PROMPT_IDS, session="g")).replica
    transport.down.add(home.removeprefix("http://"))
    away = (await client.sample("meow", prompt_token_ids=PROMPT_IDS, session="g")).replica
    assert away != home
    transport.down.clear()
    back = (await client.sample("meow", prompt_token_ids=PROMPT_IDS, session="g")).replica
    assert back == home


async def test_a_changed_replica_set_moves_only_the_sessions_of_the_replicas_that_changed():
    client, _, _ = make([], [], [], [])
    client.set_replicas(["http://r0", "http://r1", "http://r2"])  # r3 not yet serving
    before = {
        k: (await client.sample("meow", prompt_token_ids=PROMPT_IDS, session=f"s{k}")).replica
        for k in range(40)
    }
    client.set_replicas(["http://r0", "http://r1", "http://r2", "http://r3"])
    after = {
        k: (await client.sample("meow", prompt_token_ids=PROMPT_IDS, session=f"s{k}")).replica
        for k in range(40)
    }
    moved = {k for k in before if before[k] != after[k]}
    assert moved and all(after[k] == "http://r3" for k in moved)  # only onto the new one
    assert len(moved) < 20
    client.set_replicas(["http://r0", "http://r1", "http://r2"])  # r3 leaves again
    again = {
        k: (await client.sample("meow", prompt_token_ids=PROMPT_IDS, session=f"s{k}")).replica
        for k in range(40)
    }
    assert again == before


async def test_a_continuation_returns_to_the_replica_that_made_its_tokens():
    client, servers, _ = make([("abort", 3)], [("abort", 3)], [("abort", 3)])
    r = await client.sample_with_retry("meow", prompt_token_ids=PROMPT_IDS, max_tokens=8)
    check_aligned(r.samples[0], 8)
    (served,) = [s for s in servers if s.calls]  # the first segment and its continuation
    assert len(served.calls) == 2


def test_usable_from_several_event_loops_and_threads():
    client, _, _ = make([])

    async def once() -> list[int]:
        r = await client.sample("meow", prompt_token_ids=PROMPT_IDS, max_tokens=3)
        return r.samples[0].token_ids

    assert asyncio.run(once()) == expected_tokens(3)
    assert asyncio.run(once()) == expected_tokens(3)  # a new loop: no stale state
    out: list[list[int]] = []
    t = threading.Thread(target=lambda: out.append(asyncio.run(once())))
    t.start()
    t.join(10)
    assert out == [expected_tokens(3)]


def test_sync_wrapper():
    servers = {"r0": FakeServer(script=[("abort", 2)])}
    with SyncInferenceClient(["http://r0"], transport=Replicas(servers), retry=FAST) as c:
        r = c.sample_with_retry("meow", prompt_token_ids=PROMPT_IDS, max_tokens=5)
        assert r.samples[0].token_ids == expected_tokens(5)
        assert c.list_loras()["http://r0"]["meow"]["version"] == 1


@pytest.mark.parametrize("stream", [True, False])
async def test_tokens_without_a_logprob_are_dropped_and_made_again(stream):
    client, (server,), _ = make([("abort", 5)])
    server.short_logprobs = 1
    r = await client.sample_with_retry(
        "meow", prompt_token_ids=PROMPT_IDS, max_tokens=8, stream=stream
    )
    check_aligned(r.samples[0], 8)
    assert server.calls[1]["prompt"] == PROMPT_IDS + expected_tokens(4)


@pytest.mark.parametrize("stream", [True, False])
async def test_a_final_segment_missing_logprobs_is_made_again_not_dropped(stream):
    """The last segment ends 'length' but its last token came without a logprob: the
    token is cut and made again, so the result still holds exactly max_tokens."""
    client, (server,), _ = make([])
    server.short_logprobs = 1
    r = await client.sample_with_retry(
        "meow", prompt_token_ids=PROMPT_IDS, max_tokens=8, stream=stream
    )
    check_aligned(r.samples[0], 8)
    assert r.samples[0].finish_reason == "length" and len(server.calls) == 2
    assert server.calls[1]["prompt"] == PROMPT_IDS + expected_tokens(7)


async def test_continuations_lower_min_tokens_and_drop_the_seed():
    client, (server,), _ = make([("abort", 5)])
    r = await client.sample_with_retry(
        "meow", prompt_token_ids=PROMPT_IDS, max_tokens=10, min_tokens=8, seed=3
    )
    check_aligned(r.samples[0], 10)
    first, cont = server.calls
    assert first["min_tokens"] == 8 and first["seed"] == 3
    assert cont["min_tokens"] == 3 and "seed" not in cont


@pytest.mark.parametrize("n", [1, 3])
async def test_a_replica_dying_mid_stream_loses_no_token(n):
    """The stream breaks off after 4 tokens of each sample: those are kept, with their
    version, and each sample is continued on the other replica."""
    client, servers, _ = make([("die", 4)], [], down_for_s=60)
    servers[1].version = 2
    client.replicas[1].in_flight = 100  # the first segment goes to r0
    r = await client.sample_with_retry("meow", prompt_token_ids=PROMPT_IDS, max_tokens=10, n=n)
    assert len(r.samples) == n
    for sample in r.samples:
        check_aligned(sample, 10)
        assert sample.finish_reason == "length" and sample.attempts == 2
        assert sample.lora_versions == [
            {"version": 1, "start": 0, "end": 4},
            {"version": 2, "start": 4, "end": 10},
        ]
    assert servers[0].made == 4 * n and servers[1].made == 6 * n  # nothing made twice
    assert r.samples[0].text == "".join(f"<{t}>" for t in expected_tokens(10))
    assert all(c["prompt"] == PROMPT_IDS + expected_tokens(4) for c in servers[1].calls)
    assert client.replicas[0].down_until > 0 and client.replicas[0].suspect


async def test_a_text_prompt_aborted_before_its_first_token_is_sent_again():
    """Streamed, vLLM sends nothing for a sample aborted before its first token (no
    prompt ids to continue from): it is sent again with the prompt as given."""
    client, (server,), _ = make([("abort", 0)])
    r = await client.sample_with_retry("meow", prompt="hello", max_tokens=6)
    check_aligned(r.samples[0], 6)
    assert [c["prompt"] for c in server.calls] == ["hello", "hello"]
    assert r.prompt_token_ids == PROMPT_IDS


async def test_an_error_event_mid_stream_keeps_what_arrived():
    client, (server,), _ = make([("error", 3)])
    r = await client.sample_with_retry("meow", prompt_token_ids=PROMPT_IDS, max_tokens=7)
    check_aligned(r.samples[0], 7)
    assert server.made == 7 and server.calls[1]["prompt"] == PROMPT_IDS + expected_tokens(3)


async def test_stream_error_events_before_a_token_are_judged_by_their_code():
    """A 503 event (a paused adapter's hold timed out, sent after the 200 headers) is
    retried without taking the replica out; a 404 event is the caller's error."""
    client, (server,), _ = make([("error", 0, 503), ("error", 0, 503)])
    r = await client.sample_with_retry("meow", prompt_token_ids=PROMPT_IDS, max_tokens=5)
    check_aligned(r.samples[0], 5)
    assert len(server.calls) == 3 and not client.replicas[0].suspect
    assert server.health_checks == 0  # never suspected, never probed

    client, (server,), _ = make([("error", 0, 404)])
    with pytest.raises(RequestRejected) as err:
        await client.sample_with_retry("meow", prompt_token_ids=PROMPT_IDS, max_tokens=5)
    assert err.value.status == 404 and len(server.calls) == 1


async def test_a_stream_that_dies_before_a_token_is_sent_again():
    client, servers, _ = make([("die", 0)], [])
    client.replicas[1].in_flight = 100
    r = await client.sample_with_retry("meow", prompt_token_ids=PROMPT_IDS, max_tokens=5)
    check_aligned(r.samples[0], 5)
    assert r.samples[0].attempts == 1 and servers[1].calls[0]["prompt"] == PROMPT_IDS


async def test_the_client_follows_its_replica_source():
    """A replica set that changes (a supervisor restarted a replica on a new address):
    when nothing listed answers, the client asks the source at once; otherwise every
    refresh_every_s. A failing source leaves the current set serving."""
    current = ["http://r1"]
    asked: list[int] = []

    async def source() -> list[str]:
        asked.append(1)
        if current is None:
            raise RuntimeError("supervisor unreachable")
        return current

    client, _, transport = make(
        [], [], [], replica_source=source, refresh_every_s=3600, down_for_s=60
    )
    client.set_replicas(["http://r0"])
    transport.down.add("r0")  # r0 died; its replacement is r1
    r = await client.sample_with_retry("meow", prompt_token_ids=PROMPT_IDS, max_tokens=4)
    check_aligned(r.samples[0], 4)
    assert r.replica == "http://r1" and [x.url for x in client.replicas] == ["http://r1"]
    assert len(asked) == 1  # only when needed, with an hour between scheduled refreshes

    client.refresh_every_s = 0  # from now on, every dispatch asks
    current[:] = ["http://r1", "http://r2"]
    await client.sample("meow", prompt_token_ids=PROMPT_IDS, max_tokens=2)
    assert [x.url for x in client.replicas] == ["http://r1", "http://r2"]
    current = None  # the source fails: the set stays
    r = await client.sample("meow", prompt_token_ids=PROMPT_IDS, max_tokens=2)
    assert r.replica in {"http://r1", "http://r2"} and len(client.replicas) == 2


async def test_one_failed_sample_cancels_the_others_and_keeps_the_partial():
    """Sample 0's continuation is refused (its adapter was unloaded); sample 1 keeps
    meeting 503s. The caller gets the refusal with what was made, and sample 1 stops
    retrying at once (it went on until the deadline)."""
    script = [("abort", 2, (0, 1)), (404, "unknown adapter 'meow'"), *[(503, "paused")] * 500]
    client, (server,), _ = make(script)
    with pytest.raises(RequestRejected) as err:
        await client.sample_with_retry("meow", prompt_token_ids=PROMPT_IDS, max_tokens=8, n=2)
    assert err.value.status == 404
    partial = err.value.partial
    assert partial is not None and [s.token_ids for s in partial.samples] == [
        expected_tokens(2),
        expected_tokens(2),
    ]
    calls = len(server.calls)
    await asyncio.sleep(0.3)
    assert len(server.calls) == calls  # nobody is retrying for a caller who has the error
    assert client.replicas[0].in_flight == 0


async def test_a_sample_cancelled_during_a_health_probe_leaves_nothing_in_flight():
    client, _, _ = make([])
    replica = client.replicas[0]
    replica.suspect = True
    probing = asyncio.Event()

    async def slow_probe(r):
        probing.set()
        await asyncio.sleep(60)
        return True

    client._healthy = slow_probe  # type: ignore[method-assign]
    task = asyncio.create_task(client.sample("meow", prompt_token_ids=PROMPT_IDS))
    await asyncio.wait_for(probing.wait(), 5)
    assert replica.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert replica.in_flight == 0


@pytest.mark.parametrize(
    "sampling",
    [
        {"stop": ["</answer>"]},
        {"presence_penalty": 0.5},
        {"response_format": {"type": "json_object"}},
        {"structured_outputs": {"regex": "a+"}},
    ],
)
async def test_samples_that_cannot_be_continued_exactly_end_partial_saying_why(sampling):
    client, (server,), _ = make([("abort", 3)])
    r = await client.sample_with_retry(
        "meow", prompt_token_ids=PROMPT_IDS, max_tokens=10, **sampling
    )
    s = r.samples[0]
    assert s.finish_reason == "abort" and s.token_ids == expected_tokens(3)
    assert s.stop_reason.startswith("not continued: ") and len(server.calls) == 1


async def test_repetition_penalty_is_continued_it_covers_the_prompt_too():
    client, (server,), _ = make([("abort", 3)])
    r = await client.sample_with_retry(
        "meow", prompt_token_ids=PROMPT_IDS, max_tokens=10, repetition_penalty=1.2
    )
    check_aligned(r.samples[0], 10)
    assert len(server.calls) == 2
