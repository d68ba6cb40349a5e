"""Client for training controllers: sampling that survives pauses and swaps, and control
operations fanned out over every replica.

- :meth:`RemoteInferenceClient.sample` dispatches once to the least-loaded healthy replica.
- :meth:`RemoteInferenceClient.sample_with_retry` turns an ``abort`` (a pause in mode
  ``abort``, an abort route, a swap with ``interrupt: abort``) into a continuation: it
  keeps the partial tokens and logprobs and resubmits ``prompt + tokens so far`` with what
  is left of ``max_tokens``, so the result holds exactly the tokens the caller asked for.
  It streams, so a replica that dies mid-sample loses nothing either: what arrived is
  kept (with its version spans: the server names them where a version starts) and the sample is
  continued on another replica.
  While the adapter is paused the server holds the resubmitted request (and answers 503
  once its hold times out); the client backs off, bounded by a deadline and a number of
  attempts, then raises :class:`SampleRetryError` carrying the partial result.
- Control operations (pause, resume, load, unload, list, ``sync_lora``) go to every
  replica at once and report exactly which replicas failed (:class:`FanoutError`).

No asyncio object outlives the event loop that made it: one ``httpx.AsyncClient`` per
loop, so the client can be shared by coroutines and used from several loops or threads.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal
from httpx_sse import EventSource
from pydantic import BaseModel, Field
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from vllm_lora_ext import continuable
from vllm_lora_ext.config import Seconds

ROUTES = "/skyrl/v1"
VERSION_HEADER = "x-lora-version"
#: Calls that change what a fleet serves (through ``control`` when a client has one).
FLEET_OPS = frozenset(
    {"load_lora_adapter", "unload_lora_adapter", "pause", "resume", "pin_lora_adapter"}
)
logger = logging.getLogger(__name__)


class RetryPolicy(BaseModel):
    """Bounds of :meth:`RemoteInferenceClient.sample_with_retry`."""

    deadline_s: Seconds = 600.0
    max_attempts: int = Field(default=64, ge=1)
    backoff_initial_s: Seconds = 0.05
    backoff_max_s: Seconds = 2.0


@dataclass
class Sample:
    """One sample: tokens and the logprob of each (1:1), never the prompt's."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_versions: list[dict[str, int]] = field(default_factory=list)
    attempts: int = 0

    def extend(self, seg: Sample) -> None:
        """Append a continuation segment (its spans shift by the tokens before it)."""
        offset = len(self.token_ids)
        for span in seg.lora_versions:
            shifted = {**span, "start": span["start"] + offset, "end": span["end"] + offset}
            last = self.lora_versions[-1] if self.lora_versions else None
            if last and last["version"] == shifted["version"] and last["end"] == shifted["start"]:
                last["end"] = shifted["end"]
            else:
                self.lora_versions.append(shifted)
        self.token_ids += seg.token_ids
        self.logprobs += seg.logprobs
        self.text += seg.text
        self.finish_reason = seg.finish_reason
        self.stop_reason = seg.stop_reason


@dataclass
class SampleResponse:
    samples: list[Sample]
    prompt_token_ids: list[int]
    replica: str | None = None
    version: int | None = None  # the final adapter version (x-lora-version)


class ClientError(Exception):
    pass


class RequestRejected(ClientError):
    """The server refused the request (4xx): retrying it unchanged cannot help.
    ``partial`` holds what ``sample_with_retry`` had made before (None from ``sample``)."""

    def __init__(self, status: int, message: str, replica: str) -> None:
        super().__init__(f"{replica} answered {status}: {message}")
        self.status, self.message, self.replica = status, message, replica
        self.partial: SampleResponse | None = None


class NoReplicaAvailable(ClientError):
    pass


class SampleRetryError(ClientError):
    """``sample_with_retry`` ran out of time or attempts; ``partial`` has what was made."""

    def __init__(self, message: str, partial: SampleResponse) -> None:
        super().__init__(message)
        self.partial = partial


class FanoutError(ClientError):
    """A control operation failed on some replicas: ``failures`` names each, with why;
    ``results`` holds the answers of the others."""

    def __init__(self, op: str, failures: dict[str, str], results: dict[str, Any]) -> None:
        detail = "; ".join(f"{url}: {why}" for url, why in failures.items())
        super().__init__(f"{op} failed on {len(failures)} replica(s): {detail}")
        self.op, self.failures, self.results = op, failures, results


class _Transient(Exception):
    """Worth another try (on this or another replica)."""


@dataclass
class _Replica:
    url: str
    in_flight: int = 0
    down_until: float = 0.0
    suspect: bool = False  # failed before: must pass /health before it gets requests


