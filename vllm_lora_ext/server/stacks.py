"""The RL stacks' own routes, under the names their current code calls, through our
manager and gate (opt-in per stack: ``LoraExtConfig.stack_routes``).

- **prime-rl** (main branch, checked 2026-08): its orchestrator posts every adapter update
  to ``POST /load_lora_adapter`` (a route of prime-rl's own server that forces vLLM's
  ``load_inplace``) and probes ``GET /liveness``. Here a load is a new version of the
  name (the in-place reload, staged: no stale KV), answered ``{"status": "ok"}``; a path
  that does not exist (yet) is a 404, which prime-rl retries (NFS propagation).
- **AReaL** (1.0.4): brackets every disk weight update with ``POST
  /areal_pause_generation`` (vLLM's global pause with abort and a cleared prefix cache;
  AReaL's server then holds new requests until continue) and ``POST
  /areal_continue_generation``. Here the same, and new requests are held by the gate on
  every vLLM version (0.33's own global pause answers them 503). Per-adapter pauses are
  independent: an adapter paused by ``/skyrl/v1/pause`` stays paused after continue.

Out of scope (full-weight transfer, not LoRA): prime-rl's ``/init_broadcaster`` and
``/update_weights``, AReaL's ``/areal_update_weights*`` and ``/areal_init_weights_*``.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from vllm_lora_ext.server.routes import LoraExtRoute, manager_of

prime_rl = APIRouter(route_class=LoraExtRoute)
areal = APIRouter(route_class=LoraExtRoute)


class PrimeRlLoad(BaseModel):
    """What prime-rl posts (vLLM's ``LoadLoRAAdapterRequest`` fields it sets)."""

    model_config = ConfigDict(extra="ignore")  # e.g. vLLM's load_inplace: implied here

    lora_name: str
    lora_path: str


@prime_rl.post("/load_lora_adapter")
async def prime_rl_load(body: PrimeRlLoad, request: Request) -> dict:
    await manager_of(request).load(body.lora_name, body.lora_path)
    return {"status": "ok"}


@prime_rl.get("/liveness")
async def prime_rl_liveness(request: Request) -> JSONResponse:
    manager = manager_of(request)
    try:
        async with asyncio.timeout(manager.config.liveness_timeout_s):
            await manager.engine.check_health()
    except Exception:
        return JSONResponse({"status": "engine_unresponsive"}, status_code=503)
    return JSONResponse({"status": "ok"})


@areal.post("/areal_pause_generation")
async def areal_pause(request: Request) -> dict:
    await manager_of(request).pause_everything()
    return {"success": True, "message": "Generation paused and all requests aborted"}


@areal.post("/areal_continue_generation")
async def areal_continue(request: Request) -> dict:
    await manager_of(request).continue_everything()
    return {"success": True, "message": "Generation continued"}


ROUTERS = {"prime-rl": prime_rl, "areal": areal}


def attach(app: FastAPI, stacks: set[str]) -> None:
    for stack in sorted(stacks):
        app.include_router(ROUTERS[stack])
