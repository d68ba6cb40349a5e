"""Scenarios run against the fake engine (``tests/unit``) and a real ``AsyncLLM``
(``tests/gpu``): both must give the same answers, or the fake hides what the engine
does. Answers are counts and finish reasons, never token values (the fake's are fake).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind, SamplingParams

Scenario = Callable[[Any, LoRARequest], Awaitable[dict]]


def _params(max_tokens: int, kind=RequestOutputKind.DELTA, n: int = 1) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        ignore_eos=True,
        output_kind=kind,
        n=n,
        temperature=1.0 if n > 1 else 0.0,
    )


def _prompt(first: int = 1) -> TokensPrompt:
    return TokensPrompt(prompt_token_ids=[first, first + 1, first + 2])


async def _wait(cond: Callable[[], bool], timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110 - polling engine state is the point
            await asyncio.sleep(0.005)


def _start(engine, prompt, params, request_id: str, lora: LoRARequest) -> tuple[asyncio.Task, list]:
    outs: list = []

    async def consume() -> None:
        async for out in engine.generate(prompt, params, request_id, lora_request=lora):
            outs.append(out)

    return asyncio.create_task(consume()), outs


def _states(engine, external_id: str) -> list:
    return [
        s
        for s in engine.output_processor.request_states.values()
        if s.external_req_id == external_id
    ]


def _made(outs: list) -> list[int]:
    per: dict[int, int] = {}
    for out in outs:
        for c in out.outputs:
            per[c.index] = per.get(c.index, 0) + len(c.token_ids)
    return [per[i] for i in sorted(per)]


async def shared_external_ids(engine, lora: LoRARequest) -> dict:
    """Two requests with one external id: both admitted, each its own internal id; an
    abort by the external id ends both."""
    a, outs_a = _start(engine, _prompt(1), _params(400), "dup", lora)
    b, outs_b = _start(engine, _prompt(4), _params(400), "dup", lora)
    await _wait(lambda: bool(outs_a) and bool(outs_b))
    states = _states(engine, "dup")
    answer = {
        "admitted": len(states),
        "distinct_internal_ids": len({s.request_id for s in states}),
        "lora_names": sorted({s.lora_name for s in states}),
    }
    await engine.abort("dup")
    await asyncio.wait_for(asyncio.gather(a, b), 60)
    answer["finish"] = [outs_a[-1].outputs[0].finish_reason, outs_b[-1].outputs[0].finish_reason]
    return answer


async def internal_abort_ends_one(engine, lora: LoRARequest) -> dict:
    a, outs_a = _start(engine, _prompt(1), _params(400), "dup", lora)
    b, outs_b = _start(engine, _prompt(4), _params(60), "dup", lora)
    await _wait(lambda: bool(outs_a) and bool(outs_b))
    (state_a,) = [s for s in _states(engine, "dup") if s.prompt_token_ids[0] == 1]
    await engine.abort([state_a.request_id], internal=True)
    await asyncio.wait_for(asyncio.gather(a, b), 60)
    return {
        "a": outs_a[-1].outputs[0].finish_reason,
        "b": (outs_b[-1].outputs[0].finish_reason, sum(_made(outs_b))),
    }


async def abort_of_an_unknown_id_is_forgotten(engine, lora: LoRARequest) -> dict:
    """vLLM does not remember an abort for a request that arrives later."""
    await engine.abort(["later"])
    task, outs = _start(engine, _prompt(), _params(20), "later", lora)
    await asyncio.wait_for(task, 60)
    return {"finish": outs[-1].outputs[0].finish_reason, "made": sum(_made(outs))}


async def abort_during_input_processing_is_missed(engine, lora: LoRARequest) -> dict:
    """An abort that lands while the request is still in input processing (before it is
    registered) finds nothing: the request then runs to its end. The gate must close
    this hole itself."""
    task, outs = _start(engine, _prompt(), _params(30), "early", lora)
    await asyncio.sleep(0)  # the request runs up to its input-processing hop
    registered = bool(_states(engine, "early"))
    await engine.abort("early")
    await asyncio.wait_for(task, 60)
    return {
        "registered": registered,
        "finish": outs[-1].outputs[0].finish_reason,
        "made": sum(_made(outs)),
    }


async def n_fans_out_into_children(engine, lora: LoRARequest) -> dict:
    task, outs = _start(
        engine, _prompt(), _params(40, RequestOutputKind.FINAL_ONLY, 2), "fan", lora
    )
    await _wait(lambda: bool(_states(engine, "fan")))
    children = _states(engine, "fan")
    parents = [
        p for p in engine.output_processor.parent_requests.values() if p.external_req_id == "fan"
    ]
    await asyncio.wait_for(task, 60)
    return {
        "children": len(children),
        "parents": len(parents),
        "child_lora_names": sorted({s.lora_name for s in children}),
        "outputs": len(outs),
        "made": _made(outs),
        "finish": [c.finish_reason for c in outs[-1].outputs],
    }


async def final_only_abort_returns_what_was_made(engine, lora: LoRARequest) -> dict:
    task, outs = _start(engine, _prompt(), _params(400, RequestOutputKind.FINAL_ONLY), "part", lora)
    await _wait(
        lambda: any(s.detokenizer.num_output_tokens() >= 5 for s in _states(engine, "part"))
    )
    await engine.abort("part")
    await asyncio.wait_for(task, 60)
    made = _made(outs)
    return {
        "outputs": len(outs),
        "finish": outs[-1].outputs[0].finish_reason,
        "partial": 5 <= made[0] < 400,
    }


SCENARIOS: dict[str, tuple[Scenario, dict]] = {
    "shared_external_ids": (
        shared_external_ids,
        {
            "admitted": 2,
            "distinct_internal_ids": 2,
            "lora_names": ["meow@1"],
            "finish": ["abort", "abort"],
        },
    ),
    "internal_abort_ends_one": (internal_abort_ends_one, {"a": "abort", "b": ("length", 60)}),
    "abort_of_an_unknown_id_is_forgotten": (
        abort_of_an_unknown_id_is_forgotten,
        {"finish": "length", "made": 20},
    ),
    "abort_during_input_processing_is_missed": (
        abort_during_input_processing_is_missed,
        {"registered": False, "finish": "length", "made": 30},
    ),
    "n_fans_out_into_children": (
        n_fans_out_into_children,
        {
            "children": 2,
            "parents": 1,
            "child_lora_names": ["meow@1"],
            "outputs": 1,
            "made": [40, 40],
            "finish": ["length", "length"],
        },
    ),
    "final_only_abort_returns_what_was_made": (
        final_only_abort_returns_what_was_made,
        {"outputs": 1, "finish": "abort", "partial": True},
    ),
}
