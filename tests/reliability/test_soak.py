"""Scenario 8, the CI variant: `bench/soak.py` for 60 seconds must stay flat and lossless.

The 10-minute run is `python -m bench.soak` (docs/reliability.md); this test runs
the same code for 60 s (RELIABILITY_SOAK_SECONDS overrides) and asserts the
outcomes, not timings.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.soak import soak

SECONDS = float(os.environ.get("RELIABILITY_SOAK_SECONDS", "60"))


@pytest.mark.timeout(SECONDS + 150)
async def test_soak_with_churn_stays_flat_and_loses_nothing(tmp_path: Path) -> None:
    result = await soak(seconds=SECONDS, clients=200, rate=50, churn=5, workdir=tmp_path,
                        verbose=False)
    print("\n" + result.summary())
    assert result.published > SECONDS * 40
    assert (result.lost, result.duplicated, result.out_of_order) == (0, 0, 0)
    assert result.reconnects >= result.drops * 0.9  # dropped clients came back
    assert result.log_problems == []
    warm, end, gone, base = (result.after_warmup, result.end_loaded,
                             result.after_clients_left, result.baseline)
    # Flat under steady load: no growth after warm-up beyond noise.
    assert end["rss_mb"] - warm["rss_mb"] < 15, (warm, end)
    assert end["tasks"] <= warm["tasks"] * 1.15 + 10, (warm, end)
    # Everything a client held is released when the clients leave.
    assert gone["tasks"] <= base["tasks"] + 1, (
        f"{gone['tasks']} tasks left (baseline {base['tasks']}): "
        f"{result.task_kinds_after[:3]}; waiting in {result.task_chains_after[:2]}")
    assert gone["fds"] - gone["redis_fds"] <= base["fds"] - base["redis_fds"], (base, gone)
