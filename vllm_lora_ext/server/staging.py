"""Server-owned copies of loaded adapters, and leases on the broadcast steps they came from.

**Staging** (``stage_adapters``, default on): each version is loaded from a copy the
server owns, checked after copying (what is loaded is what was checked), deleted when the
version leaves. vLLM reloads an evicted adapter from its path, so the path must stay valid
and unchanged while the version is resident: a trainer may delete or rewrite its files at
once. The copy's per-version path also keeps vLLM's prefix-cache key ``(lora_name,
lora_path)`` per version.

**Leases**: a version loaded from a broadcast step writes ``step/.leases/<holder>`` while
it is resident (refreshed every third of ``lease_ttl_s``), so a cleaner never deletes a
step in use; the lease goes when the version leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_before_delay,
    wait_exponential,
)

from vllm_lora_ext import broadcast
from vllm_lora_ext.config import LoraExtConfig
from vllm_lora_ext.errors import IncompleteAdapterError, InvalidAdapterError
from vllm_lora_ext.server.registry import Version

logger = logging.getLogger("vllm.lora_ext")


class Staging:
    def __init__(self, config: LoraExtConfig, check: Callable[[str], object]) -> None:
        self.config = config
        self._check = check  # validates an adapter directory (rank, target modules)
        self._serial = itertools.count(1)
        self._leases: dict[int, Path] = {}  # lora_int_id -> its lease
        self._holder = f"{socket.gethostname()}-{os.getpid()}"
        self._refresher: asyncio.Task | None = None
        self._own_root = config.stage_adapters and config.stage_dir is None
        self.root: Path | None = None
        if config.stage_adapters:
            self.root = config.stage_dir or Path(tempfile.mkdtemp(prefix="lora_ext_stage_"))
            self.root.mkdir(parents=True, exist_ok=True)

    def sizes(self) -> dict[str, int]:
        staged = sum(1 for _ in self.root.iterdir()) if self.root is not None else 0
        return {"leases": len(self._leases), "staged": staged}

    # ---- broadcast steps ------------------------------------------------------------
    async def await_step(self, version: Version) -> dict | None:
        """Wait (bounded, with backoff) until a broadcast step is complete where the
        server looks; returns its manifest (our layout) or None (a sentinel without a
        manifest, or a step that turned out to be a plain adapter directory). What is
        not visible yet is tried again until ``stable_wait_s``, then a 425 names what is
        missing; a checksum mismatch is a 422 at once. Only our layout is leased."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(broadcast.NotReadyError),
            stop=stop_before_delay(self.config.stable_wait_s),
            wait=wait_exponential(multiplier=0.02, max=1.0),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._step_once(version)
        except broadcast.NotReadyError as e:
            self.release(version)
            e.message = f"{e.message} (waited {self.config.stable_wait_s}s)"
            raise
        except BaseException:
            self.release(version)
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _step_once(self, version: Version) -> dict | None:
        path = version.path
        kind = await asyncio.to_thread(broadcast.step_kind, path)  # a pending step changes
        if kind == "ours":
            await self._lease(version)  # (again: the step may have been replaced)
            return await asyncio.to_thread(broadcast.verify_step, path)
        if kind == "pending":
            seen = await asyncio.to_thread(os.path.isdir, path)
            what = "has no adapter files yet" if seen else "is not visible"
            raise broadcast.NotReadyError(f"step directory '{path}' {what}")
        try:
            await asyncio.to_thread(self._check, path)
        except IncompleteAdapterError as e:  # files still arriving (or not yet visible)
            raise broadcast.NotReadyError(e.message) from e
        return None

    async def _lease(self, version: Version) -> None:
        holder = f"{self._holder}-{version.internal_name}-{version.lora_int_id}"
        try:
            lease = await asyncio.to_thread(broadcast.acquire_lease, version.path, holder)
        except PermissionError as e:  # a read-only root: the staged copy still protects us
            logger.warning("lora_ext cannot lease %s: %s", version.path, e)
            return
        self._leases[version.lora_int_id] = lease
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        while self._leases:
            await asyncio.to_thread(broadcast.refresh_leases, list(self._leases.values()))
            await asyncio.sleep(self.config.lease_ttl_s / 3)

    def release(self, version: Version) -> None:
        lease = self._leases.pop(version.lora_int_id, None)
        if lease is not None:
            broadcast.release_lease(lease)

    # ---- staged copies --------------------------------------------------------------
    def stage(self, version: Version, manifest: dict | None) -> str:
        """The directory the engine loads ``version`` from, checked (blocking: run it in
        a thread)."""
        if self.root is None:
            if manifest is not None:  # a step skipped the early check (it had to wait)
                self._check(version.path)
            return version.path
        dest = self.root / f"v{next(self._serial)}"
        try:
            shutil.copytree(version.path, dest, ignore=shutil.ignore_patterns(".*"))
            if manifest is not None:
                broadcast.verify_copy(dest, manifest)
            self._check(str(dest))
        except OSError as e:
            shutil.rmtree(dest, ignore_errors=True)
            raise InvalidAdapterError(
                f"cannot read adapter '{version.name}' from '{version.path}': {e}"
            ) from e
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return str(dest)

    def discard(self, version: Version) -> None:
        """Delete the staged copy and release the lease of a version that left
        (blocking: run it in a thread)."""
        if self.root is not None and version.load_path != version.path:
            shutil.rmtree(version.load_path, ignore_errors=True)
        self.release(version)

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._own_root and self.root is not None:
            await asyncio.to_thread(shutil.rmtree, self.root, True)
        for lease in self._leases.values():
            broadcast.release_lease(lease)
        self._leases.clear()
