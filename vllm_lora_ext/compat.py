"""Every vLLM internal vllm-lora-ext touches, and the start-up check of the vLLM that runs.

No other module of the package imports vLLM: vLLM's public types are re-exported here,
its internals (hooked methods, launcher functions, engine attributes) are named in
:data:`HOOKS` and fetched with :func:`get`. So a vLLM release that moves or renames one
of them is found in one place, at start-up (:func:`check`), never as a late
``AttributeError`` inside a request.

Tested range: :data:`SUPPORTED`. Outside it the server refuses to start, unless
``LORA_EXT_ALLOW_UNTESTED_VLLM=1``; then every hook point is checked and a missing one
named. Inside it the hook points are checked too (cheap, and a patched vLLM shows).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Literal, NoReturn

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# vLLM's public types, the only vLLM names other modules use directly.
from vllm.exceptions import GenerationError, GracefulHTTPError, VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.logprobs import Logprob
from vllm.lora.request import LoRARequest
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.utils.async_utils import merge_async_iterators

__all__ = [
    "HOOKS",
    "SUPPORTED",
    "CompletionOutput",
    "GracefulHTTPError",
    "IncompatibleVLLMError",
    "LoRARequest",
    "Logprob",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "TokensPrompt",
    "check",
    "check_engine",
    "get",
    "merge_async_iterators",
    "raise_as_generate",
]

logger = logging.getLogger("vllm.lora_ext")

SUPPORTED_RANGE = ">=0.32,<0.34"  # also the cuda extra's (a unit test keeps them equal)
SUPPORTED = SpecifierSet(SUPPORTED_RANGE)
TESTED = ("0.32.0", "0.33.0")
ALLOW_UNTESTED_ENV = "LORA_EXT_ALLOW_UNTESTED_VLLM"

Scope = Literal["server", "worker"]


class IncompatibleVLLMError(RuntimeError):
    """The vLLM that runs is outside the tested range, or lacks a hook point."""


@dataclass(frozen=True)
class Hook:
    """One vLLM internal: where it lives (``module:Qualified.name``; alternatives in
    order, newest first), the parameters we pass it by name (checked against its
    signature) and why we touch it."""

    key: str
    where: tuple[str, ...]
    why: str
    params: tuple[str, ...] = ()
    scope: Scope = "server"


_ASYNC_LLM = "vllm.v1.engine.async_llm:AsyncLLM"

HOOKS: dict[str, Hook] = {
    h.key: h
    for h in [
        # The gate hooks these three on the engine instance (vLLM's own code calls them).
        Hook(
            "AsyncLLM.generate",
            (f"{_ASYNC_LLM}.generate",),
            "the gate's entry",
            ("prompt", "sampling_params", "request_id", "lora_request"),
        ),
        Hook(
            "AsyncLLM.add_request",
            (f"{_ASYNC_LLM}.add_request",),
            "the gate links engine requests to leases",
            ("request_id", "prompt", "params"),
        ),
        Hook(
            "AsyncLLM.abort",
            (f"{_ASYNC_LLM}.abort",),
            "stops by internal id",
            ("request_id", "internal"),
        ),
        Hook(
            "AsyncLLM.pause_generation",
            (f"{_ASYNC_LLM}.pause_generation",),
            "the global pause (ours and the RL stacks' routes)",
            ("mode", "clear_cache"),
        ),
        Hook(
            "AsyncLLM.resume_generation", (f"{_ASYNC_LLM}.resume_generation",), "the global resume"
        ),
        Hook(
            "AsyncLLM.add_lora", (f"{_ASYNC_LLM}.add_lora",), "loads a version", ("lora_request",)
        ),
        Hook(
            "AsyncLLM.remove_lora",
            (f"{_ASYNC_LLM}.remove_lora",),
            "retires a version",
            ("lora_id",),
        ),
        Hook("AsyncLLM.list_loras", (f"{_ASYNC_LLM}.list_loras",), "engine adapter count"),
        Hook("AsyncLLM.check_health", (f"{_ASYNC_LLM}.check_health",), "liveness"),
        Hook(
            "InputProcessor.assign_request_id",
            ("vllm.v1.engine.input_processor:InputProcessor.assign_request_id",),
            "links a segment when vLLM mints its internal id",
            ("request",),
        ),
        Hook(
            "AsyncMPClient.abort_requests_async",
            ("vllm.v1.engine.core_client:AsyncMPClient.abort_requests_async",),
            "aborts n>1 children sent after a sweep",
            ("request_ids",),
        ),
        Hook(
            "RequestOutputCollector",
            ("vllm.v1.engine.output_processor:RequestOutputCollector",),
            "the queue of a request's outputs add_request returns (the gate reads it with "
            "get_nowait, get and close, as generate does)",
        ),
        Hook(
            "EngineDeadError",
            ("vllm.v1.engine.exceptions:EngineDeadError",),
            "errors answered as generate answers them",
        ),
        Hook(
            "EngineGenerateError",
            ("vllm.v1.engine.exceptions:EngineGenerateError",),
            "errors answered as generate answers them",
        ),
        Hook(
            "ParentRequest.get_child_info",
            ("vllm.v1.engine.parallel_sampling:ParentRequest.get_child_info",),
            "n > 1 children's ids (child_request_id)",
            ("index",),
        ),
        Hook(
            "OpenAIServingModels.load_lora_adapter",
            ("vllm.entrypoints.openai.models.serving:OpenAIServingModels.load_lora_adapter",),
            "vLLM's load route through our manager",
            ("request", "base_model_name"),
        ),
        Hook(
            "OpenAIServingModels.unload_lora_adapter",
            ("vllm.entrypoints.openai.models.serving:OpenAIServingModels.unload_lora_adapter",),
            "vLLM's unload route through our manager",
            ("request",),
        ),
        Hook(
            "OpenAIServingModels.resolve_lora",
            ("vllm.entrypoints.openai.models.serving:OpenAIServingModels.resolve_lora",),
            "resolver loads through our manager",
            ("lora_name",),
        ),
        Hook(
            "OpenAIServingModels.is_base_model",
            ("vllm.entrypoints.openai.models.serving:OpenAIServingModels.is_base_model",),
            "a name colliding with the base model",
            ("model_name",),
        ),
        Hook(
            "LoRARequest",
            ("vllm.lora.request:LoRARequest",),
            "one version's engine request",
            ("lora_name", "lora_int_id", "lora_path", "is_3d_lora_weight", "load_inplace"),
        ),
        Hook(
            "create_error_response",
            ("vllm.entrypoints.serve.exception_handling.error_response:create_error_response",),
            "vLLM's error format",
            ("message", "err_type", "status_code"),
        ),
        Hook(
            "build_app",
            ("vllm.entrypoints.launchers.app:build_app",),
            "our launchers",
            ("args", "supported_tasks", "model_config"),
        ),
        Hook(
            "init_app_state",
            ("vllm.entrypoints.launchers.api_server.app_state:init_app_state",),
            "our launchers",
            ("engine_client", "state", "args", "supported_tasks"),
        ),
        Hook(
            "build_async_engine_client",
            ("vllm.entrypoints.launchers.api_server.entry:build_async_engine_client",),
            "the CLI launcher",
            ("args",),
        ),
        Hook(
            "serve_http",
            ("vllm.entrypoints.launchers.launcher:serve_http",),
            "the CLI launcher",
            ("app", "sock"),
        ),
        Hook(
            "watchdog_loop",
            ("vllm.entrypoints.launchers.launcher:watchdog_loop",),
            "the Ray actor's server",
            ("server", "engine"),
        ),
        Hook(
            "make_arg_parser",
            (
                "vllm.entrypoints.common.cli_args:make_arg_parser",  # 0.33
                "vllm.entrypoints.launchers.cli_args:make_arg_parser",
            ),  # 0.32
            "vllm serve's arguments",
            ("parser",),
        ),
        Hook(
            "validate_parsed_serve_args",
            (
                "vllm.entrypoints.common.cli_args:validate_parsed_serve_args",
                "vllm.entrypoints.launchers.cli_args:validate_parsed_serve_args",
            ),
            "vllm serve's checks",
            ("args",),
        ),
        Hook(
            "FlexibleArgumentParser",
            ("vllm.utils.argparse_utils:FlexibleArgumentParser",),
            "vllm serve's parser",
        ),
        Hook(
            "AsyncEngineArgs", ("vllm.engine.arg_utils:AsyncEngineArgs",), "the Ray actor's engine"
        ),
        Hook("AsyncLLM", (_ASYNC_LLM,), "the Ray actor's engine"),
        Hook(
            "AsyncLLM.from_engine_args",
            (f"{_ASYNC_LLM}.from_engine_args",),
            "the Ray actor's engine",
            ("engine_args",),
        ),
        Hook(
            "current_platform",
            ("vllm.platforms:current_platform",),
            "CPU-only workarounds",
            scope="worker",
        ),
        # Workers: the LoRA reader's safetensors, the CPU punica's logits.
        Hook(
            "lora_model", ("vllm.lora.lora_model",), "the workers' adapter reader", scope="worker"
        ),
        Hook(
            "lora_model.safetensors",
            ("vllm.lora.lora_model:safetensors",),
            "replaced by the leak-free reader",
            scope="worker",
        ),
        Hook(
            "PunicaWrapperCPU",
            ("vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU",),
            "prompt logprobs with LoRA on the CPU backend",
            scope="worker",
        ),
        Hook(
            "PunicaWrapperCPU.add_lora_logits",
            ("vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU.add_lora_logits",),
            "prompt logprobs with LoRA on the CPU backend",
            ("y", "x"),
            scope="worker",
        ),
    ]
}

# What the gate reads on a live engine (instance attributes: no class to check early).
ENGINE_ATTRIBUTES = (
    "output_processor.request_states",
    "output_processor.parent_requests",
    "engine_core.abort_requests_async",
    "input_processor.assign_request_id",
    "vllm_config",
    "model_config",
)


def _resolve(where: str) -> Any:
    module, _, qualname = where.partition(":")
    obj: Any = importlib.import_module(module)
    for part in filter(None, qualname.split(".")):
        obj = getattr(obj, part)
    return obj


@functools.cache
def get(key: str) -> Any:
    """The vLLM object a hook names (the first of its alternatives that exists)."""
    hook = HOOKS[key]
    errors = []
    for where in hook.where:
        try:
            return _resolve(where)
        except (ImportError, AttributeError) as e:
            errors.append(f"{where}: {e}")
    raise IncompatibleVLLMError(
        f"vLLM {vllm_version()} lacks {key} (needed for {hook.why}): " + "; ".join(errors)
    )


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "0"))


def in_range(version: str) -> bool:
    """Whether ``version`` is tested (local builds such as ``0.32.0+cpu`` count)."""
    return release(version) in SUPPORTED


def release(version: str) -> Version:
    """The release a version string names (a local build such as ``0.32.0+cpu`` is 0.32.0)."""
    return Version(Version(version).base_version)


def _accepts(obj: Any, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` ``obj`` (a callable or dataclass) does not accept by name."""
    if is_dataclass(obj):
        known = {f.name for f in fields(obj)}
        return [n for n in names if n not in known]
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [n for n in names if n not in params]


