"""Follow broadcast roots and swap each new stable step in (``--watch NAME=ROOT``).

A step that is not complete yet is tried again next round; one the server refuses
(corrupt, invalid) is skipped for good and the watcher waits for a newer one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from vllm_lora_ext import broadcast
from vllm_lora_ext.errors import LoraExtError

logger = logging.getLogger("vllm.lora_ext")

Load = Callable[[str, str], Awaitable[Any]]


class Watcher:
    def __init__(self, load: Load, roots: Mapping[str, Path], interval_s: float) -> None:
        self._load = load
        self._roots = dict(roots)
        self._interval_s = interval_s
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._follow(name, Path(root))) for name, root in self._roots.items()
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _follow(self, name: str, root: Path) -> None:
        seen: int | None = None
        while True:
            newest = await asyncio.to_thread(broadcast.newest_stable, root, seen)
            if newest is not None:
                step = broadcast.step_of(newest)
                try:
                    loaded = await self._load(name, str(newest))
                except broadcast.NotReadyError as e:  # try again next round
                    logger.warning("lora_ext watch name=%s step=%s not ready: %s", name, step, e)
                except LoraExtError as e:  # a bad step: skip it, wait for the next
                    seen = step
                    logger.error("lora_ext watch name=%s step=%s refused: %s", name, step, e)
                except Exception:  # the engine failed it: skip it too, keep watching
                    seen = step
                    logger.exception("lora_ext watch name=%s step=%s failed", name, step)
                else:
                    seen = step
                    logger.info(
                        "lora_ext watch swap name=%s step=%s version=%d latency_ms=%.1f",
                        name,
                        step,
                        loaded.version.number,
                        loaded.latency_ms,
                    )
            await asyncio.sleep(self._interval_s)
