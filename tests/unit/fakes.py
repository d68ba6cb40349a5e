"""A fake vLLM ``AsyncLLM`` that runs vLLM's own request path; only the model is fake.

``generate``, ``add_request``, ``_add_request``, ``abort`` and ``check_admission`` are
``AsyncLLM``'s own methods bound to this object, and the ``OutputProcessor``,
``RequestOutputCollector`` and ``ParentRequest`` they use are vLLM's. So the fake has the
real engine's behaviours that our gate must survive: duplicate external ids are accepted
(each request gets its own internal id), an abort by external id reaches every request
sharing it, an abort of an id nobody holds is forgotten (not remembered for a request that
arrives later), a request is registered only after an input-processing hop, and ``n > 1``
fans out into child requests. ``tests/gpu/test_fake_fidelity.py`` runs the same scenarios
against a real engine.

What is fake: input processing (a prompt becomes an ``EngineCoreRequest`` after an await,
``input_delay_s``) and the engine core: one :meth:`FakeCore.step` makes one token for each
running request, token ``100 + p`` at sequence position ``p``, so a continuation from
``prompt + tokens so far`` yields exactly the tokens an uninterrupted run would. A request
stops (``stop``) when its sequence reaches ``tokens_per_request`` generated positions, or
at ``max_tokens`` (``length``). The core steps by itself every ``step_s`` unless
``manual`` (then the test calls ``step``).
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from vllm.sampling_params import SamplingParams
from vllm.v1.engine import EngineCoreOutput, EngineCoreRequest, FinishReason
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.engine.output_processor import OutputProcessor

PROMPT_IDS = [1]  # what a text prompt becomes


def write_adapter(root: Path, rank: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps({"r": rank, "target_modules": ["q_proj"]}))
    header = json.dumps({"__metadata__": {}}).encode()
    (root / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return root


def token_at(position: int) -> int:
    """The token the fake model makes at sequence position ``position``."""
    return 100 + position


class FakeInputProcessor:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine

    assign_request_id = staticmethod(InputProcessor.assign_request_id)

    def _arrive(self, lora_request) -> None:
        self.engine.seen_loras.append(lora_request.lora_name if lora_request else None)

    def _request(
        self, request_id: str, prompt: Any, params: SamplingParams, lora_request, priority: int
    ):
        if self.engine.fail_generate is not None:
            raise self.engine.fail_generate
        ids = list(prompt["prompt_token_ids"]) if isinstance(prompt, dict) else list(PROMPT_IDS)
        params = params.clone()
        if params.max_tokens is None:
            params.max_tokens = 4096 - len(ids)
        return EngineCoreRequest(
            request_id=request_id,
            prompt_token_ids=ids,
            mm_features=None,
            sampling_params=params,
            pooling_params=None,
            arrival_time=time.time(),
            lora_request=lora_request,
            cache_salt=None,
            data_parallel_rank=None,
            priority=priority,  # as vLLM's input processor passes it to the core
        )

    def process_inputs(self, request_id, prompt, params, supported_tasks=(), **kw):
        self._arrive(kw.get("lora_request"))
        return self._request(
            request_id, prompt, params, kw.get("lora_request"), kw.get("priority", 0)
        )

    async def process_inputs_async(self, request_id, prompt, params, supported_tasks=(), **kw):
        self._arrive(kw.get("lora_request"))
        await asyncio.sleep(self.engine.input_delay_s)  # tokenization: an await, like vLLM's
        return self._request(
            request_id, prompt, params, kw.get("lora_request"), kw.get("priority", 0)
        )


class FakeCore:
    """The engine core: requests by internal id; each step makes one token for each."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.requests: dict[str, EngineCoreRequest] = {}
        self.made: dict[str, int] = {}
        self.admitted: list[str] = []  # external ids, in the order they reached the core
        self.resources = SimpleNamespace(engine_dead=False)

    async def add_request_async(self, request: EngineCoreRequest) -> None:
        self.admitted.append(request.external_req_id or request.request_id)
        self.requests[request.request_id] = request
        self.made[request.request_id] = 0
        await asyncio.sleep(0)

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        for rid in request_ids:  # ids it does not hold are ignored, as in vLLM
            self.requests.pop(rid, None)
            self.made.pop(rid, None)

    def step(self) -> int:
        """Make one token for every running request; returns how many ran."""
        outputs = []
        for rid, req in list(self.requests.items()):
            made = self.made[rid]
            prompt_len = len(req.prompt_token_ids or ())
            outputs.append(
                EngineCoreOutput(request_id=rid, new_token_ids=[token_at(prompt_len - 1 + made)])
            )
            made += 1
            self.made[rid] = made
            params = req.sampling_params
            if prompt_len - len(PROMPT_IDS) + made >= self.engine.tokens_per_request:
                outputs[-1].finish_reason = FinishReason.STOP
            elif params is not None and made >= (params.max_tokens or 0):
                outputs[-1].finish_reason = FinishReason.LENGTH
            if outputs[-1].finish_reason is not None:
                del self.requests[rid]
                del self.made[rid]
        if outputs:
            self.engine.output_processor.process_outputs(outputs, time.monotonic(), None)
        return len(outputs)


