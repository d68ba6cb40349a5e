"""The README's first command stays true: the RL demo runs end to end, loses nothing,
its rewards rise, and it says so in its exit code and its table."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_rl_loop_runs_and_rewards_rise(toy):
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_lora_ext", "demo", "--steps", "8", "--isolation-s", "2"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "all requests completed" in proc.stdout and "FAILED" not in proc.stdout
    rows = re.findall(r"│ (meow|woof)\s+│\s+([\d.]+)\s+│\s+([\d.]+)\s+│\s+(\d+)", proc.stdout)
    assert {r[0] for r in rows} == {"meow", "woof"}, proc.stdout
    for _, start, end, swaps in rows:
        assert float(end) > float(start) and int(swaps) == 8
