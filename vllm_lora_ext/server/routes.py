"""The ``/skyrl/v1/`` router: thin HTTP over :class:`~vllm_lora_ext.server.manager.LoraManager`.

Every refusal is vLLM's error format, ``{"error": {"message", "type", "param", "code"}}``,
with a 4xx (or 503 for a held request that timed out), including malformed bodies, which
FastAPI would otherwise answer in its own shape.
Every route but ``GET /loras`` checks the admin token (when one is configured; the app's
:class:`~vllm_lora_ext.server.auth.AdminGuard` does first) and the body size before
anything else, and every control action is logged as one JSON line.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from vllm_lora_ext.errors import LoraExtError, UnauthorizedError
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
    StateResponse,
    TenantInfo,
    TenantRequest,
    UnloadLoraRequest,
    UnloadLoraResponse,
    error_body,
)
from vllm_lora_ext.server.auth import MISSING, is_open, token_ok
from vllm_lora_ext.server.manager import LoraManager

logger = logging.getLogger("vllm.lora_ext")
PREFIX = "/skyrl/v1"


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


async def _guard(request: Request) -> None:
    """Admin token and body size, checked before the body is parsed."""
    manager = getattr(request.app.state, "lora_ext", None)
    if manager is None:
        raise LoraExtError("lora_ext is not initialised on this server", status=503)
    route_path = request.scope["route"].path
    if not is_open(request.method, route_path) and not token_ok(
        request.headers.get("authorization"), manager.config.admin_key
    ):  # the app's AdminGuard refused it already; this holds where it is not mounted
        raise UnauthorizedError(MISSING)
    limit = manager.config.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise LoraExtError(f"request body over {limit} bytes", status=413)
    if request.method == "POST":
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise LoraExtError(f"request body over {limit} bytes", status=413)
        request._body = body  # parsed by the route from here (Starlette's own cache)


def _summary(request: Request) -> dict[str, Any]:
    """What the action was about, from the body (names, versions, paths: no secrets)."""
    try:
        body = json.loads(getattr(request, "_body", b"") or b"{}")
    except ValueError:
        return {}
    if not isinstance(body, dict):
        return {}
    keys = ("lora_name", "lora_path", "version", "mode", "interrupt", "pinned", "pin")
    return {k: body[k] for k in keys if k in body}


class LoraExtRoute(APIRoute):
    """Answers our errors in our shape and logs one JSON line per control action."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            started = time.monotonic()
            error = None
            try:
                await _guard(request)
                response = await handler(request)
            except RequestValidationError as e:
                error = _validation_message(e)
                response = JSONResponse(error_body(error, 400), status_code=400)
            except LoraExtError as e:
                error = e.message
                response = JSONResponse(error_body(error, e.status), status_code=e.status)
            if request.method == "POST" or response.status_code == 401:
                record = {
                    "event": "lora_ext.control",
                    "action": request.url.path.rsplit("/", 1)[-1],
                    "who": request.client.host if request.client else None,
                    **_summary(request),
                    "status": response.status_code,
                    "outcome": "ok" if response.status_code < 400 else "refused",
                    "error": error,
                    "latency_ms": round(1000 * (time.monotonic() - started), 1),
                }
                log = logger.warning if response.status_code >= 400 else logger.info
                log("%s", json.dumps(record, default=str))
            return response

        return route


router = APIRouter(prefix=PREFIX, route_class=LoraExtRoute)
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 425, 503)
}


def manager_of(request: Request) -> LoraManager:
    return request.app.state.lora_ext  # present: _guard checked


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


@router.get("/loras", responses=_ERRORS)
async def loras(request: Request) -> LorasResponse:
    manager = manager_of(request)
    tenants = [{"tenant": name, **info} for name, info in manager.tenants().items()]
    return LorasResponse.model_validate(
        {
            "adapters": manager.snapshot(),
            "engine_adapters": len(await manager.engine.list_loras()),
            "tenants": tenants,
        }
    )


@router.post("/tenants", responses=_ERRORS)
async def tenants(body: TenantRequest, request: Request) -> TenantInfo:
    """A tenant's weight and cap at run time (admin)."""
    manager = manager_of(request)
    cap = body.max_in_flight if "max_in_flight" in body.model_fields_set else False
    manager.configure_tenant(body.tenant, body.weight, cap)
    info = manager.tenants().get(body.tenant)
    if info is None:  # not seen yet: its settings wait for it
        weight, limit = manager.gate.share.settings(body.tenant)
        info = {"weight": weight, "max_in_flight": limit}
    return TenantInfo(tenant=body.tenant, **info)


@router.get("/state", responses=_ERRORS)
async def state(request: Request) -> StateResponse:
    """How much per-name and per-request state the server holds (it must stay bounded)."""
    return StateResponse(sizes=manager_of(request).sizes())


@router.post("/load_lora_adapter", responses=_ERRORS)
async def load_lora_adapter(body: LoadLoraRequest, request: Request) -> LoadLoraResponse:
    loaded = await manager_of(request).load(
        body.lora_name,
        body.lora_path,
        interrupt=body.interrupt,
        pin=body.pin,
        version=body.version,
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
        timings_ms=loaded.timings_ms,
        unchanged=loaded.unchanged,
    )


@router.post("/pin_lora_adapter", responses=_ERRORS)
async def pin_lora_adapter(body: PinLoraRequest, request: Request) -> PinLoraResponse:
    version = await manager_of(request).pin(body.lora_name, body.version, body.pinned)
    return PinLoraResponse(lora_name=body.lora_name, version=version.number, pinned=version.pinned)


@router.post("/unload_lora_adapter", responses=_ERRORS)
async def unload_lora_adapter(body: UnloadLoraRequest, request: Request) -> UnloadLoraResponse:
    unloaded = await manager_of(request).unload(body.lora_name, body.version)
    return UnloadLoraResponse(lora_name=body.lora_name, unloaded_versions=unloaded)
