"""Filesystem broadcast of adapters, safe on NFS: the trainer publishes, servers pick up.

Layout: ``root/step_{N}/`` holds the adapter files, ``manifest.json`` (name, size and
checksum of every file: ``xxh3_128``, or ``sha256`` from older publishers) and, written
last, the ``STABLE`` sentinel naming the manifest and its checksum. Publishing writes
into a temporary directory, fsyncs every file and the directory, renames it into place,
then writes ``STABLE`` atomically (temp + rename) and fsyncs again. A reader that sees
``STABLE`` verifies what it reads against the manifest, so a sentinel that became
visible before the data (NFS) or a truncated file is detected, never loaded. Directory
fsync errors are tolerated (not every filesystem has it): the ordering plus the
checksums are the correctness gate.

Retention (:func:`clean`) removes steps outside the window, oldest first, and never one
a server holds a lease on: servers write ``step_N/.leases/<holder>`` while a version
loaded from it is resident and refresh it; a lease older than its TTL is stale (its
server died). The cleaner moves a step aside, re-checks the leases, and puts it back if
one appeared meanwhile, so a load racing the cleaner either sees the step whole or not
at all.

In-memory pickup: vLLM 0.32's ``LoRARequest`` carries only a path (the engine core is
another process), so there is no tensors-only load; co-located trainers publish into a
RAM-backed root instead (:func:`ram_root`, ``/dev/shm``), which never touches a disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import xxhash
from pydantic import BaseModel, Field, model_validator

from vllm_lora_ext.errors import LoraExtError

MANIFEST = "manifest.json"
STABLE = "STABLE"
LEASES = ".leases"
STEP_RE = re.compile(r"^step_(\d+)$")
_CHUNK = 1 << 20


class NotReadyError(LoraExtError):
    """The step is not (yet) complete where the reader looks: retry, then 425."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=425)


