"""Server-owned copies of loaded adapters, and leases on the broadcast steps they came from.

**Staging** (``stage_adapters``, default on): each version is loaded from a copy the
server owns, checked after copying (what is loaded is what was checked), deleted when the
version leaves. vLLM reloads an evicted adapter from its path, so the path must stay valid
and unchanged while the version is resident: a trainer may delete or rewrite its files at
once. The copy's per-version path also keeps vLLM's prefix-cache key ``(lora_name,
lora_path)`` per version.

Where the time goes (``bench/swap_cost.py``): copies go to RAM (``/dev/shm``) when it has
room: there a copy costs a memcpy, while on a disk the kernel throttles whoever writes
fresh dirty pages (a 147 MB copy took 68 ms on an idle disk, ~480 ms while a trainer was
writing its next checkpoint); a full RAM disk spills to a disk directory. A plain
directory is cloned copy-on-write where the filesystem can (XFS, btrfs), else copied. A
broadcast step (with a manifest) is copied and hashed in one pass. Never a hard link:
a trainer that rewrites or truncates its file in place would change, or crash, a live
version. Only an adapter's own files are copied, each opened under an allowed root
without following a link (:mod:`~vllm_lora_ext.server.files`). Each server stages into
a directory of its own (under ``stage_dir`` when set), so servers sharing a
``stage_dir`` never touch each other's copies. Copies run on two background threads at
a lower CPU priority (``stage_priority``), so a big swap yields to the engine serving
other tenants.

**Leases**: a version loaded from a broadcast step writes ``step/.leases/<holder>`` while
it is resident (refreshed every third of ``lease_ttl_s``), so a cleaner never deletes a
step in use; the lease goes when the version leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeVar

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_before_delay,
    wait_exponential,
)

from vllm_lora_ext import broadcast
from vllm_lora_ext.config import LoraExtConfig
from vllm_lora_ext.errors import IncompleteAdapterError, InvalidAdapterError, LoraExtError
from vllm_lora_ext.server.files import ADAPTER_FILES, adapter_files, check_files, open_checked
from vllm_lora_ext.server.registry import Version

logger = logging.getLogger("vllm.lora_ext")

SHM = Path("/dev/shm")
SHM_MIN_FREE = 2 << 30  # below this, staged copies go to disk from the start


def _lower_priority(priority: str) -> None:
    """Lower the calling thread's CPU priority (Linux: per thread) so a big copy yields
    to the engine: ``low`` is nice 10, ``idle`` SCHED_IDLE (only otherwise idle time)."""
    if priority == "normal":
        return
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10 if priority == "low" else 19)
    if priority == "idle":
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def default_stage_parent() -> Path | None:
    """Where a server's own staging directory goes: RAM when it has room, else the
    temporary directory (None)."""
    try:
        st = os.statvfs(SHM)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    return SHM if free >= SHM_MIN_FREE and os.access(SHM, os.W_OK) else None


PREFIX = "lora_ext_stage_"
OWNER = ".owner"  # flock'ed by the live server that owns the directory


def owned_dir(parent: Path | None) -> tuple[Path, int]:
    """A fresh staging directory under ``parent`` (None: the temporary directory) and the
    descriptor holding its owner lock. Directories of servers that died without cleaning
    up (killed) are removed first: their lock is free. It is made under another name and
    renamed once locked, so a sweeper never sees it unlocked."""
    base = Path(parent or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    sweep(base)
    tmp = Path(tempfile.mkdtemp(prefix=".lora_ext_new_", dir=base))
    fd = os.open(tmp / OWNER, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    final = base / f"{PREFIX}{tmp.name.removeprefix('.lora_ext_new_')}"
    os.rename(tmp, final)
    return final, fd


def sweep(base: Path) -> None:
    """Remove staging directories under ``base`` whose owner is gone (a lock held across
    processes and PID namespaces: a live server's is never free)."""
    for d in base.glob(f"{PREFIX}*"):
        try:
            fd = os.open(d / OWNER, os.O_RDWR)
        except OSError:
            continue  # not ours to judge (no owner lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # alive
        finally:
            os.close(fd)
        logger.info("lora_ext staging: removing %s left by a server that is gone", d)
        shutil.rmtree(d, ignore_errors=True)


T = TypeVar("T")
FICLONE = 0x40049409  # linux/fs.h: a copy-on-write clone (XFS, btrfs, bcachefs)


def clone(fin: BinaryIO, dst: Path) -> None:
    """A copy-on-write clone of the open file ``fin`` where the filesystem has them
    (free, and as safe as a copy: a rewrite of either file leaves the other alone),
    else a copy in the kernel."""
    with open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            return
        except OSError:
            pass
        size = os.fstat(fin.fileno()).st_size
        offset = 0
        while offset < size:
            sent = os.sendfile(fout.fileno(), fin.fileno(), offset, size - offset)
            if not sent:  # shrank while copied: the check of the copy refuses it
                break
            offset += sent


class Staging:
    def __init__(self, config: LoraExtConfig, check: Callable[[str], object]) -> None:
        self.config = config
        self._check = check  # validates an adapter directory (rank, target modules)
        self._roots = list(config.lora_roots)
        self._serial = itertools.count(1)
        self._leases: dict[int, Path] = {}  # lora_int_id -> its lease
        self._holder = f"{socket.gethostname()}-{os.getpid()}"
        self._refresher: asyncio.Task | None = None
        self._copier = ThreadPoolExecutor(
            2,
            thread_name_prefix="lora_ext_stage",
            initializer=_lower_priority,
            initargs=(config.stage_priority,),
        )
        self.root: Path | None = None
        self._spill: Path | None = None  # a disk directory once RAM ran out
        self._locks: list[int] = []  # owner locks of our own directories
        if config.stage_adapters:
            # Always a directory of our own (under stage_dir when given): servers sharing
            # a stage_dir never name a copy the same, nor delete each other's.
            self.root, fd = owned_dir(config.stage_dir or default_stage_parent())
            self._locks.append(fd)

    def sizes(self) -> dict[str, int]:
        staged = sum(
            sum(1 for p in root.iterdir() if not p.name.startswith("."))
            for root in (self.root, self._spill)
            if root
        )
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
            # A staged copy is hashed as it is written (one read of the step, and the
            # bytes checked are the bytes loaded); unstaged, the step itself is hashed.
            return await asyncio.to_thread(broadcast.verify_step, path, self.root is None)
        if kind == "pending":
            seen = await asyncio.to_thread(os.path.isdir, path)
            what = "has no adapter files yet" if seen else "is not visible"
            raise broadcast.NotReadyError(f"step directory '{path}' {what}")
        try:
            await asyncio.to_thread(self.check_source, path)
        except IncompleteAdapterError as e:  # files still arriving (or not yet visible)
            raise broadcast.NotReadyError(e.message) from e
        return None

    async def _lease(self, version: Version) -> None:
        # The id is unique in this server; a name may hold '/' or be long (not a file name).
        holder = f"{self._holder}-{version.lora_int_id}"
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
        self._release(version.lora_int_id)

    def _release(self, lora_int_id: int) -> None:
        # Popped before it is released: a copier thread's discard and close() may race
        # for one lease, and only one of them gets it.
        lease = self._leases.pop(lora_int_id, None)
        if lease is not None:
            broadcast.release_lease(lease)

    # ---- staged copies --------------------------------------------------------------
    def run(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """``fn(*args)`` on a copier thread (on the default pool once closed: a load
        failing during shutdown still cleans up)."""
        loop = asyncio.get_running_loop()
        try:
            return loop.run_in_executor(self._copier, fn, *args)
        except RuntimeError:  # the copier was shut down
            return loop.run_in_executor(None, fn, *args)

    def check_source(self, path: str) -> None:
        """A directory a tenant named: each adapter file under a root, then checked."""
        check_files(path, self._roots)
        self._check(path)

    def stage(self, version: Version, manifest: dict | None) -> str:
        """The checked directory the engine loads ``version`` from (blocking)."""
        if self.root is None:
            self.check_source(version.path)
            return version.path
        serial = next(self._serial)
        dest = self.root / f"v{serial}"
        try:
            try:
                self._copy(version, dest, manifest)
            except OSError as e:
                if e.errno != errno.ENOSPC or self.config.stage_dir is not None:
                    raise
                shutil.rmtree(dest, ignore_errors=True)
                dest = self._spill_root() / f"v{serial}"
                logger.warning("lora_ext staging: %s is full, copying to %s", self.root, dest)
                self._copy(version, dest, manifest)
            self._check(str(dest))  # what is loaded is what was checked
        except OSError as e:
            shutil.rmtree(dest, ignore_errors=True)
            if not dest.parent.is_dir():  # not the adapter's fault: say whose it is
                raise LoraExtError(
                    f"cannot stage adapter '{version.name}': the staging directory "
                    f"'{dest.parent}' is gone (the server is shutting down, or something "
                    "outside it removed the directory); nothing was loaded",
                    status=503,
                ) from e
            raise InvalidAdapterError(
                f"cannot read adapter '{version.name}' from '{version.path}': {e.strerror}"
            ) from e
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return str(dest)

    def _copy(self, version: Version, dest: Path, manifest: dict | None) -> None:
        """Copy ``version``'s adapter files into ``dest``, each opened under a root
        without following a link; a broadcast step's files hashed as they are copied.
        Never a hard link: the trainer could rewrite a linked file under a live version."""
        dest.mkdir()  # not its parent: a copy ending after close() must not make it again
        if manifest is not None:
            broadcast.copy_verified(
                version.path,
                dest,
                manifest,
                open_source=lambda p: open_checked(p, self._roots),
                keep=ADAPTER_FILES.__contains__,
            )
            return
        for name in adapter_files(version.path):
            with open_checked(Path(version.path) / name, self._roots) as fin:
                clone(fin, dest / name)

    def _spill_root(self) -> Path:
        if self._spill is None:
            self._spill, fd = owned_dir(None)
            self._locks.append(fd)
        return self._spill

    def discard(self, version: Version) -> None:
        """Delete the staged copy and release the lease of a version that left
        (blocking: run it in a thread)."""
        if self.root is not None and version.load_path != version.path:
            shutil.rmtree(version.load_path, ignore_errors=True)
        self.release(version)

    async def close(self) -> None:
        self._copier.shutdown(wait=False, cancel_futures=True)
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        for root in (self.root, self._spill):
            if root is not None:
                await asyncio.to_thread(shutil.rmtree, root, True)
        # A removal cancelled by shutdown leaves its discard running on a copier thread,
        # releasing leases while this loop runs: walk a copy of the ids.
        for lora_int_id in list(self._leases):
            self._release(lora_int_id)
        for fd in self._locks:
            os.close(fd)
        self._locks.clear()
