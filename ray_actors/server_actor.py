"""A Ray actor that hosts one vLLM ``AsyncLLM`` with vLLM's OpenAI app and our routes.

The actor binds a free port on its node's IP, builds the engine from vLLM server
arguments, serves the app with uvicorn on its own event loop and returns the URL.
``shutdown`` stops uvicorn, the lora manager and the engine, leaving no engine process
behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from ray_actors.placement import PlacementError, ReplicaShape, device_of, plan
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
        self.watchdog: asyncio.Task | None = None
        self.url: str | None = None
        self._starting: asyncio.Task | None = None

    async def start(
        self, server_args: Sequence[str], config: dict | None = None, bind_all: bool = False
    ) -> str:
        """Start engine and HTTP server on this node's IP (``bind_all``: every
        interface); returns ``http://<node IP>:<port>``. Single-flight: a second caller
        (a restarted supervisor adopting this replica mid-start) waits for the same
        start, and once serving every call returns the URL at once."""
        if self._starting is None or (self._starting.done() and self.url is None):
            self._starting = asyncio.get_running_loop().create_task(
                self._start(server_args, config, bind_all)
            )
        return await asyncio.shield(self._starting)

    async def _start(self, server_args: Sequence[str], config: dict | None, bind_all: bool) -> str:
        import uvicorn

        from vllm_lora_ext import compat
        from vllm_lora_ext.server.app import (
            apply_launch_flags,
            bind_socket,
            build_lora_app,
            parse_server_args,
        )

        if self.url is not None:
            return self.url
        node_ip = ray.util.get_node_ip_address()
        host = "0.0.0.0" if bind_all else node_ip
        args = parse_server_args(server_args)
        args.host = host  # what the launch check and vLLM's app see
        apply_launch_flags(args)
        sock = bind_socket(host, 0)
        bound_port = sock.getsockname()[1]
        try:
            engine_args = compat.get("AsyncEngineArgs").from_cli_args(args)
            self.engine = compat.get("AsyncLLM").from_engine_args(engine_args)
            self.app = await build_lora_app(self.engine, args, LoraExtConfig(**(config or {})))
            self.manager = self.app.state.lora_ext  # vLLM's lifespan deletes app.state
            uv_config = uvicorn.Config(
                self.app, log_level="warning", access_log=False, timeout_keep_alive=30
            )
            self.server = uvicorn.Server(uv_config)
            self.serve_task = asyncio.get_running_loop().create_task(
                self.server.serve(sockets=[sock])
            )
            # vLLM's own: once the engine died, stop serving (connections refused, not
            # 500s), as stock `vllm serve` does; health() then reports it for a restart.
            self.watchdog = asyncio.get_running_loop().create_task(
                compat.get("watchdog_loop")(self.server, self.engine)
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
        self.url = f"http://{node_ip}:{bound_port}"
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

    def engine_core_pids(self) -> list[int]:
        """The engine-core processes vLLM started for this replica (by vLLM's own
        record, not by process title: a title is set only once the process runs)."""
        resources = getattr(getattr(self.engine, "engine_core", None), "resources", None)
        manager = getattr(resources, "engine_manager", None)
        return [p.pid for p in getattr(manager, "processes", [])]

    async def shutdown(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watchdog
            self.watchdog = None
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


def _nodes() -> dict[str, dict[str, float]]:
    """Alive nodes' total resources, by node IP (one node per IP in what we plan for)."""
    out: dict[str, dict[str, float]] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            res = node.get("Resources", {})
            out[node["NodeManagerAddress"]] = {k: res.get(k, 0.0) for k in ("CPU", "GPU")}
    return out


