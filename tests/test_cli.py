"""The `dualcast` command as a whole: its version, and being stopped while it starts.

The CLI runs as a real subprocess, as a user would run it.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

from tests.harness.procs import ROOT, clean_env


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dualcast", *args], cwd=ROOT,
                          env=clean_env(env), capture_output=True, text=True, timeout=60)


def test_version_prints_the_installed_version() -> None:
    """`dualcast --version` (and `-V`) was "the following arguments are required"."""
    for flag in ("--version", "-V"):
        done = run(flag)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"dualcast {version('dualcast')}\n"
        assert done.stderr == ""
