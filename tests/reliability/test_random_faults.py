"""Seeded random faults behind nginx: nothing lost, nothing twice, or an explicit reset.

The short run of `tests.reliability.random_faults` (the long one is
`python -m bench.faults`). The seed comes from DUALCAST_FAULT_SEED, else from the
clock; it is printed at the start and named in every failure, so any run replays
with `DUALCAST_FAULT_SEED=<seed> pytest tests/reliability/test_random_faults.py`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import SECRET, token
from tests.harness.nginx import require_nginx
from tests.reliability.random_faults import SEED_ENV, FaultKind, Plan, check_resumed, run

FAULTS = 7  # every kind once, two more drawn freely: about a minute on a quiet machine


def seed_from_env() -> int:
    raw = os.environ.get(SEED_ENV, "").strip()
    return int(raw) if raw else int(time.time() * 1000) % 1_000_000


@pytest.mark.nginx
@pytest.mark.timeout(180)
async def test_random_faults_lose_nothing(tmp_path: Path) -> None:
    require_nginx()
    plan = Plan.draw(seed_from_env(), FAULTS, instances=3)
    print(f"\nrandom faults: {SEED_ENV}={plan.seed}: "
          + ", ".join(f.describe() for f in plan.faults))
    outcome = await run(tmp_path, plan, token=token("chaos"), secret=SECRET)
    print(outcome.report())
    assert outcome.problems == [], outcome.report()
    # The faults reached the clients and Redis, or the run proved nothing.
    assert outcome.reconnects > 0, outcome.report()
    assert outcome.producer_retries > 0, outcome.report()
    assert outcome.events > 100, outcome.report()


# The checker and the plan, on their own (no processes): each verdict can fail.
STREAM = [f"{n}-0" for n in range(1, 11)]


def test_the_check_accepts_every_event_once_in_order() -> None:
    assert check_resumed(STREAM, [], STREAM) is None


@pytest.mark.parametrize("seen", [
    STREAM[:4] + STREAM[5:],  # one lost
    STREAM[:5] + STREAM[4:],  # one twice
    [*STREAM[:3], STREAM[4], STREAM[3], *STREAM[5:]],  # out of order
    STREAM[:9],  # the tail never came
])
def test_the_check_refuses_loss_duplicates_disorder_and_a_short_tail(seen: list[str]) -> None:
    assert check_resumed(seen, [], STREAM) is not None


def test_a_reset_lets_the_client_continue_after_its_cursor() -> None:
    # Four events, a reset to 7-0 (3 events skipped, said out loud), then the rest.
    seen = STREAM[:4] + STREAM[7:]
    assert check_resumed(seen, [(4, "7-0")], STREAM) is None
    assert check_resumed(seen, [], STREAM) is not None  # the same gap without a reset
    assert check_resumed(STREAM[:4] + STREAM[8:], [(4, "7-0")], STREAM) is not None


def test_a_seed_replays_the_same_plan_and_covers_every_kind() -> None:
    a, b = Plan.draw(1234, FAULTS, 3), Plan.draw(1234, FAULTS, 3)
    assert a == b
    assert {f.kind for f in a.faults} == set(FaultKind)
    assert Plan.draw(1235, FAULTS, 3) != a