@dataclass
class ReplicaSpec:
    """How every replica of a set is started: its vLLM arguments (with the executor
    backend its shape needs), resources and environment; one source for the launcher
    and the supervisor."""

    server_args: list[str]
    shape: ReplicaShape
    config: dict | None = None
    bind_all: bool = False
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        server_args: Sequence[str],
        config: dict | None = None,
        num_cpus: float = 1,
        bind_all: bool = False,
        env: dict[str, str] | None = None,
    ) -> ReplicaSpec:
        from vllm_lora_ext.server.app import parse_server_args

        args = parse_server_args(server_args)
        shape = ReplicaShape(
            tp=args.tensor_parallel_size,
            pp=args.pipeline_parallel_size,
            device=device_of(ray.cluster_resources()),
            cpus_per_worker=num_cpus,
        )
        spec = cls(list(server_args), shape, config, bind_all, dict(env or {}))
        if shape.workers > 1 and not getattr(args, "distributed_executor_backend", None):
            backend = "ray" if shape.device == "GPU" else "mp"
            spec.server_args += ["--distributed-executor-backend", backend]
        if shape.device == "GPU" and shape.workers > 1:
            spec.env["VLLM_RAY_BUNDLE_INDICES"] = ",".join(str(i) for i in range(shape.workers))
        return spec

    def placement_group(self, name: str, timeout_s: float) -> Any:
        """One named, detached placement group (it outlives the supervisor that made it;
        a restarted one finds it by name), placed within ``timeout_s``."""
        from ray.util.placement_group import placement_group, remove_placement_group

        plan(_nodes(), 1, self.shape)
        group = placement_group(
            self.shape.bundles(), strategy="STRICT_PACK", name=name, lifetime="detached"
        )
        ready, _ = ray.wait([group.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(group)
            raise PlacementError(f"placement group {name} not placed within {timeout_s:g}s")
        return group

    def placement_groups(self, count: int, timeout_s: float) -> list[Any]:
        """``count`` placement groups, placed (refused up front when the cluster can
        never hold them, naming what is missing)."""
        from ray.util.placement_group import placement_group, remove_placement_group

        plan(_nodes(), count, self.shape)
        groups = [
            placement_group(self.shape.bundles(), strategy="STRICT_PACK") for _ in range(count)
        ]
        ready, _ = ray.wait([g.ready() for g in groups], num_returns=count, timeout=timeout_s)
        if len(ready) < count:
            for group in groups:
                remove_placement_group(group)
            raise PlacementError(
                f"{count - len(ready)} of {count} replica placement group(s) not placed "
                f"within {timeout_s:g}s: the resources exist but are in use by other work"
            )
        return groups

    def actor_in(self, group: Any, name: str | None = None) -> Any:
        """A new (not yet started) server actor on bundle 0 of ``group``; with ``name``
        a named detached actor (it outlives the supervisor that made it)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        named = {"name": name, "lifetime": "detached"} if name is not None else {}
        return LoraServerActor.options(
            **named,
            num_cpus=self.shape.cpus_per_worker,
            # One worker: the actor runs it and holds the GPU; more: vLLM's Ray workers
            # take the bundles' GPUs.
            num_gpus=1 if self.shape.device == "GPU" and self.shape.workers == 1 else 0,
            max_concurrency=1000,
            runtime_env={"env_vars": dict(self.env)},
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
            ),
        ).remote()

    def start(self, actor: Any) -> Any:
        """The ObjectRef of ``actor``'s URL once it serves."""
        return actor.start.remote(self.server_args, self.config, self.bind_all)


def launch_servers(
    server_args: Sequence[str],
    num_servers: int = 1,
    config: dict | None = None,
    num_cpus: float = 1,
    bind_all: bool = False,
    env: dict[str, str] | None = None,
    placement_timeout_s: float = 120,
) -> tuple[list[Any], list[str]]:
    """Start ``num_servers`` replicas, each in its own placement group of ``tp x pp``
    bundles packed on one node (GPU bundles on GPU clusters, CPU bundles otherwise).

    Each replica serves on its node's IP (``bind_all``: every interface, which needs an
    admin key or ``allow_open_bind`` in ``config``) and its URL names that IP. A cluster
    that cannot hold the replicas is refused up front with what is missing. On GPUs a
    replica with ``tp x pp > 1`` uses vLLM's Ray executor inside its placement group;
    the CPU platform has no Ray executor, so there vLLM's processes (``mp``) run inside
    the reservation. Returns the actor handles (keep them alive; stop them with
    :func:`shutdown_servers`) and the URLs. :mod:`ray_actors.supervisor` adds restarts.
    """
    from ray.util.placement_group import remove_placement_group

    spec = ReplicaSpec.of(server_args, config, num_cpus, bind_all, env)
    groups = spec.placement_groups(num_servers, placement_timeout_s)
    actors: list[Any] = []
    try:
        actors = [spec.actor_in(g) for g in groups]
        urls = ray.get([spec.start(a) for a in actors])
    except BaseException:
        with contextlib.suppress(Exception):
            ray.get([a.shutdown.remote() for a in actors], timeout=120)
        for group in groups:
            remove_placement_group(group)
        raise
    for actor, group in zip(actors, groups, strict=True):
        _GROUPS[actor._actor_id] = group
    return actors, urls


_GROUPS: dict[Any, Any] = {}  # actor id -> its placement group (removed at shutdown)


def shutdown_servers(actors: Sequence[Any], timeout_s: float = 120) -> None:
    from ray.util.placement_group import remove_placement_group

    try:
        ray.get([a.shutdown.remote() for a in actors], timeout=timeout_s)
    finally:
        for actor in actors:
            ray.kill(actor)
            group = _GROUPS.pop(actor._actor_id, None)
            if group is not None:
                remove_placement_group(group)
