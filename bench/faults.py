"""The long run of seeded random faults: instances killed and drained, Redis killed and
paused, instances restarted while Redis is away; clients of every transport behind nginx.

    .venv/bin/python -m bench.faults --faults 200                 # about 25 minutes
    .venv/bin/python -m bench.faults --faults 200 --seed 4242     # replay one run
    .venv/bin/python -m bench.faults --faults 30 --root /tmp/old  # another checkout's server/

The same scenario as tests/reliability/test_random_faults.py (the suite's short run),
in rounds of --per-round faults, each round on fresh processes with its own seed
drawn from --seed, so a failure names the one round to replay:
`--replay <round seed>` runs that round alone (same --per-round and --instances).
Bounded: --faults in all, and --max-minutes of wall time. Exits 1 if any round lost,
duplicated or reordered an event without a `reset`, or logged a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.harness.nginx import nginx_binary
from tests.harness.procs import Child, raise_nofile
from tests.reliability.random_faults import Outcome, Plan, run

SECRET = "faults-secret-0123456789abcdef-0123456789"


def bench_token() -> str:
    from dualcast.auth import mint_token

    return str(mint_token(SECRET, "chaos", ttl=24 * 3600))


async def main(args: argparse.Namespace) -> int:
    master = random.Random(args.seed)
    deadline = time.monotonic() + args.max_minutes * 60
    left = args.faults
    outcomes: list[Outcome] = []
    round_no = 0
    while left > 0 and time.monotonic() < deadline:
        round_seed = args.replay if args.replay is not None else master.randrange(1_000_000)
        round_no += 1
        count = min(args.per_round, left)
        left = 0 if args.replay is not None else left - count
        plan = Plan.draw(round_seed, count, args.instances)
        tmp = Path(tempfile.mkdtemp(prefix="bench-faults-"))
        outcome = await run(tmp, plan, token=bench_token(), secret=SECRET,
                            instances=args.instances, per_transport=args.clients,
                            rate=args.rate, root=args.root)
        if outcome.problems:
            print(f"logs of the failed round kept in {tmp} (nginx/logs, dc*/, redis/)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        outcomes.append(outcome)
        verdict = "held" if not outcome.problems else "FAILED"
        print(f"round {round_no}: {verdict}: {outcome.summary()}", flush=True)
        if outcome.problems:
            print(outcome.report(), flush=True)
    failed = [o for o in outcomes if o.problems]
    done = sum(len(o.done) for o in outcomes)
    print(f"\n{done} faults in {len(outcomes)} rounds (master seed {args.seed}), "
          f"{sum(o.events for o in outcomes)} events, "
          f"{sum(o.reconnects for o in outcomes)} reconnects, "
          f"{sum(o.resets for o in outcomes)} resets; "
          f"{len(failed)} rounds failed"
          + (f": seeds {[o.plan.seed for o in failed]}" if failed else ""))
    return 1 if failed else 0


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=200)
    parser.add_argument("--per-round", type=int, default=10,
                        help="faults per round; every round starts fresh processes")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 1_000_000)
    parser.add_argument("--replay", type=int, default=None, metavar="ROUND_SEED",
                        help="run the one round a failure named")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4, help="per transport")
    parser.add_argument("--rate", type=float, default=40, help="events/s from the producer")
    parser.add_argument("--max-minutes", type=float, default=60)
    parser.add_argument("--root", type=Path, default=None,
                        help="serve this checkout's server/ folder instead of ours")
    args = parser.parse_args()
    if nginx_binary() is None:
        sys.exit("nginx is not installed (apt-get install nginx)")
    raise_nofile()
    print(f"bench.faults: --seed {args.seed}, {args.faults} faults", flush=True)
    try:
        code = asyncio.run(main(args))
    finally:
        Child.stop_all()
    sys.exit(code)


if __name__ == "__main__":
    cli()
