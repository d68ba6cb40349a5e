"""vLLM's own LoRA entry points (OpenAIServingModels' load, unload and resolve) put
through the manager, with vLLM's answers, against the faithful fake engine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fakes import FakeEngine, write_adapter
from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from vllm.lora.request import LoRARequest

from vllm_lora_ext.config import LoraExtConfig
from vllm_lora_ext.server.manager import LoraManager


class Models:
    """The parts of vLLM's OpenAIServingModels the hooks use."""

    def __init__(self, resolvers=()) -> None:
        self.lora_requests: dict[str, LoRARequest] = {}
        self.lora_resolvers = list(resolvers)
        self.model_config = SimpleNamespace(model="/base")

    def is_base_model(self, name: str) -> bool:
        return name == "toy-base"

    # vLLM's own implementations: the hooks replace them, so they must never run.
    async def load_lora_adapter(self, *args, **kwargs):
        raise AssertionError("vLLM's own load ran")

    async def unload_lora_adapter(self, *args, **kwargs):
        raise AssertionError("vLLM's own unload ran")

    async def resolve_lora(self, *args, **kwargs):
        raise AssertionError("vLLM's own resolver ran")


class Resolver:
    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths
        self.asked: list[str] = []

    async def resolve_lora(self, base_model: str, lora_name: str) -> LoRARequest | None:
        self.asked.append(lora_name)
        path = self.paths.get(lora_name)
        return LoRARequest(lora_name, 1, path) if path else None


@pytest.fixture
async def hooked(tmp_path):
    engine = FakeEngine()
    models = Models([Resolver({"found": str(write_adapter(tmp_path / "found"))})])
    manager = LoraManager(engine, LoraExtConfig(keep_versions=1), models)
    manager.install()
    yield manager, models, engine
    await manager.shutdown()
    engine.shutdown()


def load(name: str, path, inplace: bool = False) -> LoadLoRAAdapterRequest:
    return LoadLoRAAdapterRequest(lora_name=name, lora_path=str(path), load_inplace=inplace)


async def test_vllm_loads_become_versions_and_unloads_retire(hooked, tmp_path):
    manager, models, _ = hooked
    a, b = write_adapter(tmp_path / "a"), write_adapter(tmp_path / "b")
    assert "successfully" in await models.load_lora_adapter(load("t", a))
    refused = await models.load_lora_adapter(load("t", b))  # exists, not in place
    assert refused.error.code == 400 and "load_inplace" in refused.error.message
    assert "successfully" in await models.load_lora_adapter(load("t", b, inplace=True))
    assert manager.registry.get("t").current == 2
    assert (
        models.lora_requests["t"].lora_int_id
        == manager.registry.get("t").current_version.lora_int_id
    )
    base = await models.load_lora_adapter(load("toy-base", a))
    assert base.error.code == 400 and "base model" in base.error.message
    bad = await models.load_lora_adapter(load("u", tmp_path / "missing"))
    assert bad.error.code == 404 and "does not exist" in bad.error.message
    assert "successfully" in await models.unload_lora_adapter(
        UnloadLoRAAdapterRequest(lora_name="t")
    )
    assert "t" not in manager.registry and "t" not in models.lora_requests
    gone = await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name="t"))
    assert gone.error.code == 404


async def test_resolver_adapters_become_managed_names(hooked):
    manager, models, _ = hooked
    resolved = await models.resolve_lora("found")
    assert isinstance(resolved, LoRARequest) and "found" in manager.registry
    assert await models.resolve_lora("found") is models.lora_requests["found"]  # no reload
    assert manager.registry.get("found").current == 1
    missing = await models.resolve_lora("nowhere")
    assert missing.error.code == 404
    assert (await models.resolve_lora("found@3")).error.code == 404
    assert manager.sizes()["locks"] == 0  # resolution locks go with the resolution


async def test_abort_requests_refuses_ids_that_are_not_a_list_of_strings(hooked):
    import httpx
    from fastapi import FastAPI

    from vllm_lora_ext.server.vllm_api import abort_router

    manager, _, _ = hooked
    app = FastAPI()
    app.include_router(abort_router)
    app.state.lora_ext = manager
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        for ids in ("rollout-0", [1, 2], [None], {"a": 1}, 3):
            r = await c.post("/abort_requests", json={"request_ids": ids})
            assert r.status_code == 400 and "list of strings" in r.json()["error"]["message"]
        r = await c.post("/abort_requests", json={"request_ids": ["rollout-0"]})
        assert r.status_code == 200 and r.json()["aborted"] == 1


async def test_names_with_a_slash_load_from_a_broadcast_step(hooked, tmp_path):
    """'team/meow' is a valid vLLM model name: its step lease must not become a path."""
    from vllm_lora_ext import broadcast

    manager, models, _ = hooked
    step = broadcast.publish(write_adapter(tmp_path / "src"), tmp_path / "bc", 3)
    assert "successfully" in await models.load_lora_adapter(load("team/meow", step.path))
    assert manager.registry.get("team/meow").current == 1
    assert len(list((step.path / broadcast.LEASES).iterdir())) == 1
    bad = await models.load_lora_adapter(load("bad\nname", step.path))
    assert bad.error.code == 400 and "control character" in bad.error.message
