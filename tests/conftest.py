"""Shared test modules (``tests/shared``) are importable from unit and engine tests;
Ray started by a test stays on loopback (by default it listens on every interface and
advertises the machine's external address)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

sys.path.insert(0, str(Path(__file__).parent / "shared"))
