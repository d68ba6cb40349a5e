"""The ``/skyrl/v1/`` router: thin HTTP over :class:`~vllm_lora_ext.manager.LoraManager`.

Every refusal is ``{"error": "..."}`` with a 4xx (or 503/504 for bounded waits),
including malformed bodies, which FastAPI would otherwise answer in its own shape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from vllm_lora_ext.errors import LoraExtError
from vllm_lora_ext.manager import LoraManager
from vllm_lora_ext.protocol import (
    AbortLoraRequest,
    AbortLoraResponse,
    ErrorBody,
    LoadLoraRequest,
    LoadLoraResponse,
    LorasResponse,
    PauseRequest,
    PauseResponse,
    PinLoraRequest,
    PinLoraResponse,
    ResumeRequest,
    UnloadLoraRequest,
    UnloadLoraResponse,
)

logger = logging.getLogger("vllm.lora_ext")
PREFIX = "/skyrl/v1"


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


class LoraExtRoute(APIRoute):
    """Answers our errors in our shape and logs one line per control action."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            started = time.monotonic()
            try:
                response = await handler(request)
            except RequestValidationError as e:
                response = JSONResponse({"error": _validation_message(e)}, status_code=400)
            except LoraExtError as e:
                response = JSONResponse({"error": e.message}, status_code=e.status)
            if request.method == "POST":
                logger.info(
                    "lora_ext action=%s client=%s status=%d latency_ms=%.1f",
                    request.url.path,
                    request.client.host if request.client else "-",
                    response.status_code,
                    1000 * (time.monotonic() - started),
                )
            return response

        return route


router = APIRouter(prefix=PREFIX, route_class=LoraExtRoute)
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 404, 409, 503, 504)
}


def manager_of(request: Request) -> LoraManager:
    manager = getattr(request.app.state, "lora_ext", None)
    if manager is None:
        raise LoraExtError("lora_ext is not initialised on this server", status=503)
    return manager


@router.post("/abort_lora_requests", responses=_ERRORS)
async def abort_lora_requests(body: AbortLoraRequest, request: Request) -> AbortLoraResponse:
    aborted = await manager_of(request).abort(body.lora_name)
    return AbortLoraResponse(lora_name=body.lora_name, aborted=aborted)


@router.post("/pause", responses=_ERRORS)
async def pause(body: PauseRequest, request: Request) -> PauseResponse:
    result = await manager_of(request).pause(body.lora_name, body.mode, body.timeout_s)
    return PauseResponse(**result)


@router.post("/resume", responses=_ERRORS)
async def resume(body: ResumeRequest, request: Request) -> PauseResponse:
    manager = manager_of(request)
    if body.lora_name is None:
        return PauseResponse(**await manager.resume_global())
    return PauseResponse(**manager.resume(body.lora_name))


@router.get("/loras")
async def loras(request: Request) -> LorasResponse:
    manager = manager_of(request)
    return LorasResponse.model_validate(
        {"adapters": manager.snapshot(), "engine_adapters": len(await manager.engine.list_loras())}
    )


@router.post("/load_lora_adapter", responses=_ERRORS)
async def load_lora_adapter(body: LoadLoraRequest, request: Request) -> LoadLoraResponse:
    loaded = await manager_of(request).load(
        body.lora_name, body.lora_path, interrupt=body.interrupt, pin=body.pin
    )
    version = loaded.version
    return LoadLoraResponse(
        lora_name=body.lora_name,
        version=version.number,
        lora_int_id=version.lora_int_id,
        lora_path=version.path,
        pinned=version.pinned,
        interrupted=loaded.interrupted,
        add_lora_ms=round(version.add_lora_ms, 3),
        latency_ms=round(loaded.latency_ms, 3),
    )


@router.post("/pin_lora_adapter", responses=_ERRORS)
async def pin_lora_adapter(body: PinLoraRequest, request: Request) -> PinLoraResponse:
    version = await manager_of(request).pin(body.lora_name, body.version, body.pinned)
    return PinLoraResponse(lora_name=body.lora_name, version=version.number, pinned=version.pinned)


@router.post("/unload_lora_adapter", responses=_ERRORS)
async def unload_lora_adapter(body: UnloadLoraRequest, request: Request) -> UnloadLoraResponse:
    retired = await manager_of(request).unload(body.lora_name, body.version)
    return UnloadLoraResponse(lora_name=body.lora_name, retired_versions=retired)
