"""The open-file limit at start: raised to the hard limit, checked against the cap.

Every connection is an open file. A process past its RLIMIT_NOFILE soft limit
cannot accept(): the event loop logs EMFILE and stops accepting for a second at a
time, and Redis reconnects fail the same way. Most systems start a shell at 1,024
soft with a far higher hard limit, so `dualcast serve` raises the soft limit to the
hard one, as servers usually do (workers inherit it). Unset, the per-process cap
(DUALCAST_MAX_CONNECTIONS) follows that limit, so a process refuses with a clean 503
before accept() could fail; set, it is checked against the limit at start and a
cap the limit cannot hold is one WARNING line.
"""

from __future__ import annotations

import logging
import resource

from dualcast.config import Settings

log = logging.getLogger("dualcast.serve")

#: Files a process holds besides its connections: stdio, the listening socket, the
#: event loop's own descriptors, Redis connections, log files. An idle worker on the
#: Redis engine holds 20-30; the rest is headroom for publishes and JWKS fetches.
RESERVE = 100

#: Below this many connections per process, an unset cap is worth a WARNING (a shell's
#: usual 1,024 soft limit with no higher hard limit to raise it to).
LOW = 4_000

#: The soft limit to ask for when the hard one is unlimited (Linux's fs.nr_open default).
UNLIMITED_TARGET = 1 << 20


def raise_soft_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (logged); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        log.debug("open-file limit %s (already the hard limit)", _shown(soft))
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.info("open-file limit %d: could not raise it to %s: %s", soft, _shown(hard), exc)
        return soft
    log.info("open-file limit raised from %d to %d (the hard limit), for every worker",
             soft, target)
    return target


def process_cap(configured: int | None) -> int:
    """The connection cap of this process: as configured, else what its open files allow."""
    if configured is not None:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(1, soft - RESERVE)


def check_file_limit(settings: Settings) -> int:
    """Raise the limit, then say what it allows: a WARNING if it is below a configured
    cap, or too low to be useful; the soft limit."""
    soft = raise_soft_limit()
    cap = settings.max_connections
    if soft == resource.RLIM_INFINITY:
        return soft
    room = max(1, soft - RESERVE)  # as `connection_cap`: 0 would read as "no cap"
    if cap is None:
        if room < LOW:
            log.warning(
                "open-file limit (RLIMIT_NOFILE) is %d per process: each process holds at "
                "most %d connections and refuses the rest with 503; raise it before "
                "starting (`ulimit -n 65536`, LimitNOFILE=65536 in a systemd unit, "
                "`--ulimit nofile=65536` for docker)", soft, room)
        else:
            log.info("each process holds at most %d connections (open-file limit %d; "
                     "DUALCAST_MAX_CONNECTIONS sets another cap)", room, soft)
    elif cap == 0 and room < LOW:
        # (no cap and a low limit: past it accept() fails with EMFILE instead of a 503; it
        # was an INFO line, though it is the failure the unset cap's WARNING is about)
        log.warning(
            "open-file limit (RLIMIT_NOFILE) is %d per process and DUALCAST_MAX_CONNECTIONS=0 "
            "sets no cap: past about %d connections accept() fails; raise it before starting "
            "(`ulimit -n 65536`, LimitNOFILE=65536 in a systemd unit, `--ulimit nofile=65536` "
            "for docker) or unset DUALCAST_MAX_CONNECTIONS", soft, room)
    elif cap == 0:
        log.info("no connection cap (DUALCAST_MAX_CONNECTIONS=0): each process holds at most "
                 "about %d connections (open-file limit %d)", room, soft)
    elif soft < cap + RESERVE:
        need = cap + RESERVE
        log.warning(
            "open-file limit (RLIMIT_NOFILE) is %d per process, below the %d that "
            "DUALCAST_MAX_CONNECTIONS=%d needs in each process: past about %d connections "
            "accept() fails; raise it before starting (`ulimit -n %d`, LimitNOFILE=%d in a "
            "systemd unit, `--ulimit nofile=%d` for docker) or lower DUALCAST_MAX_CONNECTIONS",
            soft, need, cap, room, need, need, need,
        )
    return soft


def _shown(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)
