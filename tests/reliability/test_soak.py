"""Scenario 8, the CI variant: the soak benchmark for 60 seconds must stay flat and lossless.

The 10-minute run is `python -m bench.soak` (docs/reliability.md); this test runs
the same command for 60 s (RELIABILITY_SOAK_SECONDS overrides) in a child process
and asserts the outcomes it writes as JSON, not timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.procs import ROOT

SECONDS = float(os.environ.get("RELIABILITY_SOAK_SECONDS", "60"))


@pytest.mark.timeout(SECONDS + 150)
def test_soak_with_churn_stays_flat_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--seconds", str(SECONDS), "--clients", "200",
         "--rate", "50", "--churn", "5", "--json", str(out), "--workdir", str(tmp_path / "run"),
         "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 140,
    )
    print("\n" + run.stdout)
    assert out.exists(), f"the soak wrote no result (exit {run.returncode}): {run.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert result["published"] > SECONDS * 40
    assert (result["lost"], result["duplicated"], result["out_of_order"]) == (0, 0, 0)
    assert result["reconnects"] >= result["drops"] * 0.9  # dropped clients came back
    assert result["log_problems"] == []
    warm, end, gone, base = (result["after_warmup"], result["end_loaded"],
                             result["after_clients_left"], result["baseline"])
    # Flat under steady load: no growth after warm-up beyond noise.
    assert end["rss_mb"] - warm["rss_mb"] < 15, (warm, end)
    assert end["tasks"] <= warm["tasks"] * 1.15 + 10, (warm, end)
    # Everything a client held is released when the clients leave.
    assert gone["tasks"] <= base["tasks"] + 1, (
        f"{gone['tasks']} tasks left (baseline {base['tasks']}): "
        f"{result['task_kinds_after'][:3]}; waiting in {result['task_chains_after'][:2]}")
    assert gone["fds"] - gone["redis_fds"] <= base["fds"] - base["redis_fds"], (base, gone)
