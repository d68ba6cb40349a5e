"""Checks of a PEFT adapter directory made before the engine sees it.

vLLM's own loader answers a corrupt adapter with a 500 and may leave the engine holding
half of it; these checks turn every such input into a 4xx that names the problem.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterable
from pathlib import Path

from vllm_lora_ext.errors import IncompleteAdapterError, InvalidAdapterError, LoraExtError
from vllm_lora_ext.server.files import under_roots
from vllm_lora_ext.server.prompt_logprobs import check_no_lm_head

logger = logging.getLogger("vllm.lora_ext")
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> dict:
    """Parse and bounds-check a safetensors header; raises on truncation or garbage."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise IncompleteAdapterError(f"{path.name}: file too short to be safetensors")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or n > _MAX_HEADER:
            raise InvalidAdapterError(f"{path.name}: corrupt safetensors header length {n}")
        if n > size - 8:
            raise IncompleteAdapterError(
                f"{path.name}: truncated (header of {n} bytes, file holds {size - 8})"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):  # no bytes of it in the answer
            raise InvalidAdapterError(f"{path.name}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise InvalidAdapterError(f"{path.name}: corrupt safetensors header")
    check_entries(path.name, header, size - 8 - n)
    return header


def check_entries(file: str, header: dict, data_len: int) -> None:
    """Every tensor entry of a parsed header: offsets two ordered ints inside the data
    (past its end: truncated), a known dtype and a shape that fills exactly its bytes.
    The workers' reader checks with this too (``worker_loader``)."""
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise InvalidAdapterError(f"{file}: corrupt entry for tensor '{key}'")
        _check_tensor(file, key, meta, offsets)
        if offsets[1] > data_len:
            raise IncompleteAdapterError(
                f"{file}: truncated (tensor '{key}' ends at byte {offsets[1]}, "
                f"file holds {data_len})"
            )


#: Bytes per element of every safetensors dtype (the sub-byte float formats excepted:
#: a LoRA never holds them, and they are refused rather than misread).
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_tensor(file: str, key: str, meta: dict, offsets: list[int]) -> None:
    """dtype known, shape a list of sizes, and its bytes exactly the span it claims."""
    dtype, shape = meta.get("dtype"), meta.get("shape")
    if dtype not in DTYPE_BYTES:
        raise InvalidAdapterError(f"{file}: tensor '{key}' has an unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise InvalidAdapterError(f"{file}: tensor '{key}' has an invalid shape")
    count = 1
    for d in shape:
        count *= d
    if count * DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
        raise InvalidAdapterError(
            f"{file}: tensor '{key}' of shape {shape} {dtype} does not fill its "
            f"{offsets[1] - offsets[0]} bytes"
        )


def _leaf_modules(tensor_names: Iterable[str]) -> set[str]:
    """``...layers.0.self_attn.q_proj.weight`` -> ``q_proj`` (the module's own name)."""
    leaves = set()
    for key in tensor_names:
        parts = key.split(".")
        for marker in ("lora_A", "lora_B", "weight", "bias"):
            if marker in parts:
                idx = parts.index(marker)
                if idx > 0:
                    leaves.add(parts[idx - 1])
                break
    return leaves


def model_module_names(model_path: str) -> set[str] | None:
    """Leaf module names of a local base model (from its safetensors headers); None
    when the model is not a local directory of safetensors (the check is skipped)."""
    path = Path(model_path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    names: set[str] = set()
    for f in files:
        try:
            names |= _leaf_modules(read_safetensors_header(f))
        except LoraExtError as e:  # the base model's business (vLLM loads it): skip ours
            logger.warning("lora_ext: cannot read %s (%s); target modules unchecked", f, e)
            return None
    return names


def check_adapter_dir(
    lora_path: str, max_lora_rank: int | None, model_modules: set[str] | None = None
) -> dict:
    """Validate ``lora_path`` as a PEFT LoRA adapter; returns its adapter config."""
    path = Path(lora_path)
    if not path.exists():
        raise IncompleteAdapterError(f"lora_path '{lora_path}' does not exist", status=404)
    if not path.is_dir():
        raise InvalidAdapterError(f"lora_path '{lora_path}' is not a directory")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise IncompleteAdapterError(f"lora_path '{lora_path}' has no adapter_config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapterError(
            f"adapter_config.json in '{lora_path}' is not valid JSON: {e}"
        ) from e
    if not isinstance(cfg, dict):
        raise InvalidAdapterError(f"adapter_config.json in '{lora_path}' is not a JSON object")
    weights = [path / w for w in _WEIGHT_FILES if (path / w).is_file()]
    if not weights:
        raise IncompleteAdapterError(
            f"lora_path '{lora_path}' has no adapter weights ({' or '.join(_WEIGHT_FILES)})"
        )
    header = read_safetensors_header(weights[0]) if weights[0].suffix == ".safetensors" else {}
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(field)
        if pattern is not None and not (
            isinstance(pattern, dict) and all(isinstance(k, str) for k in pattern)
        ):
            raise InvalidAdapterError(
                f"adapter_config.json in '{lora_path}': {field} must be an object "
                "of module pattern -> number"
            )
    targets = cfg.get("target_modules")
    if targets is not None and not (
        isinstance(targets, str)
        or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise InvalidAdapterError(
            f"adapter_config.json in '{lora_path}': target_modules must be a string or a "
            "list of strings"
        )
    alphas = [cfg.get("lora_alpha", 1), *(cfg.get("alpha_pattern") or {}).values()]
    if any(isinstance(a, bool) or not isinstance(a, int | float) for a in alphas):
        raise InvalidAdapterError(f"adapter_config.json in '{lora_path}' has an invalid lora_alpha")
    ranks = [cfg.get("r", 0), *(cfg.get("rank_pattern") or {}).values()]
    if any(not _is_int(r) or r <= 0 for r in ranks):
        raise InvalidAdapterError(f"adapter_config.json in '{lora_path}' has an invalid rank r")
    if max_lora_rank is not None and max(ranks) > max_lora_rank:
        raise InvalidAdapterError(
            f"adapter rank {max(ranks)} exceeds the server's max_lora_rank {max_lora_rank}"
        )
    wanted = _leaf_modules(header)
    if isinstance(targets, list):
        wanted |= {str(t).rsplit(".", 1)[-1] for t in targets}
    check_no_lm_head(wanted, lora_path)
    if model_modules is not None:
        missing = sorted(wanted - model_modules)
        if missing:
            raise InvalidAdapterError(
                f"adapter targets modules the model lacks: {', '.join(missing)}"
            )
    return cfg


def check_under_roots(path: str, roots: Iterable[Path]) -> None:
    """``path`` must lie under one of ``roots`` once symlinks are resolved (no roots: any
    path). ``..`` is refused outright, a symlink leading out of a root with 403. (Each
    file a load reads is checked again: :mod:`~vllm_lora_ext.server.files`.)"""
    roots = list(roots)
    if "\x00" in path:
        raise InvalidAdapterError("lora_path must not contain a NUL byte")
    if not roots:
        return
    p = Path(path)
    if not p.is_absolute():
        raise InvalidAdapterError(f"lora_path '{path}' must be absolute")
    if ".." in p.parts:
        raise InvalidAdapterError(f"lora_path '{path}' must not contain '..'")
    under_roots(p, roots)
