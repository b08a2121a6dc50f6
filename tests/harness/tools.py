"""System tools a test needs (redis-server, nginx, Chromium, curl): found, or a loud miss.

Outside CI a missing tool skips the test with a message that says so; with
CI=true it fails, so a CI run can never count a skipped test as passing.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def missing(reason: str) -> NoReturn:
    """Stop this test because something it needs is absent: skip loudly, or fail in CI."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(f"SKIPPED LOUDLY: {reason}")


def find_tool(name: str) -> str | None:
    """`name` on PATH, else Debian's /usr/sbin/<name> (not on a normal user's PATH)."""
    path = shutil.which(name)
    if path:
        return path
    candidate = f"/usr/sbin/{name}"
    return candidate if os.access(candidate, os.X_OK) else None


def require_tool(name: str, why: str) -> str:
    """The path of a system tool, or `missing()`."""
    path = find_tool(name)
    if path is None:
        missing(f"{name} is not installed: {why} (the README test command installs it)")
    return path
