"""The ``vllm.general_plugins`` entry point ``lora_ext``: what the server needs inside
vLLM's worker processes (every vLLM process calls it; it acts only where our launchers
run, ``LORA_EXT_WORKER_LOADER=1``, or ``VLLM_PLUGINS`` names ``lora_ext``)."""

from __future__ import annotations

from vllm_lora_ext import compat
from vllm_lora_ext.server import prompt_logprobs, worker_loader


def install() -> None:
    if not worker_loader.wanted():
        return
    compat.check("worker")
    worker_loader.install()
    prompt_logprobs.install()
