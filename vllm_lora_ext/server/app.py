"""Building and serving vLLM's OpenAI app with the lora_ext routes attached.

One builder serves both launchers: the CLI (``python -m vllm_lora_ext serve``) and the
Ray actor (``ray_actors/``). Both reuse vLLM's own ``build_app``/``init_app_state`` so the
OpenAI routes, ``/health`` and ``/metrics`` are vLLM's, unchanged.
"""

from __future__ import annotations

import os
import socket
from argparse import Namespace
from collections.abc import Sequence

from fastapi import FastAPI

from vllm_lora_ext import compat
from vllm_lora_ext.config import LoraExtConfig
from vllm_lora_ext.server import worker_loader
from vllm_lora_ext.server.plugin import ensure_attached


def parse_server_args(argv: Sequence[str]) -> Namespace:
    """Parse ``vllm serve``-style arguments with vLLM's own parser and checks."""
    compat.check("server")  # before an engine starts: an untested vLLM is refused here
    make_arg_parser = compat.get("make_arg_parser")
    parser = make_arg_parser(compat.get("FlexibleArgumentParser")(prog="vllm_lora_ext serve"))
    group = parser.add_argument_group("lora_ext")
    group.add_argument(
        "--watch",
        action="append",
        default=[],
        metavar="NAME=ROOT",
        help="Follow the broadcast root ROOT and swap its newest stable step in as NAME.",
    )
    group.add_argument(
        "--lora-admin-key",
        default=None,
        help="Bearer token the /skyrl/v1 routes require (or LORA_EXT_ADMIN_KEY).",
    )
    group.add_argument(
        "--lora-root",
        action="append",
        default=[],
        metavar="DIR",
        help="Allowed root of every lora_path (repeatable; or LORA_EXT_LORA_ROOTS).",
    )
    group.add_argument(
        "--lora-stack-routes",
        default="",
        metavar="STACKS",
        help="Serve RL stacks' own routes: comma-separated of prime-rl, areal (or "
        "LORA_EXT_STACK_ROUTES).",
    )
    group.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help="Serve vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (put through "
        "the extension), as VLLM_ALLOW_RUNTIME_LORA_UPDATING=True does.",
    )
    group.add_argument(
        "--dev-mode",
        action="store_true",
        help="Serve vLLM's dev-mode routes (/pause, /resume, /is_paused, /abort_requests, "
        "weight sync), as VLLM_SERVER_DEV_MODE=1 does. Development and trusted networks "
        "only, as in vLLM.",
    )
    args = parser.parse_args(list(argv))
    compat.get("validate_parsed_serve_args")(args)
    return args


def apply_launch_flags(args: Namespace) -> None:
    """What the RL stacks need, switched on the way vLLM reads it: environment variables
    set before the app is built (the engine's processes inherit them)."""
    os.environ.setdefault(worker_loader.ENV_FLAG, "1")
    if getattr(args, "allow_runtime_lora_updating", False):
        os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if getattr(args, "dev_mode", False):
        os.environ["VLLM_SERVER_DEV_MODE"] = "1"


def config_from_args(args: Namespace) -> LoraExtConfig:
    """Our CLI flags over the LORA_EXT_* environment (one config object either way)."""
    watch = {}
    for item in args.watch:
        name, sep, root = item.partition("=")
        if not sep or not name or not root:
            raise SystemExit(f"--watch expects NAME=ROOT, got '{item}'")
        watch[name] = root
    overrides: dict = {}
    if watch:
        overrides["watch"] = watch
    if args.lora_admin_key:
        overrides["admin_key"] = args.lora_admin_key
    if args.lora_root:
        overrides["lora_roots"] = args.lora_root
    if args.lora_stack_routes:
        overrides["stack_routes"] = {s.strip() for s in args.lora_stack_routes.split(",")}
    return LoraExtConfig(**overrides)


async def build_lora_app(engine, args: Namespace, config: LoraExtConfig | None = None) -> FastAPI:
    """vLLM's app for ``engine`` plus our routes, with app state initialised."""
    init_app_state = compat.get("init_app_state")
    build_app = compat.get("build_app")
    supported_tasks = await engine.get_supported_tasks()
    app = build_app(args, supported_tasks, engine.model_config)
    ensure_attached(app, config)
    await init_app_state(engine, app.state, args, supported_tasks)
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before the engine starts so the port is ours (port 0: any free one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def run_cli_server(argv: Sequence[str]) -> None:
    """``python -m vllm_lora_ext serve <vLLM args>``: the stock server, our routes on."""
    build_async_engine_client = compat.get("build_async_engine_client")
    serve_http = compat.get("serve_http")

    args = parse_server_args(argv)
    apply_launch_flags(args)
    sock = bind_socket(args.host or "0.0.0.0", args.port)
    try:
        async with build_async_engine_client(args) as engine:
            app = await build_lora_app(engine, args, config_from_args(args))
            manager = app.state.lora_ext  # vLLM's lifespan deletes app.state on exit
            try:
                shutdown_task = await serve_http(
                    app,
                    sock=sock,
                    host=args.host,
                    port=args.port,
                    log_level=args.uvicorn_log_level,
                    access_log=not args.disable_uvicorn_access_log,
                )
            finally:
                await manager.shutdown()
        await shutdown_task
    finally:
        sock.close()


def main_serve(argv: Sequence[str]) -> None:
    import uvloop

    uvloop.run(run_cli_server(argv))