def problems(scope: Scope | None = None) -> list[str]:
    """Every hook point of ``scope`` (all: None) that is missing or whose signature
    lacks a parameter we pass, named."""
    found = []
    get.cache_clear()  # a test may have removed something since
    for hook in HOOKS.values():
        if scope is not None and hook.scope != scope:
            continue
        try:
            obj = get(hook.key)
        except IncompatibleVLLMError:
            found.append(f"{hook.key} (missing; needed for {hook.why})")
            continue
        missing = _accepts(obj, hook.params)
        if missing:
            found.append(f"{hook.key} (no parameter {', '.join(missing)})")
    return found


def check(scope: Scope = "server", version: str | None = None) -> str:
    """Refuse a vLLM outside :data:`SUPPORTED` (unless the override is set) or one that
    lacks a hook point; returns the version."""
    version = version or vllm_version()
    tested = in_range(version)
    if not tested and os.environ.get(ALLOW_UNTESTED_ENV) != "1":
        raise IncompatibleVLLMError(
            f"vllm-lora-ext supports vLLM {SUPPORTED_RANGE} (tested: {', '.join(TESTED)}); this "
            f"is vLLM {version}. Install a supported vLLM, or set {ALLOW_UNTESTED_ENV}=1 "
            "to try this one at your own risk (every hook point is then checked at start-up)."
        )
    found = problems(scope)
    if found:
        raise IncompatibleVLLMError(
            f"vLLM {version} lacks hook points vllm-lora-ext needs: " + "; ".join(found)
        )
    if not tested:
        logger.warning(
            "lora_ext: vLLM %s is untested (supported: %s); every hook point was found, "
            "running at your own risk (%s=1)",
            version,
            SUPPORTED_RANGE,
            ALLOW_UNTESTED_ENV,
        )
    return version


