"""The files a load reads: only those an adapter needs, each under an allowed root once
resolved, and opened without following a link.

A tenant names a directory; what it may make the server read is what lies under the
roots (``lora_roots``). Checking the directory is not enough: a file in it may be a link
out of the roots (another team's weights), a subdirectory may be a link to ``/``, and a
link may be swapped between the check and the read. So each file is resolved once, its
real path must lie under a root, and it is then opened by walking that real path one
component at a time with ``O_NOFOLLOW``: a component replaced by a link meanwhile makes
the open fail instead of leading elsewhere. The staged copy is made from those open
files, so what is copied is what was checked; only the names in :data:`ADAPTER_FILES`
are read (never optimizer state, nested checkpoints or anything else in the directory).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from vllm_lora_ext.errors import InvalidAdapterError

#: What a LoRA adapter directory may hold that a server reads: PEFT's config and
#: weights, vLLM's extra-vocabulary embeddings, tokenizer files, our broadcast manifest.
ADAPTER_FILES = frozenset(
    {
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapter_model.bin",
        "new_embeddings.safetensors",
        "new_embeddings.bin",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
        "manifest.json",
    }
)


def _real(path: Path) -> Path:
    try:
        return Path(os.path.realpath(path, strict=False))
    except (OSError, ValueError) as e:  # a NUL byte, a loop, a name too long
        raise InvalidAdapterError(f"lora_path '{path}' cannot be resolved: {e}") from None


def under_roots(path: Path | str, roots: Iterable[Path]) -> Path:
    """``path``'s real path, which must lie under one of ``roots`` (none: anywhere);
    403 naming where it leads otherwise."""
    p = Path(path)
    if "\x00" in str(p):
        raise InvalidAdapterError("lora_path must not contain a NUL byte")
    real = _real(p)
    roots = list(roots)
    if roots and not any(real.is_relative_to(_real(r)) for r in roots):
        raise InvalidAdapterError(
            f"'{p}' is outside the allowed roots"
            + (f" (it resolves to '{real}')" if real != p else ""),
            status=403,
        )
    return real


def open_nofollow(real: Path) -> BinaryIO:
    """Open the regular file at ``real`` (a resolved path) walking it component by
    component without following a link: what was checked is what is opened."""
    if not real.is_absolute():
        raise InvalidAdapterError(f"'{real}' is not an absolute path")
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        *dirs, name = real.parts[1:]
        for part in dirs:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    except OSError as e:
        raise InvalidAdapterError(
            f"cannot open '{real}' without following a link (changed while loading?): {e.strerror}"
        ) from None
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        os.close(file_fd)
        raise InvalidAdapterError(f"'{real}' is not a regular file")
    os.set_blocking(file_fd, True)
    return os.fdopen(file_fd, "rb", buffering=0)


def adapter_files(directory: Path | str) -> list[str]:
    """The names of :data:`ADAPTER_FILES` present in ``directory`` (links included:
    each is resolved and checked when opened)."""
    try:
        names = os.listdir(directory)
    except OSError as e:
        raise InvalidAdapterError(f"cannot list '{directory}': {e.strerror}") from None
    return sorted(n for n in names if n in ADAPTER_FILES)


def check_files(directory: Path | str, roots: Iterable[Path]) -> None:
    """Every adapter file of ``directory`` lies under a root once resolved (403)."""
    roots = list(roots)
    if roots:
        for name in adapter_files(directory):
            under_roots(Path(directory) / name, roots)


def open_checked(path: Path | str, roots: Iterable[Path]) -> BinaryIO:
    """The file at ``path``, checked under the roots and opened without a link."""
    return open_nofollow(under_roots(path, roots))
