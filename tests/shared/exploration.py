"""Hypothesis explores in CI too: a fresh seed every run, printed
(``LORA_EXT_HYPOTHESIS_SEED=N`` replays one); hypothesis' CI profile would derandomize
and explore nothing new."""

from __future__ import annotations

import os
import random

SEED = int(os.environ.get("LORA_EXT_HYPOTHESIS_SEED") or random.SystemRandom().randrange(2**32))


def examples(local: int, ci: int = 1000) -> int:
    return ci if os.environ.get("CI") else local


def announce() -> None:
    print(f"hypothesis seed {SEED} (replay: LORA_EXT_HYPOTHESIS_SEED={SEED})")
