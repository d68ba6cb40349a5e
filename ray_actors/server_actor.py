"""A Ray actor that hosts one vLLM ``AsyncLLM`` with vLLM's OpenAI app and our routes.

The actor binds a free port, builds the engine from vLLM server arguments, serves the
app with uvicorn on its own event loop and returns the URL. ``shutdown`` stops uvicorn,
the lora manager and the engine, leaving no engine process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from typing import Any

import ray

from vllm_lora_ext.config import LoraExtConfig

_START_TIMEOUT_S = 600.0


class LoraServer:
    """The actor body (use :data:`LoraServerActor`); kept plain for readability."""

    def __init__(self) -> None:
        self.engine: Any = None
        self.app: Any = None
        self.manager: Any = None
        self.server: Any = None
        self.serve_task: asyncio.Task | None = None
        self.url: str | None = None

    async def start(
        self,
        server_args: Sequence[str],
        config: dict | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> str:
        """Start engine and HTTP server; returns ``http://host:port``."""
        import uvicorn
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from vllm_lora_ext.server.app import (
            apply_launch_flags,
            bind_socket,
            build_lora_app,
            parse_server_args,
        )

        if self.url is not None:
            return self.url
        args = parse_server_args(server_args)
        args.host = host  # what the launch check and vLLM's app see
        apply_launch_flags(args)
        sock = bind_socket(host, port)
        bound_port = sock.getsockname()[1]
        try:
            engine_args = AsyncEngineArgs.from_cli_args(args)
            self.engine = AsyncLLM.from_engine_args(engine_args)
            self.app = await build_lora_app(self.engine, args, LoraExtConfig(**(config or {})))
            self.manager = self.app.state.lora_ext  # vLLM's lifespan deletes app.state
            uv_config = uvicorn.Config(
                self.app, log_level="warning", access_log=False, timeout_keep_alive=30
            )
            self.server = uvicorn.Server(uv_config)
            self.serve_task = asyncio.get_running_loop().create_task(
                self.server.serve(sockets=[sock])
            )
            async with asyncio.timeout(_START_TIMEOUT_S):
                while not self.server.started:
                    if self.serve_task.done():
                        self.serve_task.result()
                        raise RuntimeError("uvicorn exited during start-up")
                    await asyncio.sleep(0.05)
        except BaseException:
            await self.shutdown()
            sock.close()
            raise
        self.url = f"http://{host}:{bound_port}"
        return self.url

    async def health(self) -> bool:
        if self.engine is None:
            return False
        try:
            await asyncio.wait_for(self.engine.check_health(), 10)
        except Exception:
            return False
        return True

    def engine_pids(self) -> list[int]:
        """Child processes of this actor (engine core and workers), for leak checks."""
        import psutil

        return [p.pid for p in psutil.Process(os.getpid()).children(recursive=True)]

    async def shutdown(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.serve_task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self.serve_task, 30)
            self.serve_task = None
        if self.manager is not None:
            await self.manager.shutdown()
            self.manager = None
        self.app = None
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
            self.engine = None
        self.url = None


LoraServerActor = ray.remote(LoraServer)


def launch_servers(
    server_args: Sequence[str],
    num_servers: int = 1,
    config: dict | None = None,
    num_cpus: float = 1,
) -> tuple[list[Any], list[str]]:
    """Start ``num_servers`` actors (one GPU each where the cluster has GPUs).

    Returns the actor handles (keep them alive; call ``shutdown`` on each) and URLs.
    """
    gpus = ray.cluster_resources().get("GPU", 0)
    options: dict[str, Any] = {"num_cpus": num_cpus, "max_concurrency": 1000}
    if gpus >= num_servers:
        options["num_gpus"] = 1
    actors = [LoraServerActor.options(**options).remote() for _ in range(num_servers)]
    try:
        urls = ray.get([a.start.remote(list(server_args), config) for a in actors])
    except BaseException:
        ray.get([a.shutdown.remote() for a in actors])
        raise
    return actors, urls


def shutdown_servers(actors: Sequence[Any], timeout_s: float = 120) -> None:
    ray.get([a.shutdown.remote() for a in actors], timeout=timeout_s)
    for actor in actors:
        ray.kill(actor)
