"""vllm-lora-ext: per-adapter pause/abort/resume and hot LoRA swaps for live vLLM servers."""

__version__ = "0.1.0"