def check_engine(engine: Any) -> None:
    """The live engine has every attribute the gate reads (in-process ``AsyncLLM``)."""
    missing = []
    for path in ENGINE_ATTRIBUTES:
        obj = engine
        for part in path.split("."):
            if not hasattr(obj, part):
                missing.append(path)
                break
            obj = getattr(obj, part)
    if missing:
        raise IncompatibleVLLMError(
            f"the engine client ({type(engine).__name__}) lacks {', '.join(missing)}: "
            "lora_ext needs an in-process vLLM AsyncLLM (one API server process)"
        )


def child_request_id(parent_id: str, index: int) -> str:
    """The internal id vLLM's ``ParentRequest.get_child_info`` gives child ``index`` of
    an ``n > 1`` request (same on 0.32 and 0.33; the gate's unit tests run vLLM's own
    fan-out against it)."""
    return f"{index}_{parent_id}"


@functools.cache
def _generate_passes() -> tuple[type[BaseException], ...]:
    passes = (get("EngineDeadError"), VLLMClientError, GracefulHTTPError)
    if release(vllm_version()) >= Version("0.33"):
        passes += (GenerationError,)  # 0.33 lets it through; 0.32 wraps it
    return passes


def raise_as_generate(e: Exception) -> NoReturn:
    """Raise what vLLM's ``AsyncLLM.generate`` raises for ``e``, met while adding or
    running a request: ``e`` itself for the errors it lets through, else an
    ``EngineGenerateError`` from ``e``. The gate runs generate's loop itself (a generator
    layer less per streamed token) and answers as vLLM would; a unit test compares the
    two on the running vLLM."""
    if isinstance(e, _generate_passes()):
        raise e
    raise get("EngineGenerateError")() from e
