"""The README's first command stays true: the demo runs end to end and exits 0."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_reports_all_checks_ok(toy):
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_lora_ext", "demo", "--max-tokens", "1000"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "FAILED" not in proc.stdout
    assert proc.stdout.count(" ok ") == 4, proc.stdout
