"""One tenant's LoRA policy, trained on the CPU with peft: the trainer side of the demo.

A PPO-clip policy-gradient step on completions sampled by the server: the sampler's
per-token logprobs are the "old" policy, so the importance ratio corrects for the
version lag between sampling and training (the off-policy correction an async RL
trainer needs); advantages are rewards normalised within the batch. Each batch is used
for a few epochs, as PPO intends (the clip keeps them near the sampler): one epoch per
batch let a tenant whose word the base model rarely says stall near its start.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vllm_lora_ext import broadcast


class PolicyTrainer:
    def __init__(
        self,
        model_dir: str | Path,
        rank: int = 8,
        lr: float = 5e-3,
        clip: float = 0.2,
        seed: int = 0,
        epochs: int = 4,
    ) -> None:
        import torch
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        from vllm_lora_ext.toy.assets import lora_config

        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model = get_peft_model(base, lora_config(rank))  # B = 0: starts as the base
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        self.clip = clip
        self.epochs = epochs

    def step(
        self,
        prompt_ids: Sequence[int],
        completions: Sequence[Sequence[int]],
        old_logprobs: Sequence[Sequence[float]],
        rewards: Sequence[float],
    ) -> dict[str, float]:
        """PPO-clip updates (``epochs`` of them) on a batch of completions of one prompt."""
        import torch

        r = torch.tensor(rewards, dtype=torch.float32)
        adv = (r - r.mean()) / (r.std() + 1e-6) if len(rewards) > 1 else r - r.mean()
        longest = max(len(c) for c in completions)
        if longest == 0 or float(adv.abs().sum()) == 0.0:
            return {"loss": 0.0, "ratio": 1.0}
        n_prompt = len(prompt_ids)
        ids = torch.zeros(len(completions), n_prompt + longest, dtype=torch.long)
        mask = torch.zeros(len(completions), longest, dtype=torch.bool)
        old = torch.zeros(len(completions), longest)
        for i, (c, lp) in enumerate(zip(completions, old_logprobs, strict=True)):
            ids[i, :n_prompt] = torch.tensor(list(prompt_ids))
            ids[i, n_prompt : n_prompt + len(c)] = torch.tensor(list(c))
            mask[i, : len(c)] = True
            old[i, : len(lp)] = torch.tensor(list(lp))
        self.model.train()
        a = adv[:, None]
        for _ in range(self.epochs):
            logits = self.model(input_ids=ids).logits[:, n_prompt - 1 : -1]
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, n_prompt:, None])[..., 0]
            ratio = torch.exp(logp - old)
            surrogate = torch.minimum(ratio * a, ratio.clamp(1 - self.clip, 1 + self.clip) * a)
            loss = -(surrogate * mask).sum() / mask.sum()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        self.model.eval()
        return {"loss": float(loss.detach()), "ratio": float(ratio[mask].mean().detach())}

    def publish(self, root: Path, step: int) -> Path:
        """Write the current adapter as broadcast step ``step`` (durable, then STABLE)."""
        return broadcast.publish(self.model, root, step).path
