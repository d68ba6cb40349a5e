"""Prompt logprobs that do not end the engine: a fix inside vLLM's CPU workers.

Found by the sampling fuzz on the real engine (vLLM 0.32, CPU backend, ``--enable-lora``):
a request with ``prompt_logprobs`` computed in a batch that holds any other request
(``n > 1`` children, or another tenant's request, base model included) ends the engine
for every tenant. vLLM computes a request's prompt logits with the LoRA logits layer,
whose ``add_lora_logits`` maps rows to adapters with the *sampler* indices: one per
request in the batch, while the prompt logits have one row per prompt token. On the CPU
backend the shapes disagree (``einsum(): subscript b has size 2 ... size 5``) and the
worker dies; with one request in the batch the single index broadcasts, which is why
a lone request works. (Upstream: vllm-project/vllm#17766, #51594.)

The logits layer adds a LoRA delta only for adapters with ``lm_head`` weights, and the
server refuses those on the CPU backend (:func:`check_no_lm_head`): the delta of every
row is zero, so prompt rows that do not map to requests get none, exactly as the model
computes them. Sampled rows (one per request) keep vLLM's own path.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from vllm_lora_ext import compat
from vllm_lora_ext.errors import InvalidAdapterError

logger = logging.getLogger("vllm.lora_ext")


def install() -> None:
    """Patch the CPU punica wrapper's ``add_lora_logits`` (in the worker processes)."""
    try:
        PunicaWrapperCPU = compat.get("PunicaWrapperCPU")
    except compat.IncompatibleVLLMError:  # no CPU punica in this vLLM build
        return
    original = PunicaWrapperCPU.add_lora_logits
    if getattr(original, "_lora_ext", False):
        return

    @functools.wraps(original)
    def add_lora_logits(self: Any, y: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        rows = x.view(-1, x.shape[-1]).size(0)
        if rows != self.sampler_indices.size(0):
            return None  # prompt rows: no adapter has lm_head weights (refused at load)
        return original(self, y, x, *args, **kwargs)

    add_lora_logits._lora_ext = True  # type: ignore[attr-defined]
    PunicaWrapperCPU.add_lora_logits = add_lora_logits
    logger.debug("lora_ext: prompt logprobs with LoRA made safe on the CPU backend")


def on_cpu() -> bool:
    try:
        return bool(compat.get("current_platform").is_cpu())
    except compat.IncompatibleVLLMError:
        return False


def check_no_lm_head(leaf_modules: set[str], path: str) -> None:
    """On the CPU backend an adapter with lm_head weights is refused (see above)."""
    if "lm_head" in leaf_modules and on_cpu():
        raise InvalidAdapterError(
            f"adapter '{path}' has lm_head weights: not served on vLLM's CPU backend, whose "
            "LoRA logits path cannot apply them to prompt logprobs"
        )
