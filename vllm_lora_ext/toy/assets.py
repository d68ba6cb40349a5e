"""Built-in toy assets: a tiny Llama, its byte-level BPE tokenizer and two LoRA adapters.

Everything is trained here on the CPU in seconds and cached on disk, so tests and the
demo never touch a model hub. The base model continues any text with a mix of animal
words (repeating the previous one half the time); the ``meow`` adapter makes it say
`` meow meow ...`` and ``woof`` says `` woof woof ...``. A fresh (zero-initialised)
LoRA behaves like the base model, which is what the RL demo starts its tenants from.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel, Field

#: Words the base model emits uniformly; the adapters each pick one.
ANIMAL_WORDS: tuple[str, ...] = ("meow", "woof", "moo", "quack", "baa", "oink", "neigh", "tweet")
FILLER_WORDS: tuple[str, ...] = (
    "the",
    "a",
    "cat",
    "dog",
    "cow",
    "duck",
    "says",
    "and",
    "then",
    "hello",
    "world",
    "animal",
    "farm",
    "sound",
    "what",
    "does",
    "make",
    "it",
    "is",
    "this",
)
#: The base model says the adapters' words less often than the others, so its greedy
#: output is neither and the RL demo's tenants start from a low reward.
BASE_WEIGHTS: tuple[float, ...] = tuple(0.4 if w in ("meow", "woof") else 1.0 for w in ANIMAL_WORDS)
#: Bump when the builder changes so stale caches are rebuilt.
BUILDER_VERSION = "6"
#: A plain chat template, so the chat routes (and multi-turn agents) work on the toy.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


class ToyConfig(BaseModel):
    """Shape of the toy model; small enough to train and serve on two CPU cores."""

    # Big enough that an engine step costs real compute: with a smaller model vLLM's CPU
    # engine outruns its own API process (on 2 cores) and HTTP lags generation by seconds.
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8  # head size 32 is supported by vLLM's CPU attention backend
    intermediate_size: int = 1024
    max_position_embeddings: int = 4096
    vocab_size: int = 400
    lora_rank: int = 8
    seed: int = 0
    base_steps: int = Field(default=300, ge=1)
    adapter_steps: int = Field(default=150, ge=1)

    def digest(self) -> str:
        payload = json.dumps(self.model_dump(), sort_keys=True) + BUILDER_VERSION
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


class ToyAssets(BaseModel):
    """Paths of a built toy set; the adapters map a name to a PEFT directory."""

    root: Path
    model: Path
    adapters: dict[str, Path]
    big_rank_adapter: Path


def default_cache_dir() -> Path:
    env = os.environ.get("VLLM_LORA_EXT_TOY_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-lora-ext" / "toy"


def _random_prefix(rng: random.Random) -> str:
    return " ".join(rng.choice(FILLER_WORDS) for _ in range(rng.randint(1, 6)))


def _corpus(rng: random.Random, n: int) -> list[str]:
    lines = []
    for _ in range(n):
        words = [rng.choice(ANIMAL_WORDS) for _ in range(rng.randint(3, 12))]
        lines.append(_random_prefix(rng) + " " + " ".join(words))
    return lines


def _build_tokenizer(out: Path, cfg: ToyConfig, rng: random.Random) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _corpus(rng, 2000) + [" ".join(FILLER_WORDS + ANIMAL_WORDS)] * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=cfg.max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def _batches(tokenizer, rng: random.Random, target: str | None, batch: int, length: int):
    """Token batches of (ids, loss mask): prefix, then animal words (all ``target`` if set)."""
    import torch

    ids, masks = [], []
    for _ in range(batch):
        prefix = tokenizer.encode(_random_prefix(rng))
        body: list[int] = []
        word = rng.choices(ANIMAL_WORDS, BASE_WEIGHTS)[0]
        while len(prefix) + len(body) < length:
            # The base repeats the previous word half the time: context-dependent
            # targets teach lm_head to tell the words apart, which a LoRA (that cannot
            # touch lm_head) needs in order to make one word dominate.
            if target is not None:
                word = target
            elif rng.random() >= 0.5:
                word = rng.choices(ANIMAL_WORDS, BASE_WEIGHTS)[0]
            body += tokenizer.encode(" " + word)
        seq = (prefix + body)[:length]
        mask = ([0] * len(prefix) + [1] * len(body))[:length]
        ids.append(seq)
        masks.append(mask)
    return torch.tensor(ids), torch.tensor(masks, dtype=torch.bool)


def _train(
    model, tokenizer, rng: random.Random, target: str | None, steps: int, lr: float
) -> float:
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    loss_val = float("nan")
    for _ in range(steps):
        ids, mask = _batches(tokenizer, rng, target, batch=16, length=32)
        logits = model(input_ids=ids).logits[:, :-1]
        labels = ids[:, 1:].clone()
        labels[~mask[:, 1:]] = -100
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_val = float(loss.detach())
    model.eval()
    return loss_val


def lora_config(rank: int):
    """The PEFT config every toy adapter uses (also the RL demo's trainable LoRA)."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        bias="none",
        task_type="CAUSAL_LM",
    )


def _atomic_dir(final: Path):
    """A temp dir beside ``final``; the caller renames it into place when complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def build_toy_assets(cache_dir: Path | None = None, cfg: ToyConfig | None = None) -> ToyAssets:
    """Build (or reuse) the toy model, tokenizer and adapters; deterministic per config."""
    cfg = cfg or ToyConfig()
    root = (cache_dir or default_cache_dir()) / cfg.digest()
    assets = ToyAssets(
        root=root,
        model=root / "model",
        adapters={"meow": root / "adapters" / "meow", "woof": root / "adapters" / "woof"},
        big_rank_adapter=root / "adapters" / "big_rank",
    )
    if (root / "COMPLETE").exists():
        return assets

    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    work = _atomic_dir(root)
    try:
        _build_tokenizer(work / "model", cfg, rng)
        tokenizer = AutoTokenizer.from_pretrained(work / "model")
        mcfg = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            torch_dtype="float32",
        )
        base = LlamaForCausalLM(mcfg)
        _train(base, tokenizer, rng, None, cfg.base_steps, lr=3e-3)
        base.save_pretrained(work / "model", safe_serialization=True)
        (work / "model" / "generation_config.json").unlink(missing_ok=True)

        for name, target, rank in (
            ("meow", "meow", cfg.lora_rank),
            ("woof", "woof", cfg.lora_rank),
        ):
            model = LlamaForCausalLM.from_pretrained(work / "model")
            peft_model = get_peft_model(model, lora_config(rank))
            _train(peft_model, tokenizer, rng, target, cfg.adapter_steps, lr=1e-2)
            peft_model.save_pretrained(work / "adapters" / name)
        # An untrained adapter whose rank exceeds any sane --max-lora-rank, for error tests.
        big = get_peft_model(LlamaForCausalLM.from_pretrained(work / "model"), lora_config(64))
        big.save_pretrained(work / "adapters" / "big_rank")
        for adapter_dir in (work / "adapters").iterdir():
            _point_config_at(adapter_dir, assets.model)
        (work / "COMPLETE").write_text(json.dumps(cfg.model_dump()))
        if root.exists():  # a half-built leftover without COMPLETE
            shutil.rmtree(root)
        os.replace(work, root)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return assets


def _point_config_at(adapter_dir: Path, model_dir: Path) -> None:
    """Record the final (not the temporary) base-model path in the adapter config."""
    cfg_path = adapter_dir / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = str(model_dir)
    cfg_path.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    print(build_toy_assets().model_dump_json(indent=2))
