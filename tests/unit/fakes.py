"""A scripted stand-in for vLLM's AsyncLLM: just the surface LoraManager touches."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path
from types import SimpleNamespace

from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind


def write_adapter(root: Path, rank: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps({"r": rank, "target_modules": ["q_proj"]}))
    header = json.dumps({"__metadata__": {}}).encode()
    (root / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return root


class FakeEngine:
    def __init__(self, tokens_per_request: int = 3, step_s: float = 0.0) -> None:
        self.vllm_config = SimpleNamespace(lora_config=SimpleNamespace(max_lora_rank=16))
        self.model_config = SimpleNamespace(model="/no/such/model")
        self.output_processor = SimpleNamespace(request_states={}, parent_requests={})
        self.loaded: dict[int, object] = {}
        self.removed: list[int] = []
        self.aborted: list[tuple[list[str], bool]] = []
        self.fail_add: Exception | None = None
        self.fail_generate: Exception | None = None
        self.tokens_per_request = tokens_per_request
        self.step_s = step_s
        self.seen_loras: list[str | None] = []
        self.running: set[str] = set()
        self.abort_flags: set[str] = set()

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

    async def abort(self, request_id, internal: bool = False) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.aborted.append((ids, internal))
        self.abort_flags.update(ids)

    async def pause_generation(self, *, mode="abort", clear_cache=True) -> None:
        self.global_paused = mode

    async def resume_generation(self) -> None:
        self.global_paused = None

    async def generate(self, prompt, params, request_id, *, lora_request=None, **kwargs):
        """Token at position p of the sequence is ``100 + p``, so a continuation from
        ``prompt + tokens so far`` yields exactly the tokens an uninterrupted run would.
        Honours output kinds, ``max_tokens`` and aborts (partial, ``abort``)."""
        self.seen_loras.append(lora_request.lora_name if lora_request else None)
        if self.fail_generate:
            raise self.fail_generate
        prompt_ids = list(prompt["prompt_token_ids"]) if isinstance(prompt, dict) else [1]
        budget = min(self.tokens_per_request, params.max_tokens or self.tokens_per_request)
        budget -= len(prompt_ids) - 1  # a continuation's prompt holds tokens already made
        self.running.add(request_id)
        tokens: list[int] = []
        try:
            while True:
                await asyncio.sleep(self.step_s)
                finish = None
                if request_id in self.abort_flags:
                    finish = "abort"
                else:
                    tokens.append(100 + len(prompt_ids) - 1 + len(tokens))
                    if len(tokens) >= budget:
                        finish = "length"
                if params.output_kind == RequestOutputKind.FINAL_ONLY and finish is None:
                    continue
                ids = tokens[-1:] if params.output_kind == RequestOutputKind.DELTA else tokens
                if finish == "abort" and params.output_kind == RequestOutputKind.DELTA:
                    ids = []
                c = CompletionOutput(0, "x" * len(ids), list(ids), None, None, finish_reason=finish)
                yield RequestOutput(request_id, "p", prompt_ids, None, [c], finish is not None)
                if finish is not None:
                    return
        finally:
            self.running.discard(request_id)
            self.abort_flags.discard(request_id)