@dataclass(frozen=True)
class _Route:
    """Where a request would rather go: a session key, or the replica holding its
    prefix (a continuation)."""

    session: str | None
    replica: str | None = None


@dataclass
class Scored:
    """The logprob of each given token under one adapter version (``None`` for the
    first token: nothing precedes it)."""

    token_ids: list[int]
    logprobs: list[float | None]
    version: int | None  # the adapter version that scored them (None: the base model)
    replica: str


def _rendezvous(session: str, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{session}\x00{url}".encode(), digest_size=8).digest())


def _error_text(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:500]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message", err))
        return str(err)
    return str(body)


class RemoteInferenceClient:
    """Talks to one or many servers running the lora_ext routes (data-parallel replicas)."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        timeout_s: float = 600.0,
        api_key: str | None = None,
        admin_key: str | None = None,
        retry: RetryPolicy | None = None,
        down_for_s: float = 5.0,
        max_connections: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,
        replica_source: Callable[[], Awaitable[Sequence[str]]] | None = None,
        refresh_every_s: float = 5.0,
        control: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        """``replica_source`` (e.g. a supervisor's ``urls()``, see
        ``ray_actors.supervisor.follow``) is asked for the replica set every
        ``refresh_every_s`` and whenever no listed replica answers: the client follows
        restarts and replicas added or removed. ``control`` (a fleet supervisor's
        ``control``) takes the calls that change what the fleet serves (loads, unloads,
        pins, pauses, resumes): it records them as the fleet's desired state, then fans
        them out, so a replica that is down or restarting gets them too."""
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("at least one server URL is needed")
        self.replicas = [_Replica(u.rstrip("/")) for u in urls]
        self.timeout_s = timeout_s
        self.api_key = api_key
        self.admin_key = admin_key
        self.retry = retry or RetryPolicy()
        self.down_for_s = down_for_s
        self.max_connections = max_connections
        self._transport = transport  # tests: a scripted server
        self.replica_source = replica_source
        self.refresh_every_s = refresh_every_s
        self.control = control
        self._refreshed = time.monotonic()
        self._lock = threading.Lock()
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient]
        self._clients = weakref.WeakKeyDictionary()

    # ---- connections ------------------------------------------------------------------
    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._clients.get(loop)
            if client is None or client.is_closed:
                client = httpx.AsyncClient(
                    timeout=httpx.Timeout(self.timeout_s, connect=10.0),
                    limits=httpx.Limits(max_connections=self.max_connections),
                    transport=self._transport,
                )
                self._clients[loop] = client
            return client

    async def aclose(self) -> None:
        """Close this loop's connections (other loops close theirs, or on collection)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._clients.pop(loop, None)
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> RemoteInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _headers(self, admin: bool) -> dict[str, str]:
        key = self.admin_key if admin else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    # ---- replica choice -----------------------------------------------------------------
    def set_replicas(self, urls: Sequence[str]) -> None:
        """Follow a replica set that changed (a supervisor's ``urls()``): replicas that
        stay keep their load and health state; requests in flight finish where they are."""
        urls = [u.rstrip("/") for u in urls]
        if not urls:
            raise ValueError("at least one server URL is needed")
        with self._lock:
            known = {r.url: r for r in self.replicas}
            self.replicas = [known.get(u) or _Replica(u) for u in dict.fromkeys(urls)]

    async def refresh_replicas(self, force: bool = False) -> None:
        """Take the replica set from ``replica_source`` (when due, or ``force``); a
        source that fails or answers nothing leaves the current set serving."""
        if self.replica_source is None:
            return
        with self._lock:
            if not force and time.monotonic() - self._refreshed < self.refresh_every_s:
                return
            self._refreshed = time.monotonic()  # one caller asks; the others go on
        try:
            urls = await asyncio.wait_for(self.replica_source(), 30)
        except Exception as e:  # any failure: keep what we have
            logger.warning(
                "replica source failed (%s: %s); keeping %d replicas",
                type(e).__name__,
                e,
                len(self.replicas),
            )
            return
        if urls:
            self.set_replicas(urls)

    def _pick(self, avoid: set[str], route: _Route | None = None) -> _Replica:
        """Where a request goes: the replica a route names or its session hashes to
        (rendezvous hashing: a replica joining or leaving moves only its share of
        sessions), if up; else the least busy one."""
        now = time.monotonic()
        with self._lock:
            up = [r for r in self.replicas if r.down_until <= now and r.url not in avoid]
            if not up:  # everything is down or was just tried: the least recently failed
                up = sorted(self.replicas, key=lambda r: r.down_until)[:1]
            best = None
            if route is not None and route.replica is not None:
                best = next((r for r in up if r.url == route.replica), None)
            if best is None and route is not None and route.session is not None:
                best = max(up, key=lambda r: _rendezvous(route.session, r.url))
            if best is None:
                best = min(up, key=lambda r: (r.in_flight, random.random()))
            best.in_flight += 1
            return best

    def _done(self, replica: _Replica, failed: bool) -> None:
        with self._lock:
            replica.in_flight -= 1
            if failed:
                replica.down_until = time.monotonic() + self.down_for_s
                replica.suspect = True
            else:
                replica.down_until = 0.0
                replica.suspect = False

    async def _healthy(self, replica: _Replica) -> bool:
        """A replica that failed comes back only once its ``/health`` answers 200."""
        if not replica.suspect:
            return True
        try:
            r = await self._http().get(f"{replica.url}/health", timeout=5.0)
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        with self._lock:
            if ok:
                replica.suspect = False
            else:
                replica.down_until = time.monotonic() + self.down_for_s
        return ok

    async def _choose(self, tried: set[str], route: _Route | None = None) -> _Replica:
        await self.refresh_replicas()
        while True:
            replica = self._pick(tried, route)
            try:
                healthy = await self._healthy(replica)
            except BaseException:  # cancelled while probing: the pick is not in flight
                with self._lock:
                    replica.in_flight -= 1
                raise
            if healthy:
                return replica
            self._done(replica, failed=True)
            tried.add(replica.url)
            if all(r.url in tried for r in self.replicas):
                await self.refresh_replicas(force=True)  # for the next attempt
                raise _Transient(f"no healthy replica (last tried {replica.url})")

    # ---- sampling -----------------------------------------------------------------------
    async def sample(
        self,
        lora_name: str | None,
        *,
        prompt_token_ids: list[int] | None = None,
        prompt: str | None = None,
        max_tokens: int = 16,
        n: int = 1,
        version: int | None = None,
        base_model: str | None = None,
        session: str | None = None,
        **sampling: Any,
    ) -> SampleResponse:
        """One dispatch. ``lora_name=None`` samples the base model (``base_model`` names
        it); ``version`` pins one resident version of the adapter; requests with the same
        ``session`` (e.g. a GRPO group's id) go to the same replica while it is up, where
        their shared prefix is cached. Extra keyword arguments are OpenAI/vLLM sampling
        fields (``temperature``, ``stop``, ...)."""
        model = self._model(lora_name, version, base_model)
        body = self._body(model, prompt_token_ids, prompt, max_tokens, n, sampling)
        tried: set[str] = set()
        last: Exception | None = None
        for _ in range(len(self.replicas)):
            try:
                return await self._complete(body, tried, _Route(session))
            except _Transient as e:  # a replica is down: the next one
                last = e
        raise NoReplicaAvailable(f"no replica could serve the request: {last}")

    async def sample_with_retry(
        self,
        lora_name: str | None,
        *,
        prompt_token_ids: list[int] | None = None,
        prompt: str | None = None,
        max_tokens: int = 16,
        n: int = 1,
        version: int | None = None,
        base_model: str | None = None,
        retry: RetryPolicy | None = None,
        session: str | None = None,
        stream: bool = True,
        **sampling: Any,
    ) -> SampleResponse:
        """Like :meth:`sample`, but an aborted sample is continued until it ends on its
        own (``stop``/``length``); each of ``n`` samples is continued on its own, on the
        replica that made its tokens so far (its prefix is cached there) while it is up.
        Streamed (``stream``), a sample whose replica dies keeps every token that
        arrived and is continued on another replica."""
        policy = retry or self.retry
        deadline = time.monotonic() + policy.deadline_s
        model = self._model(lora_name, version, base_model)
        first = await self._retrying(
            self._body(model, prompt_token_ids, prompt, max_tokens, n, sampling, stream),
            policy,
            deadline,
            None,
            route=_Route(session),
        )
        state = SampleResponse(
            samples=[replace(s, attempts=1) for s in first.samples],
            prompt_token_ids=first.prompt_token_ids or list(prompt_token_ids or []),
            replica=first.replica,
            version=first.version,
        )
        given = prompt_token_ids if prompt_token_ids is not None else prompt
        assert given is not None  # (checked by _body)
        await _all_or_none(
            self._finish_sample(
                state, i, model, given, max_tokens, sampling, policy, deadline, stream
            )
            for i in range(len(state.samples))
        )
        versions = [s.lora_versions[-1]["version"] for s in state.samples if s.lora_versions]
        state.version = max(versions) if versions else state.version
        return state

    async def _finish_sample(
        self,
        state: SampleResponse,
        index: int,
        model: str,
        given: list[int] | str,
        max_tokens: int,
        sampling: dict[str, Any],
        policy: RetryPolicy,
        deadline: float,
        stream: bool,
    ) -> None:
        """Continue sample ``index`` until it ends on its own. A sample aborted before
        its first token may come without prompt ids (vLLM streams nothing for it): it
        is sent again with the prompt as the caller gave it."""
        sample = state.samples[index]
        while sample.finish_reason == "abort":
            left = max_tokens - len(sample.token_ids)
            if left <= 0:  # aborted exactly at the budget: that is a length finish
                sample.finish_reason = "length"
                return
            why = continuable.why_not(sampling)
            if why is not None:  # a continuation would not be the same generation
                sample.stop_reason = continuable.PREFIX + why
                return
            if sample.attempts >= policy.max_attempts:
                raise SampleRetryError(
                    f"sample {index} still aborted after {sample.attempts} attempts", state
                )
            if state.prompt_token_ids:
                ids, text = [*state.prompt_token_ids, *sample.token_ids], None
            elif not sample.token_ids:
                ids, text = (None, given) if isinstance(given, str) else (given, None)
            else:
                raise SampleRetryError("the server returned no prompt token ids to continue", state)
            body = self._body(
                model, ids, text, left, 1, _continued(sampling, len(sample.token_ids)), stream
            )
            route = _Route(None, replica=state.replica)
            try:
                seg = await self._retrying(
                    body, policy, deadline, state, progress=True, route=route
                )
            except RequestRejected as e:  # e.g. the adapter was unloaded meanwhile
                e.partial = state
                raise
            state.prompt_token_ids = state.prompt_token_ids or seg.prompt_token_ids
            state.replica = seg.replica
            sample.attempts += 1
            sample.extend(seg.samples[0])

    async def _retrying(
        self,
        body: dict[str, Any],
        policy: RetryPolicy,
        deadline: float,
        partial: SampleResponse | None,
        progress: bool = False,
        route: _Route | None = None,
    ) -> SampleResponse:
        """One segment, retried with jittered backoff on transient failures (a replica
        down, a 503, and with ``progress`` an abort that made no token), bounded by the
        policy's attempts and deadline."""
        tried: set[str] = set()

        def next_round(_: RetryCallState) -> None:
            if len(tried) >= len(self.replicas):
                tried.clear()

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Transient),
            stop=stop_after_attempt(policy.max_attempts)
            | stop_before_delay(max(0.0, deadline - time.monotonic())),
            wait=wait_random_exponential(
                multiplier=policy.backoff_initial_s, max=policy.backoff_max_s
            ),
            before_sleep=next_round,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if time.monotonic() > deadline:
                        raise SampleRetryError(
                            f"deadline of {policy.deadline_s}s passed", partial or _empty(body)
                        )
                    seg = await self._complete(body, tried, route)
                    if progress and seg.samples[0].finish_reason == "abort":
                        if not seg.samples[0].token_ids:
                            raise _Transient("aborted again before making a token")
                    return seg
        except _Transient as e:
            attempts = retrying.statistics.get("attempt_number", 0)
            why = (
                f"gave up after {attempts} attempts"
                if attempts >= policy.max_attempts
                else f"deadline of {policy.deadline_s}s passed"
            )
            raise SampleRetryError(f"{why}: {e}", partial or _empty(body)) from e
        raise AssertionError("unreachable")  # pragma: no cover

    async def _complete(
        self, body: dict[str, Any], tried: set[str], route: _Route | None = None
    ) -> SampleResponse:
        replica = await self._choose(tried, route)
        tried.add(replica.url)
        failed = False
        try:
            if body["stream"]:
                got, broken, code = await self._streamed(replica.url, body)
                if not broken:
                    return got.response(replica.url)
                # Cut off (no code) or an engine failure: the replica is suspect. A 503
                # (a paused adapter's hold timed out) is not the replica's failure.
                failed = code is None or (code >= 500 and code != 503)
                if got.made_tokens():
                    logger.warning("%s: stream ended early (%s); kept it", replica.url, broken)
                    return got.response(replica.url)
                if code is not None and 400 <= code < 500:
                    raise RequestRejected(code, broken, replica.url)
                raise _Transient(f"{replica.url}: stream ended before a token: {broken}")
            r = await self._http().post(
                f"{replica.url}/v1/completions", json=body, headers=self._headers(False)
            )
        except httpx.TransportError as e:
            failed = True
            raise _Transient(f"{replica.url}: {type(e).__name__}: {e}") from e
        finally:
            self._done(replica, failed)
        _check_status(r, replica.url)
        return _parse(r.json(), r.headers, replica.url)

    async def _streamed(self, url: str, body: dict[str, Any]) -> tuple[_Streamed, str, int | None]:
        """One streamed segment; why it ended early ("" if it did not) and the status
        code of vLLM's error event (None: the connection broke). Ended early after tokens
        arrived (the replica or its engine died), it is not an error: its unfinished
        samples end ``abort`` with what arrived, to be continued elsewhere."""
        got = _Streamed(body["n"])
        broken = ""
        code: int | None = None
        try:
            async with self._http().stream(
                "POST", f"{url}/v1/completions", json=body, headers=self._headers(False)
            ) as r:
                if r.status_code != 200:
                    await r.aread()
                    _check_status(r, url)
                got.version = r.headers.get(VERSION_HEADER)
                async for sse in EventSource(r).aiter_sse():
                    if sse.data == "[DONE]" or not sse.data:
                        continue
                    try:
                        event = json.loads(sse.data)
                    except ValueError:
                        event = None
                    if not isinstance(event, dict):
                        broken, code = f"not an event: {sse.data[:200]!r}", 500
                        break
                    if "error" in event:  # vLLM reports a failure mid-stream this way
                        broken, code = _error_of(event)
                        break
                    got.add(event)
        except httpx.TransportError as e:
            broken = f"{type(e).__name__}: {e}"
        return got, broken, code

    @staticmethod
    def _model(lora_name: str | None, version: int | None, base_model: str | None) -> str:
        if lora_name is None:
            if base_model is None:
                raise ValueError("lora_name=None samples the base model: name it (base_model)")
            return base_model
        return f"{lora_name}@{version}" if version is not None else lora_name

    @staticmethod
    def _body(
        model: str,
        prompt_token_ids: list[int] | None,
        prompt: str | None,
        max_tokens: int,
        n: int,
        sampling: dict[str, Any],
        stream: bool = False,
    ) -> dict[str, Any]:
        if (prompt_token_ids is None) == (prompt is None):
            raise ValueError("give exactly one of prompt_token_ids and prompt")
        if max_tokens < 1 or n < 1:
            raise ValueError("max_tokens and n must be >= 1")
        for reserved in ("model", "prompt", "max_tokens", "n", "stream", "echo", "logprobs"):
            if reserved in sampling:
                raise ValueError(f"'{reserved}' is set by the client")
        return {
            **sampling,
            "model": model,
            "prompt": prompt_token_ids if prompt_token_ids is not None else prompt,
            "max_tokens": max_tokens,
            "n": n,
            "logprobs": 0,  # the sampled token's logprob, nothing else
            "return_token_ids": True,
            "stream": stream,
        }

    # ---- scoring --------------------------------------------------------------------------
    async def compute_logprobs(
        self,
        lora_name: str | None,
        token_ids: Sequence[int] | Sequence[Sequence[int]],
        version: int | None = None,
        *,
        base_model: str | None = None,
        session: str | None = None,
    ) -> list[Scored]:
        """The logprob of every given token under exactly one adapter version, for one
        sequence or a batch (one request; one :class:`Scored` per sequence, in order).
        ``version=None`` scores on the replica's current version, read first and then
        pinned (``name@N``), so a swap between the two cannot split a batch; the answer
        names it. A version that left is :class:`RequestRejected` (404). Scores are vLLM's
        prompt logprobs: the raw model's, as sampled logprobs are. ``session`` routes
        to the replica holding that session's prefix."""
        batch = (
            [list(token_ids)]
            if token_ids and isinstance(token_ids[0], int)
            else [
                list(seq)
                for seq in token_ids  # type: ignore[union-attr]
            ]
        )
        if not batch or any(len(seq) < 1 for seq in batch):
            raise ValueError("token_ids must hold at least one token per sequence")
        tried: set[str] = set()
        last: Exception | None = None
        for _ in range(len(self.replicas)):
            replica = await self._choose(tried, _Route(session))
            tried.add(replica.url)
            failed = False
            try:
                return await self._score(replica.url, lora_name, batch, version, base_model)
            except httpx.TransportError as e:
                failed = True
                last = _Transient(f"{replica.url}: {type(e).__name__}: {e}")
            except _Transient as e:
                failed, last = True, e
            finally:
                self._done(replica, failed)
        raise NoReplicaAvailable(f"no replica could score the tokens: {last}")

    async def _score(
        self,
        url: str,
        lora_name: str | None,
        batch: list[list[int]],
        version: int | None,
        base_model: str | None,
    ) -> list[Scored]:
        if lora_name is not None and version is None:
            version = await self._current_version(url, lora_name)
        body = {
            "model": self._model(lora_name, version, base_model),
            "prompt": batch,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,  # the given token's logprob at each position
        }
        r = await self._http().post(
            f"{url}/v1/completions", json=body, headers=self._headers(False)
        )
        _check_status(r, url)
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        if len(choices) != len(batch):
            raise _Transient(f"{url}: {len(choices)} choices for {len(batch)} sequences")
        return [
            Scored(seq, _prompt_logprobs(seq, c.get("prompt_logprobs")), version, url)
            for seq, c in zip(batch, choices, strict=True)
        ]

    async def _current_version(self, url: str, lora_name: str) -> int:
        r = await self._http().get(f"{url}/skyrl/v1/loras", headers=self._headers(False))
        _check_status(r, url)
        for adapter in r.json().get("adapters", []):
            if adapter.get("lora_name") == lora_name:
                return int(adapter["version"])
        raise RequestRejected(404, f"adapter '{lora_name}' is not loaded", url)

    # ---- control operations, fanned out -------------------------------------------------
    async def _fanout(
        self, op: str, payload: dict[str, Any] | None, urls: Sequence[str] | None = None
    ) -> dict[str, Any]:
        if self.control is not None and payload is not None and op in FLEET_OPS:
            return await self._through_fleet(op, payload)
        targets = list(urls) if urls is not None else [r.url for r in self.replicas]
        outcomes = await asyncio.gather(
            *(self._control(url, op, payload) for url in targets), return_exceptions=True
        )
        results: dict[str, Any] = {}
        failures: dict[str, str] = {}
        for url, outcome in zip(targets, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failures[url] = str(outcome)
            else:
                results[url] = outcome
        if failures:
            raise FanoutError(op, failures, results)
        return results

    async def _through_fleet(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A control call through the fleet's supervisor: recorded, then fanned out
        (replicas that failed it are unlisted and converged by the supervisor: not this
        caller's failure). Refused (nothing recorded): :class:`FanoutError`."""
        assert self.control is not None
        answer = await self.control(op, payload)
        error = answer.get("error")
        if error is not None:
            raise FanoutError(op, {"fleet": f"{error['status']}: {error['message']}"}, {})
        if answer.get("reconciling"):
            logger.warning("%s: replicas converged by the fleet: %s", op, answer["reconciling"])
        return answer["results"]

    async def _control(self, url: str, op: str, payload: dict[str, Any] | None) -> Any:
        try:
            if payload is None:
                r = await self._http().get(f"{url}{ROUTES}/{op}", headers=self._headers(True))
            else:
                r = await self._http().post(
                    f"{url}{ROUTES}/{op}", json=payload, headers=self._headers(True)
                )
        except httpx.TransportError as e:
            raise ClientError(f"unreachable ({type(e).__name__}: {e})") from e
        if r.status_code != 200:
            raise ClientError(f"{r.status_code}: {_error_text(r)}")
        return r.json()

    async def pause_generation(
        self,
        lora_name: str | None = None,
        mode: Literal["abort", "keep", "wait"] = "keep",
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Pause one adapter (or the whole engine) on every replica."""
        payload: dict[str, Any] = {"lora_name": lora_name, "mode": mode}
        if timeout_s is not None:
            payload["timeout_s"] = timeout_s
        return await self._fanout("pause", payload)

    async def resume_generation(self, lora_name: str | None = None) -> dict[str, Any]:
        return await self._fanout("resume", {"lora_name": lora_name})

    async def abort_lora_requests(self, lora_name: str) -> dict[str, Any]:
        return await self._fanout("abort_lora_requests", {"lora_name": lora_name})

    async def load_lora_adapter(
        self,
        lora_name: str,
        lora_path: str,
        *,
        interrupt: Literal["abort", "continue"] | None = None,
        pin: bool = False,
        version: int | None = None,
    ) -> dict[str, Any]:
        """Load on every replica. ``version`` (e.g. the trainer's step) gives the load
        the same number everywhere and makes a retry a no-op where it already landed."""
        payload = _load_payload(lora_name, lora_path, interrupt, version)
        payload["pin"] = pin
        return await self._fanout("load_lora_adapter", payload)

    async def unload_lora_adapter(self, lora_name: str, version: int | None = None) -> dict:
        payload: dict[str, Any] = {"lora_name": lora_name}
        if version is not None:
            payload["version"] = version
        return await self._fanout("unload_lora_adapter", payload)

    async def list_loras(self) -> dict[str, dict[str, Any]]:
        """Per replica: adapter name -> its state (version, versions, paused, ...)."""
        answers = await self._fanout("loras", None)
        return {url: {a["lora_name"]: a for a in body["adapters"]} for url, body in answers.items()}

    async def sync_lora(
        self,
        lora_name: str,
        lora_path: str,
        *,
        pause: bool = False,
        interrupt: Literal["abort", "continue"] | None = None,
        version: int | None = None,
    ) -> dict[str, Any]:
        """Make every replica serve ``lora_path`` under ``lora_name``.

        Default: a zero-stall load (requests in flight finish on their version, or as
        ``interrupt`` says). ``pause=True``: pause (keep) -> load -> resume, and every
        replica that was paused is resumed whatever else failed. Raises
        :class:`FanoutError` naming each replica that did not end on the new version.
        With ``version``, calling it again after a partial failure converges: replicas
        that have the version answer ``unchanged``, the others load it.
        """
        if not pause:
            return await self.load_lora_adapter(
                lora_name, lora_path, interrupt=interrupt, version=version
            )
        if self.control is not None:  # the fleet records each step and converges replicas
            await self.pause_generation(lora_name, mode="keep")
            try:
                return await self.load_lora_adapter(lora_name, lora_path, version=version)
            finally:
                await self.resume_generation(lora_name)
        failures: dict[str, list[str]] = {}
        paused: list[str] = []
        results: dict[str, Any] = {}

        def note(step: str, e: FanoutError) -> None:
            for url, why in e.failures.items():
                failures.setdefault(url, []).append(f"{step}: {why}")

        try:
            paused = list(await self.pause_generation(lora_name, mode="keep"))
        except FanoutError as e:
            note("pause", e)
            paused = list(e.results)
        try:
            if paused:
                payload = _load_payload(lora_name, lora_path, None, version)
                results = await self._fanout("load_lora_adapter", payload, paused)
        except FanoutError as e:
            note("load", e)
            results = e.results
        finally:
            if paused:
                try:
                    await self._fanout("resume", {"lora_name": lora_name}, paused)
                except FanoutError as e:
                    note("resume", e)
        if failures:
            raise FanoutError(
                "sync_lora", {url: "; ".join(steps) for url, steps in failures.items()}, results
            )
        return results


async def _all_or_none(coros: Iterable[Awaitable[None]]) -> None:
    """Run ``coros`` together; the first to fail cancels the others (they must not
    keep retrying for a caller that already has the exception), then raises."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]


def _load_payload(
    lora_name: str, lora_path: str, interrupt: str | None, version: int | None
) -> dict[str, Any]:
    payload: dict[str, Any] = {"lora_name": lora_name, "lora_path": lora_path}
    if interrupt is not None:
        payload["interrupt"] = interrupt
    if version is not None:
        payload["version"] = version
    return payload


def _check_status(r: httpx.Response, replica: str) -> None:
    if r.status_code == 503 or r.status_code >= 500:
        raise _Transient(f"{replica} answered {r.status_code}: {_error_text(r)}")
    if r.status_code != 200:
        raise RequestRejected(r.status_code, _error_text(r), replica)


def _prompt_logprobs(seq: list[int], entries: list | None) -> list[float | None]:
    """vLLM's ``prompt_logprobs`` (per position: None, or ``{token_id: {"logprob"}}``
    holding at least the given token) as the given tokens' logprobs."""
    if not isinstance(entries, list) or len(entries) != len(seq):
        raise _Transient(f"no prompt logprobs for {len(seq)} tokens in the answer")
    out: list[float | None] = []
    for token, entry in zip(seq, entries, strict=True):
        if entry is None:
            out.append(None)
            continue
        got = entry.get(str(token))
        if not isinstance(got, dict):
            raise _Transient(f"prompt logprobs lack token {token}")
        out.append(float(got["logprob"]))
    return out


def _error_of(event: dict[str, Any]) -> tuple[str, int]:
    """Message and status code of vLLM's stream error event (500 if it names none)."""
    err = event.get("error")
    if not isinstance(err, dict):
        return str(err), 500
    code = err.get("code")
    return str(err.get("message", err)), code if isinstance(code, int) else 500


def _sample(choice: dict[str, Any], finish: str | None) -> Sample:
    """A sample from one (whole or accumulated) choice. Tokens without a logprob
    cannot be trained on: they are cut, and the cut ends like an abort, which
    sample_with_retry continues (made again, with logprobs): no token is dropped."""
    tokens = list(choice.get("token_ids") or [])
    lp = (choice.get("logprobs") or {}).get("token_logprobs") or []
    cut = len(lp) < len(tokens)
    if cut:
        tokens = tokens[: len(lp)]
        finish = "abort"
    return Sample(
        token_ids=tokens,
        logprobs=[float(x) for x in lp[: len(tokens)]],
        text="" if cut else choice.get("text", ""),
        finish_reason=finish,
        stop_reason=choice.get("stop_reason"),
        lora_versions=_clip_spans(choice.get("lora_versions") or [], len(tokens)),
    )


def _parse(body: dict[str, Any], headers: httpx.Headers, replica: str) -> SampleResponse:
    samples: list[Sample] = []
    prompt_ids: list[int] = []
    for choice in sorted(body["choices"], key=lambda c: c["index"]):
        samples.append(_sample(choice, choice.get("finish_reason")))
        prompt_ids = prompt_ids or list(choice.get("prompt_token_ids") or [])
    header = headers.get(VERSION_HEADER)
    return SampleResponse(samples, prompt_ids, replica, int(header) if header else None)


class _Streamed:
    """The choices of a completion stream, accumulated chunk by chunk (vLLM sends each
    choice's token and logprob deltas, its prompt ids on its first chunk; we add its
    version spans so far where a version starts and on its last chunk)."""

    def __init__(self, n: int) -> None:
        self.choices: list[dict[str, Any]] = [
            {
                "token_ids": [],
                "logprobs": {"token_logprobs": []},
                "text": "",
                "finish_reason": None,
                "stop_reason": None,
                "lora_versions": [],
            }
            for _ in range(n)
        ]
        self.prompt_ids: list[int] = []
        self.version: str | None = None

    def add(self, event: dict[str, Any]) -> None:
        for delta in event.get("choices") or []:
            index = delta.get("index")
            if not isinstance(index, int) or not 0 <= index < len(self.choices):
                continue
            acc = self.choices[index]
            acc["token_ids"] += delta.get("token_ids") or []
            acc["logprobs"]["token_logprobs"] += (delta.get("logprobs") or {}).get(
                "token_logprobs"
            ) or []
            acc["text"] += delta.get("text") or ""
            for key in ("finish_reason", "stop_reason", "lora_versions"):
                if delta.get(key) is not None:
                    acc[key] = delta[key]
            self.prompt_ids = self.prompt_ids or list(delta.get("prompt_token_ids") or [])

    def made_tokens(self) -> bool:
        return any(c["token_ids"] for c in self.choices)

    def response(self, replica: str) -> SampleResponse:
        """What arrived; a choice the stream did not finish ends ``abort``."""
        samples = [_sample(c, c["finish_reason"] or "abort") for c in self.choices]
        version = int(self.version) if self.version else None
        return SampleResponse(samples, self.prompt_ids, replica, version)


def _clip_spans(spans: list[dict[str, int]], n_tokens: int) -> list[dict[str, int]]:
    """The spans of the ``n_tokens`` tokens kept: cut to them, the last one extended to
    them (a stream annotates only the chunks where a version starts, and the last one:
    tokens after the last annotated chunk were made by the last version it named)."""
    out = []
    for span in spans:
        if span["start"] < n_tokens:
            out.append({**span, "end": min(span["end"], n_tokens)})
    if out:
        out[-1]["end"] = n_tokens
    return out


def _continued(sampling: dict[str, Any], made: int) -> dict[str, Any]:
    """The sampling fields of a continuation after ``made`` tokens: no seed (``n``
    samples must not collapse into one stream), and ``min_tokens`` less what was made."""
    out = {k: v for k, v in sampling.items() if k != "seed"}
    if out.get("min_tokens"):
        out["min_tokens"] = max(0, int(out["min_tokens"]) - made)
    return out


def _empty(body: dict[str, Any]) -> SampleResponse:
    prompt = body["prompt"]
    return SampleResponse(
        [Sample() for _ in range(body["n"])], prompt if isinstance(prompt, list) else []
    )


class SyncInferenceClient:
    """Blocking wrapper for scripts: every call runs on an event loop in one worker
    thread (an anyio blocking portal)."""

    def __init__(self, urls: str | Sequence[str], **kwargs: Any) -> None:
        self.client = RemoteInferenceClient(urls, **kwargs)
        self._portal_cm = start_blocking_portal()
        self._portal: BlockingPortal | None = self._portal_cm.__enter__()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)
        if not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._portal is None:
                raise RuntimeError("the client is closed")
            if asyncio.iscoroutinefunction(method):
                return self._portal.call(functools.partial(method, *args, **kwargs))
            return method(*args, **kwargs)

        return call

    def close(self) -> None:
        if self._portal is not None:
            self._portal.call(self.client.aclose)
            self._portal = None
            self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> SyncInferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
