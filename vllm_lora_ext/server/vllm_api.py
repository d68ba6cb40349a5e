"""vLLM's own LoRA and abort entry points, put through the extension.

RL stacks already talk to vLLM: SkyRL, prime-rl and AReaL load and unload adapters with
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` and abort with
``/abort_requests``. Left alone, those bypass the manager: an in-place reload reuses the
old weights' prefix-cache blocks, an unload leaves the adapter in the engine. Every such
load (those routes, vLLM's SageMaker adapter routes, LoRA resolver plugins) passes one
object, the server's ``OpenAIServingModels``; its ``load_lora_adapter``,
``unload_lora_adapter`` and ``resolve_lora`` are replaced here (on the instance) by the
manager's, with vLLM's request and response formats:

- a new name becomes a managed name (version 1);
- ``load_inplace`` on an existing name is a new version (staged: no stale KV cache,
  logprobs as a fresh load); without it an existing name is vLLM's 400;
- unload retires the name (``name@N``: that version); the engine drops it once idle;
- a resolver's adapter is loaded as a managed name.

vLLM's dev-mode ``/abort_requests`` with no ids aborts everything the engine holds; the
replacement here also ends what it does not hold: requests held by a per-adapter pause
and requests between continuation segments. (With ids, vLLM's route already reaches
those through the gate's ``abort`` hook.)
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from vllm_lora_ext import compat
from vllm_lora_ext.errors import LoraExtError
from vllm_lora_ext.server.registry import split_version

if TYPE_CHECKING:
    from vllm_lora_ext.server.manager import LoraManager


def error_response(message: str, status: int) -> Any:
    """vLLM's ``ErrorResponse`` (what its LoRA routes return on failure)."""
    return compat.get("create_error_response")(
        message=message, err_type=HTTPStatus(status).phrase, status_code=HTTPStatus(status)
    )


class ServingModelsHooks:
    """Replaces three methods of one ``OpenAIServingModels`` with the manager's."""

    def __init__(self, manager: LoraManager, serving_models: Any) -> None:
        self.manager = manager
        self.models = serving_models
        self._originals: dict[str, Any] = {}

    def install(self) -> None:
        for name in ("load_lora_adapter", "unload_lora_adapter", "resolve_lora"):
            if name not in self._originals:
                self._originals[name] = getattr(self.models, name)
                setattr(self.models, name, getattr(self, name))

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(self.models, name, original)
        self._originals.clear()

    async def load_lora_adapter(self, request: Any, base_model_name: str | None = None) -> Any:
        name, path = request.lora_name, request.lora_path
        if not name or not path:
            return error_response("Both 'lora_name' and 'lora_path' must be provided.", 400)
        if self.models.is_base_model(name):
            return error_response(
                f"The lora adapter '{name}' conflicts with a served base model.", 400
            )
        if name in self.manager.registry and not request.load_inplace:
            return error_response(
                f"The lora adapter '{name}' has already been loaded. If you want to load "
                "the adapter in place, set 'load_inplace' to True.",
                400,
            )
        try:
            await self.manager.load(
                name, path, is_3d_lora_weight=bool(getattr(request, "is_3d_lora_weight", False))
            )
        except LoraExtError as e:
            return error_response(e.message, e.status)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload_lora_adapter(self, request: Any) -> Any:
        if not request.lora_name:
            return error_response("'lora_name' needs to be provided to unload a LoRA adapter.", 400)
        name, number = split_version(request.lora_name)
        if name not in self.manager.registry:
            return error_response(f"The lora adapter '{request.lora_name}' cannot be found.", 404)
        try:
            await self.manager.unload(name, number)
        except LoraExtError as e:
            return error_response(e.message, e.status)
        return f"Success: LoRA adapter '{request.lora_name}' removed successfully."

    async def resolve_lora(self, lora_name: str) -> Any:
        """A name no route knows yet: ask vLLM's resolver plugins for a path, load it as
        a managed name (one resolution per name at a time)."""
        published = self.models.lora_requests.get(lora_name)
        if published is not None:
            return published
        number = split_version(lora_name)[1]
        resolvers = list(getattr(self.models, "lora_resolvers", []))
        if number is not None or not resolvers:
            return error_response(f"LoRA adapter {lora_name} does not exist", 404)
        async with self.manager.resolving(lora_name):
            if lora_name in self.models.lora_requests:  # resolved while we waited
                return self.models.lora_requests[lora_name]
            found = False
            for resolver in resolvers:
                resolved = await resolver.resolve_lora(self.models.model_config.model, lora_name)
                if resolved is None:
                    continue
                found = True
                try:
                    await self.manager.load(lora_name, resolved.lora_path)
                except LoraExtError:
                    continue
                return self.models.lora_requests[lora_name]
        if found:
            return error_response(
                f"LoRA adapter '{lora_name}' was found but could not be loaded.", 400
            )
        return error_response(f"LoRA adapter {lora_name} does not exist", 404)


abort_router = APIRouter()


@abort_router.post("/abort_requests")
async def abort_requests(raw_request: Request) -> JSONResponse:
    """vLLM's dev-mode route, same body and answer; with no ids it also ends requests
    the engine does not hold (held by a pause, between continuation segments)."""
    try:
        body = await raw_request.json()
    except json.JSONDecodeError:
        return JSONResponse(error_response("Invalid JSON format", 400).model_dump(), 400)
    if not isinstance(body, dict):
        return JSONResponse(
            error_response("Request body must be a JSON object", 400).model_dump(), 400
        )
    manager: LoraManager = raw_request.app.state.lora_ext
    request_ids = body.get("request_ids")
    if request_ids is not None and not (
        isinstance(request_ids, list) and all(isinstance(i, str) for i in request_ids)
    ):
        return JSONResponse(
            error_response("'request_ids' must be a list of strings", 400).model_dump(), 400
        )
    if request_ids:
        await manager.engine.abort(request_ids)  # the gate's hook reaches held ones too
        aborted = len(request_ids)
    else:
        aborted = await manager.abort_everything()
    return JSONResponse({"status": "aborted", "aborted": aborted})


def take_over_abort_route(app: FastAPI) -> None:
    """Serve ``/abort_requests`` ourselves where vLLM serves it (dev mode, tokens-only);
    our route goes first so it is the one that matches."""
    if not any(getattr(r, "path", None) == "/abort_requests" for r in app.router.routes):
        return
    if any(getattr(r, "endpoint", None) is abort_requests for r in app.router.routes):
        return
    app.include_router(abort_router)
    ours = [r for r in app.router.routes if getattr(r, "endpoint", None) is abort_requests]
    for route in ours:
        app.router.routes.remove(route)
        app.router.routes.insert(0, route)