class CorruptStepError(LoraExtError):
    """What is there contradicts the manifest: 422 (the old version keeps serving)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=422)


class PublishConflictError(LoraExtError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status=409)


class RetentionConfig(BaseModel):
    """How many broadcast steps stay on disk."""

    max_async_level: int = Field(
        default=1, ge=0, description="Steps a sampler may lag behind the trainer."
    )
    keep_recent: int | None = Field(
        default=None,
        ge=1,
        description="Newest steps kept; default max_async_level + 1 (every step a "
        "request may still ask for).",
    )

    @model_validator(mode="after")
    def _window_covers_staleness(self) -> RetentionConfig:
        needed = self.max_async_level + 1
        if self.keep_recent is None:
            self.keep_recent = needed
        elif self.keep_recent < needed:
            raise ValueError(
                f"keep_recent={self.keep_recent} keeps fewer steps than a sampler "
                f"{self.max_async_level} step(s) behind may load (needs >= {needed}): "
                "its adapter would be deleted under it ('adapter not found')"
            )
        return self

    @property
    def window(self) -> int:
        assert self.keep_recent is not None
        return self.keep_recent


# ---- helpers ------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    """Flush a file or directory; tolerated where the filesystem cannot (directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# The manifest's checksums guard against torn or stale reads (NFS), not against an
# adversary (whoever can write a step can write its manifest): xxh3_128 reads at memory
# speed (~15x sha256 here), which keeps a 150 MB swap's check off its critical path.
# sha256 entries (older publishers, other tools) are still verified.
_HASHES: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def digest_of(path: Path, algorithm: str = "xxh3_128") -> str:
    """The file's digest, read through a mapping (no copy through a buffer)."""
    with path.open("rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return _HASHES[algorithm]().hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _HASHES[algorithm](m).hexdigest()


def sha256_of(path: Path) -> str:
    return digest_of(path, "sha256")


def _is_file_name(name: object) -> bool:
    """A plain file name inside a step (no path, nothing that leaves the directory)."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def _files(manifest: Mapping[str, Any]) -> Iterable[tuple[str, Mapping[str, Any]]]:
    """The manifest's entries; each must name a plain file of the step itself."""
    files = manifest.get("files")
    if not isinstance(files, Mapping):
        raise CorruptStepError("the manifest lists no files")
    for name, meta in files.items():
        if not _is_file_name(name):
            raise CorruptStepError(f"manifest entry {name!r} is not a file name of the step")
        if not isinstance(meta, Mapping):
            raise CorruptStepError(f"manifest entry {name!r} is not an object")
        yield name, meta


def _expected(meta: Mapping[str, Any]) -> tuple[str, str]:
    """(algorithm, hex digest) a manifest entry asks for; the fastest one it names."""
    for algorithm in _HASHES:
        if isinstance(meta.get(algorithm), str):
            return algorithm, meta[algorithm]
    raise CorruptStepError(f"manifest entry {dict(meta)} names no known checksum")


def _check_digest(path: Path, meta: Mapping[str, Any], shown: Path) -> None:
    """``path`` holds what the manifest entry ``meta`` names, or CorruptStepError
    naming ``shown`` (the step's file)."""
    algorithm, digest = _expected(meta)
    if digest_of(path, algorithm) != digest:
        raise CorruptStepError(f"'{shown}' does not match the {algorithm} in the manifest")


def step_dir(root: Path | str, step: int) -> Path:
    return Path(root) / f"step_{step}"


def step_of(path: Path | str) -> int | None:
    m = STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


StepKind = Literal["plain", "ours", "sentinel", "pending"]


def step_kind(path: Path | str) -> StepKind:
    """What a ``lora_path`` is, by its content (never by its name alone):

    - ``ours``: this module's layout (a ``manifest.json``, and ``STABLE`` naming it once
      sealed): waited for, then checked against the manifest;
    - ``sentinel``: adapter files and a ``STABLE`` that names no manifest (prime-rl
      writes an empty one after the weights): complete by the writer's word, loaded
      once the adapter files check out;
    - ``pending``: a directory named ``step_N`` with no adapter files visible yet (a
      step on its way, e.g. over NFS): waited for;
    - ``plain``: anything else, an ordinary adapter directory whatever its name: loaded
      at once.
    """
    p = Path(path)
    if (p / MANIFEST).exists():
        return "ours"
    if (p / STABLE).exists():
        return "ours" if _sentinel_names_manifest(p / STABLE) else "sentinel"
    if step_of(p) is not None and not (p / "adapter_config.json").exists():
        return "pending"
    return "plain"


def _sentinel_names_manifest(sentinel: Path) -> bool:
    try:
        body = json.loads(sentinel.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and "manifest" in body


def ram_root(name: str = "vllm-lora-ext") -> Path:
    """A RAM-backed broadcast root for co-located trainer and server."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        raise RuntimeError("no /dev/shm on this machine: publish to a disk root instead")
    root = shm / name
    root.mkdir(parents=True, exist_ok=True)
    return root


# ---- publishing (trainer side) ------------------------------------------------------
def _write_adapter(adapter: Any, dest: Path) -> None:
    """A PEFT model, ``(state_dict, config)``, or an adapter directory -> files in dest."""
    if isinstance(adapter, (str, Path)):
        src = Path(adapter)
        if not src.is_dir():
            raise FileNotFoundError(f"adapter directory '{src}' does not exist")
        for f in src.iterdir():
            if f.is_file() and f.name not in (MANIFEST, STABLE):
                shutil.copyfile(f, dest / f.name)
        return
    if hasattr(adapter, "save_pretrained"):
        adapter.save_pretrained(str(dest), safe_serialization=True)
        return
    if isinstance(adapter, tuple) and len(adapter) == 2:
        from safetensors.torch import save_file

        state_dict, config = adapter
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in state_dict.items()},
            str(dest / "adapter_model.safetensors"),
        )
        if hasattr(config, "save_pretrained"):
            config.save_pretrained(str(dest))
        else:
            (dest / "adapter_config.json").write_text(json.dumps(dict(config)))
        return
    raise TypeError("adapter must be a PEFT model, (state_dict, config) or a directory path")


def _manifest_of(directory: Path, step: int) -> dict[str, Any]:
    files = {}
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.name not in (MANIFEST, STABLE) and not f.name.startswith("."):
            files[f.name] = {"size": f.stat().st_size, "xxh3_128": digest_of(f)}
    return {"step": step, "files": files}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


@dataclass(frozen=True)
class Published:
    path: Path
    step: int
    manifest_sha256: str


def publish(adapter: Any, root: Path | str, step: int) -> Published:
    """Publish ``adapter`` as ``root/step_{step}``; data durable before ``STABLE``.

    Publishing the same content twice (two trainers, a retry) is harmless; different
    content for an existing step is a :class:`PublishConflictError`.
    """
    if step < 0:
        raise ValueError("step must be >= 0")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".step_{step}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_adapter(adapter, tmp)
        manifest = _manifest_of(tmp, step)
        if not manifest["files"]:
            raise ValueError("the adapter wrote no files")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # the step exists: same content is fine, different is not
            if not final.is_dir():
                raise
            theirs = final / MANIFEST
            if not theirs.exists() or json.loads(theirs.read_text()) != manifest:
                raise PublishConflictError(
                    f"{final} already exists with different content"
                ) from None
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    digest = sha256_of(final / MANIFEST)
    _write_atomic(final / STABLE, json.dumps({"manifest": MANIFEST, "sha256": digest}).encode())
    return Published(final, step, digest)


# ---- reading (server side) ----------------------------------------------------------
def verify_step(path: Path | str, check_sums: bool = True) -> dict[str, Any]:
    """The manifest of a complete step, or :class:`NotReadyError` (retry) /
    :class:`CorruptStepError` (a checksum contradicts the manifest)."""
    p = Path(path)
    if not p.is_dir():
        raise NotReadyError(f"step directory '{p}' is not visible")
    try:
        sentinel = json.loads((p / STABLE).read_text())
    except FileNotFoundError:
        raise NotReadyError(f"'{p}' has no {STABLE} sentinel yet") from None
    except ValueError:
        raise NotReadyError(f"'{p}/{STABLE}' is not complete yet") from None
    named = sentinel.get("manifest", MANIFEST) if isinstance(sentinel, dict) else None
    if not _is_file_name(named):
        raise CorruptStepError(f"'{p}/{STABLE}' names no manifest file of the step")
    mpath = p / named
    try:
        raw = mpath.read_bytes()
    except FileNotFoundError:
        raise NotReadyError(f"'{mpath}' named by {STABLE} is not visible yet") from None
    if hashlib.sha256(raw).hexdigest() != sentinel.get("sha256"):
        raise NotReadyError(f"'{mpath}' does not match its checksum in {STABLE} yet")
    manifest = json.loads(raw)
    for name, meta in _files(manifest):
        f = p / name
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            raise NotReadyError(f"'{f}' listed in the manifest is not visible yet") from None
        if size != meta["size"]:
            raise NotReadyError(f"'{f}' has {size} of {meta['size']} bytes so far")
        if check_sums:
            _check_digest(f, meta, f)
    return manifest


def copy_verified(
    step: Path | str,
    dest: Path,
    manifest: Mapping[str, Any],
    open_source: Callable[[Path], BinaryIO] | None = None,
    keep: Callable[[str], bool] | None = None,
) -> None:
    """Copy the manifest's files of ``step`` (those ``keep`` accepts) into ``dest`` in
    one pass, hashing the very bytes written: the copy holds
    exactly what the manifest names, or :class:`CorruptStepError` (the step is corrupt,
    or was rewritten while copied). ``open_source`` opens a file of the step (a server
    opens it under its roots, without following links)."""
    src = Path(step)
    dest.mkdir(parents=True, exist_ok=True)
    buf = bytearray(_CHUNK * 8)
    view = memoryview(buf)
    for name, meta in _files(manifest):
        if keep is not None and not keep(name):
            continue
        algorithm, digest = _expected(meta)
        h = _HASHES[algorithm]()
        opened = open_source(src / name) if open_source else (src / name).open("rb", buffering=0)
        with opened as fin, (dest / name).open("wb") as fout:
            while n := fin.readinto(buf):
                h.update(view[:n])
                fout.write(view[:n])
        if h.hexdigest() != digest:
            raise CorruptStepError(
                f"'{src / name}' does not match the {algorithm} in the manifest (corrupt, "
                "or rewritten while it was read: publish a new step instead of rewriting one)"
            )


def newest_stable(root: Path | str, after: int | None = None) -> Path | None:
    """The newest step under ``root`` with a sentinel (newer than ``after``)."""
    best: tuple[int, Path] | None = None
    with contextlib.suppress(FileNotFoundError):
        for entry in Path(root).iterdir():
            n = step_of(entry)
            if n is None or (after is not None and n <= after):
                continue
            if (entry / STABLE).exists() and (best is None or n > best[0]):
                best = (n, entry)
    return best[1] if best else None


# ---- leases and retention -----------------------------------------------------------
def acquire_lease(step: Path | str, holder: str) -> Path:
    """Mark ``step`` in use by ``holder``; fails if the step is gone."""
    leases = Path(step) / LEASES
    lease = leases / holder
    try:
        leases.mkdir(exist_ok=True)
        lease.write_text(str(os.getpid()))
    except FileNotFoundError:  # the step is not there (or a cleaner just took it)
        raise NotReadyError(f"step directory '{step}' is not visible") from None
    _fsync(leases)
    return lease


def release_lease(lease: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        lease.unlink()


def refresh_leases(leases: Iterable[Path]) -> None:
    now = time.time()
    for lease in leases:
        with contextlib.suppress(FileNotFoundError):
            os.utime(lease, (now, now))


def live_leases(step: Path | str, ttl_s: float) -> list[str]:
    leases = Path(step) / LEASES
    now = time.time()
    out = []
    with contextlib.suppress(FileNotFoundError):
        for lease in leases.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if now - lease.stat().st_mtime <= ttl_s:
                    out.append(lease.name)
    return out


def clean(
    root: Path | str, current_step: int, retention: RetentionConfig, lease_ttl_s: float = 600.0
) -> list[int]:
    """Remove steps older than the window ending at ``current_step``, oldest first,
    never one with a live lease. Returns the steps removed."""
    root = Path(root)
    oldest_kept = current_step - retention.window + 1
    steps = sorted(
        (n, e) for e in root.iterdir() if (n := step_of(e)) is not None and n < oldest_kept
    )
    removed = []
    for n, path in steps:
        if live_leases(path, lease_ttl_s):
            continue
        trash = root / f".trash-step_{n}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            continue
        if live_leases(trash, lease_ttl_s):  # a server took it meanwhile: put it back
            os.rename(trash, path)
            continue
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(n)
    for stale in root.glob(".step_*.tmp-*"):  # left by a publisher that died
        if time.time() - stale.stat().st_mtime > lease_ttl_s:
            shutil.rmtree(stale, ignore_errors=True)
    _fsync(root)
    return removed
