"""A scripted stand-in for vLLM's AsyncLLM: just the surface LoraManager touches."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path
from types import SimpleNamespace

from vllm.outputs import CompletionOutput, RequestOutput


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

    async def add_lora(self, lora_request) -> bool:
        if self.fail_add:
            raise self.fail_add
        self.loaded[lora_request.lora_int_id] = lora_request
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        self.loaded.pop(lora_id, None)
        return True

    async def abort(self, request_id, internal: bool = False) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.aborted.append((ids, internal))

    async def pause_generation(self, *, mode="abort", clear_cache=True) -> None:
        self.global_paused = mode

    async def resume_generation(self) -> None:
        self.global_paused = None

    async def generate(self, prompt, params, request_id, *, lora_request=None, **kwargs):
        self.seen_loras.append(lora_request.lora_name if lora_request else None)
        if self.fail_generate:
            raise self.fail_generate
        for i in range(self.tokens_per_request):
            await asyncio.sleep(self.step_s)
            done = i == self.tokens_per_request - 1
            c = CompletionOutput(0, " x", [i], None, None, finish_reason="length" if done else None)
            yield RequestOutput(request_id, "p", [1], None, [c], done)
