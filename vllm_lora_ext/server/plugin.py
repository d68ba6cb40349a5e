"""The ``vllm.endpoint_plugins`` entry point ``lora_ext``.

Loaded by stock vLLM with ``VLLM_PLUGINS=lora_ext``; our own launchers (CLI, Ray actor)
attach the same object explicitly, so there is one wiring path.
"""

from __future__ import annotations

import ipaddress
import socket
from argparse import Namespace
from typing import Any

from fastapi import FastAPI
from pydantic import SecretStr
from starlette.datastructures import State
from starlette.middleware import Middleware

from vllm_lora_ext import compat
from vllm_lora_ext.config import LoraExtConfig
from vllm_lora_ext.server import stacks
from vllm_lora_ext.server.attribution import annotate_routes
from vllm_lora_ext.server.auth import AdminGuard
from vllm_lora_ext.server.manager import LoraManager
from vllm_lora_ext.server.routes import router
from vllm_lora_ext.server.vllm_api import take_over_abort_route

PLUGIN_NAME = "lora_ext"


class LoraExtPlugin:
    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def __init__(self, config: LoraExtConfig | None = None) -> None:
        try:
            compat.check("server")  # refuse an untested vLLM before any route exists
        except compat.IncompatibleVLLMError as e:
            # vLLM's loader logs and skips a plugin whose constructor raises an Exception:
            # the server would then start without our gate and admin guard. Stop it.
            raise SystemExit(f"lora_ext: {e}") from e
        self.config = config

    @property
    def settings(self) -> LoraExtConfig:
        """The config given, else the environment's (read once)."""
        if self.config is None:
            self.config = LoraExtConfig()
        return self.config

    def admin_key(self) -> SecretStr | None:
        return self.settings.admin_key

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)
        stacks.attach(app, self.settings.stack_routes)
        take_over_abort_route(app)
        annotate_routes(app)  # vLLM's routes are there: plugins attach after them
        if not any(m.cls is AdminGuard for m in app.user_middleware):
            # vLLM's build_app may already have built the stack (Starlette then refuses
            # add_middleware); registering and dropping the built stack rebuilds it on
            # the first request, before any is served.
            app.user_middleware.insert(0, Middleware(AdminGuard, key_of=self.admin_key))
            app.middleware_stack = None

    async def init_state(self, engine_client: Any, state: State, args: Namespace) -> None:
        if engine_client is None:  # the CPU-only render server has no engine
            return
        check_launch(args, self.settings)
        if not hasattr(engine_client, "output_processor"):
            raise RuntimeError(
                "lora_ext needs an in-process AsyncLLM client (run one API server process)"
            )
        manager = LoraManager(
            engine_client,
            self.settings,
            getattr(state, "openai_serving_models", None),
        )
        manager.install()
        await manager.adopt_static_adapters()
        manager.start_watchers()
        state.lora_ext = manager


def is_loopback(host: str | None) -> bool:
    """Whether serving on ``host`` stays on this machine (None/"" is every interface)."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(
                ipaddress.ip_address(info[4][0]).is_loopback
                for info in socket.getaddrinfo(host, None)
            )
        except OSError:
            return False


def check_launch(args: Namespace, config: LoraExtConfig) -> None:
    """Refuse launches our guarantees do not hold in, with what to do instead."""
    count = getattr(args, "api_server_count", None) or 1
    if count > 1:
        raise RuntimeError(
            f"lora_ext needs exactly one API server process, got --api-server-count {count}: "
            "every process would mint its own adapter ids and versions, and a pause or "
            "abort would reach one process of them. Pass --api-server-count 1 (vLLM "
            "defaults it to --data-parallel-size); for more throughput run more replicas."
        )
    host = getattr(args, "host", None)
    if not is_loopback(host) and config.admin_key is None and not config.allow_open_bind:
        raise RuntimeError(
            f"lora_ext refuses to serve on {host or 'every interface'} without an admin "
            "key: anyone reaching the port could load, unload, pause and abort adapters. "
            "Set LORA_EXT_ADMIN_KEY (CLI: --lora-admin-key), bind --host 127.0.0.1, or "
            "opt out with LORA_EXT_ALLOW_OPEN_BIND=1."
        )


def ensure_attached(app: FastAPI, config: LoraExtConfig | None = None) -> LoraExtPlugin:
    """Attach the plugin to an app built by vLLM's ``build_app`` unless vLLM already did
    (``VLLM_PLUGINS=lora_ext``); ``init_app_state`` then initialises it."""
    plugins = list(getattr(app.state, "endpoint_plugins", []))
    for plugin in plugins:
        if getattr(plugin, "name", None) == PLUGIN_NAME:
            if config is not None:
                plugin.config = config
            return plugin
    plugin = LoraExtPlugin(config)
    plugin.attach_router(app)
    app.state.endpoint_plugins = [*plugins, plugin]
    app.openapi_schema = None
    return plugin