class FakeEngine:
    generate = AsyncLLM.generate
    add_request = AsyncLLM.add_request
    _add_request = AsyncLLM._add_request
    check_admission = AsyncLLM.check_admission
    get_num_unfinished_requests = AsyncLLM.get_num_unfinished_requests
    get_num_queued_tokens = AsyncLLM.get_num_queued_tokens

    def __init__(
        self,
        tokens_per_request: int = 3,
        step_s: float = 0.0,
        input_delay_s: float = 0.0,
        manual: bool = False,
    ) -> None:
        self.vllm_config = SimpleNamespace(
            lora_config=SimpleNamespace(max_lora_rank=16),
            cache_config=SimpleNamespace(kv_sharing_fast_prefill=False),
        )
        self.model_config = SimpleNamespace(model="/no/such/model", is_encoder_decoder=False)
        self.scheduler_config = SimpleNamespace(
            max_num_queued_reqs=None, max_num_queued_tokens=None
        )
        self.observability_config = SimpleNamespace(otlp_traces_endpoint=None)
        self.admission_stats = None
        self.logger_manager = None
        self.log_requests = False
        self.errored = False
        self.output_processor = OutputProcessor(None, log_stats=False)
        self.input_processor = FakeInputProcessor(self)
        self.engine_core = FakeCore(self)
        self.tokens_per_request = tokens_per_request
        self.step_s = step_s
        self.input_delay_s = input_delay_s
        self.manual = manual
        self.output_handler: asyncio.Task | None = None
        # What tests look at.
        self.loaded: dict[int, object] = {}
        self.removed: list[int] = []
        self.aborted: list[tuple[list[str], bool]] = []
        self.fail_add: Exception | None = None
        self.fail_generate: Exception | None = None
        self.seen_loras: list[str | None] = []
        self.global_paused: str | None = None
        self.health_delay_s = 0.0

    async def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    def _run_output_handler(self) -> None:
        if self.output_handler is None and not self.manual:
            self.output_handler = asyncio.get_running_loop().create_task(self._stepper())

    async def _stepper(self) -> None:
        while True:
            await asyncio.sleep(self.step_s)
            self.engine_core.step()

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.engine_core.step()

    async def abort(self, request_id, internal: bool = False) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.aborted.append((ids, internal))
        await AsyncLLM.abort(self, request_id, internal)

    @property
    def running(self) -> set[str]:
        """External ids of the requests the core is running."""
        return {r.external_req_id or rid for rid, r in self.engine_core.requests.items()}

    async def add_lora(self, lora_request) -> bool:
        if self.fail_add:
            raise self.fail_add
        self.loaded[lora_request.lora_int_id] = lora_request
        return True

    async def list_loras(self) -> set[int]:
        return set(self.loaded)

    async def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        self.loaded.pop(lora_id, None)
        return True

    async def pause_generation(self, *, mode="abort", clear_cache=True) -> None:
        self.global_paused = mode

    async def resume_generation(self) -> None:
        self.global_paused = None

    async def check_health(self) -> None:
        await asyncio.sleep(self.health_delay_s)

    def shutdown(self) -> None:
        if self.output_handler is not None:
            self.output_handler.cancel()


# Managers a test made over a fake engine, shut down after it (tests/unit/conftest.py).
_live: list[tuple[Any, FakeEngine]] = []


def track(manager: Any, engine: FakeEngine) -> None:
    _live.append((manager, engine))


async def shut_down_tracked() -> None:
    while _live:
        manager, engine = _live.pop()
        await manager.shutdown()
        engine.shutdown()
