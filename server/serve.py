"""Serving dualcast with uvicorn: one process or N workers, the same way.

What `dualcast serve` does, in order: bind the address (a port in use is one
clear line, before anything else happens), then run `DualcastServer` in this
process on that socket, or in N worker processes, each listening on a socket of
its own bound to the same address with SO_REUSEPORT. Each worker
receives the very `Settings` object the command built (flags and environment
alike) and builds its own app from it, so a flag reaches every worker exactly
as the environment variable would. On SIGTERM each server drains its own
subscribers (WS 1001, SSE with a jittered `retry:`) before uvicorn closes what
is left; nothing of uvicorn's is replaced at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import resource_tracker
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from dualcast.config import Settings
from dualcast.fdlimit import check_file_limit, process_cap
from dualcast.logs import logging_config, redact_url
from dualcast.spares import FirstWorker, crowd, open_files
from dualcast.upgrade import HTTP_PROTOCOL
from dualcast.ws_protocol import WebSocketProtocol

if TYPE_CHECKING:
    from dualcast.runtime import Runtime

log = logging.getLogger("dualcast.serve")


class ListenError(Exception):
    """The address cannot be bound; the message is one line naming the address, `errno`
    the bind's own error number."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def _shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _url(host: str, port: int) -> str:
    return f"http://{_shown(host, port)}"


def _address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    """The family and address to bind `host` with: IPv4 for a name with an IPv4 address
    (`localhost` stays 127.0.0.1, as before), IPv6 for an IPv6 address and for a name
    that has only IPv6 ones. A name such as Debian's `ip6-localhost` (::1 alone) was
    looked up as IPv4 only and refused as "not a name or address of this machine"."""
    if ":" in host:
        return socket.AF_INET6, (host, port)
    try:
        socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror:
        try:
            found = socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_STREAM)
        except socket.gaierror:
            found = []
        if found:
            return socket.AF_INET6, found[0][4]
    return socket.AF_INET, (host, port)  # (a name that resolves to nothing: bind says so)


def _socket(family: socket.AddressFamily) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def bind(host: str, port: int, workers: int = 1) -> socket.socket:
    """The address, bound here (a failure is ours to word, not uvicorn's exit from deep
    inside its start-up, and port 0 becomes the concrete port every worker binds).

    One process listens on this socket itself. With several workers this process never
    calls listen() on it: a socket that does not listen is in no SO_REUSEPORT group,
    so the kernel hands it no connection; it only holds the port for the workers'
    sockets (`worker_socket`), which may join it because it carries SO_REUSEPORT too.
    That flag is set after the bind, not before: bound without it, the bind still
    fails on a port some other server listens on, even one of ours with SO_REUSEPORT
    (which would otherwise be joined silently, half of each server's connects going
    to the other). Only sockets of the same effective UID may join a SO_REUSEPORT
    group, so another user cannot take a share of our connects this way.
    """
    family, address = _address(host, port)
    sock = _socket(family)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        why = (exc.strerror or str(exc)).lower()
        raise ListenError(f"cannot listen on {_shown(host, port)}: {why}", exc.errno) from None
    if workers > 1:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def worker_socket(host: str, port: int) -> socket.socket:
    """A worker's own listening socket (uvicorn calls listen() once the app started).

    Each worker listens on its own socket, bound with SO_REUSEPORT beside the parent's,
    so the kernel hashes each connect to exactly one worker's accept queue. With one
    socket shared by all, the workers' event loops raced for each connect: the spread
    was uneven, and a replacement worker took none of 40 new streams while the other
    was awake. Busiest/quietest of six workers over 30,000 connects: 1.15-1.35 shared
    (19,900 vs 12,051 in a 100,000 ramp), 1.01-1.04 with a socket each. Its CPU
    depends on the machine: on a busy one (other work outside the benchmark) it was
    slower in every run (30,000 clients: 407 vs 442 us of server CPU per connect); on
    a quiet one it won both interleaved pairs at 100,000 (326 / 284 against 400 / 290
    us per connect, 4,602 / 5,343 against 3,756 / 5,200 connects/s, `python -m bench
    fleet --clients 100000`). A worker that exits takes its socket with it, so connects then go
    to the others; connects still queued in its accept queue are reset by the kernel
    and the client retries (an EventSource does by itself, our clients too).
    """
    family, address = _address(host, port)
    sock = _socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


#: The longest the supervisor waits for woken spares to listen before worker 0 sheds.
SHED_WAIT = 5.0
#: Over how long worker 0 sends away the share of its subscribers it sheds.
SHED_SPREAD = 2.0


#: The least time uvicorn is given to close the connections its shutdown asked to close.
CLOSE_FLOOR = 0.5


def close_timeout(grace: float) -> float:
    """uvicorn's wait for connections to close after our drain: the fifth of the grace
    the drain (0.8 of it) leaves, at least `CLOSE_FLOOR`. It was the whole grace again,
    so one client that reads nothing (it cannot be sent its close) held the stop to 1.8
    times the grace: past a service manager's stop timeout set from the documented
    grace, and killed there. asyncio.wait_for with a timeout of 0 cancels even a wait
    that would end in the next loop iteration, so a grace of 0 (close everyone at once)
    still lets connections already told to close finish; only one that does not is
    cut off, and that ERROR is then deserved."""
    return max(grace * 0.2, CLOSE_FLOOR)


def stop_bound(grace: float) -> float:
    """The longest a server takes to stop on SIGTERM: the drain waits up to 0.8 of the
    grace for its subscribers to go (`Runtime.drain`), then uvicorn waits up to
    `close_timeout` for connections that still have not closed: the grace in all (under
    a grace of 2.5 s, up to half a second more). The supervisor waits this plus 5 s."""
    return max(grace * 0.8, 0.1) + close_timeout(grace)


def uvicorn_config(settings: Settings, app: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host, port=settings.port, workers=settings.workers,
        log_level=settings.log_level, log_config=logging_config(settings.log_level),
        http=HTTP_PROTOCOL,  # uvicorn's httptools protocol, a plain WS upgrade parsed once
        ws=WebSocketProtocol,  # uvicorn's default, with refused handshakes answered
        ws_max_size=settings.max_frame_bytes,
        # Per-message deflate took memory per connection from 41 KB to 139 KB and CPU
        # per delivery up ~40 % in the fan-out bench: off.
        ws_per_message_deflate=False,
        ws_ping_interval=settings.ping_interval, ws_ping_timeout=settings.ping_interval,
        # uvicorn hands this to asyncio.wait_for, which takes a float (its annotation
        # says int): int() cut 3.9 s to 3, and 0 (from 0 or 0.5) timed out at once,
        # logging "ERROR: Cancel 0 running task(s)" on every clean stop.
        timeout_graceful_shutdown=close_timeout(settings.shutdown_grace),  # type: ignore[arg-type]
        access_log=False, proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        lifespan="on",
    )


def _built_by_the_server() -> None:
    raise RuntimeError("DualcastServer builds its app in the process that serves it")


class DualcastServer(uvicorn.Server):
    """uvicorn's server for one dualcast app, built in the process that runs it.

    Picklable (settings and uvicorn's config only) so a worker process can be given
    one; the app, its runtime and its tasks are made in `run`, inside the worker.
    On shutdown it first drains the subscribers, which uvicorn alone would close
    with 1012 all at once.
    """

    #: Seconds between two looks of the main loop (uvicorn's own: 0.1 s).
    TICK = 1.0

    def __init__(self, settings: Settings,
                 on_listening: Callable[[], None] | None = None) -> None:
        self._wake: Callable[[], None] | None = None
        super().__init__(uvicorn_config(settings, _built_by_the_server))
        self.settings = settings
        self.on_listening = on_listening
        self.runtime: Runtime | None = None
        self.hangup = False  # SIGHUP asked this server to stop (see capture_signals)
        #: the worker's slot under `--workers N` (its metrics carry it), None alone
        self.worker: int | None = None
        #: the supervisor's process id under `--workers N`, None alone
        self.supervisor: int | None = None

    @property  # type: ignore[override]
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        """Set by a signal (uvicorn's handler), the supervisor or a test: it also wakes
        the main loop, so a stop begins at once although the loop looks once a second."""
        self._should_exit = value
        if value and self._wake is not None:
            self._wake()

    async def main_loop(self) -> None:
        """uvicorn's main loop (refresh the Date header, look at `should_exit`), once a
        second instead of ten times.

        Why: a process woken from idle runs its code from cold caches, so on this
        2-core VM each wake-up costs far more than its work (a bare timer wake-up
        50-70 µs of CPU; the consumer's work per event 11 µs warm and ~180 µs 10 ms
        after the last one). Ten ticks a second were most of an idle worker's CPU: a
        worker with no client and no event, server CPU from /proc over 20 s, two runs
        each: 2.0 -> 0.5 ms of CPU a second; at 100 events/s that is ~15 µs per event
        in every worker. A stop still begins at once: setting `should_exit` wakes this
        loop (`_wake`).
        """
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(woken.set)

        self._wake = wake
        counter = 0
        should_exit = await self.on_tick(counter)
        try:
            while not should_exit:
                # uvicorn counts tenths of a second (the header is refreshed every 10th)
                counter = (counter + round(self.TICK * 10)) % 864000
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.TICK):
                        await woken.wait()
                woken.clear()
                should_exit = await self.on_tick(counter)
        finally:
            self._wake = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, with SIGHUP taken as SIGTERM: uvicorn handles only SIGINT and
        SIGTERM, so a hangup (the terminal or SSH session that started it closing, a
        `kill -HUP` meant as a reload) ended the process at once, every client cut off
        without a drain. dualcast reads its settings once, at start: there is nothing
        to reload, so a hangup stops it the way SIGTERM does. A SIGHUP ignored when
        the process started (`nohup`) stays ignored."""
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGHUP) is signal.SIG_IGN):
            with super().capture_signals():
                yield
            return

        def hangup(signum: int, frame: FrameType | None) -> None:
            self.hangup = True
            self.handle_exit(signal.SIGTERM, frame)

        previous = signal.signal(signal.SIGHUP, hangup)
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(signal.SIGHUP, previous)

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's tick, and a worker whose supervisor is gone stops (draining). Killed
        (SIGKILL, the OOM killer), the supervisor left its workers serving the port for
        good, unsupervised: none replaced when it died, none stopped, and a new `dualcast
        serve` on that port refused as "address in use"."""
        if (self.supervisor is not None and not self.should_exit
                and os.getppid() != self.supervisor):
            log.warning("worker %d: its supervisor (process %d) is gone; stopping",
                        os.getpid(), self.supervisor)
            self.should_exit = True
        return await super().on_tick(counter)

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        from dualcast.app import create_app  # the app's imports only where it is served

        try:
            app = create_app(self.settings)
        except Exception:
            log.exception("cannot build the app")
            sys.exit(STARTUP_FAILURE)
        self.runtime = app.state.dualcast
        if self.worker is not None:
            app.state.metrics.collector.worker = str(self.worker)
        self.config.app = app  # (no longer picklable: this process serves it)
        log.debug("process %d serving: %s engine, log level %s", os.getpid(),
                  self.settings.engine, self.settings.log_level)
        super().run(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # A worker starts with SIGINT blocked (Workers._start): a Ctrl-C of its first
        # moments waited until now, when uvicorn's handler is in place to take it.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        await super().startup(sockets)
        if self.worker is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.shed)
        if self.started and self.on_listening is not None:
            self.on_listening()

    def shed(self) -> None:
        """SIGUSR1 from the supervisor: the spares woke because this worker (0) was busy
        with connections it held alone; send away the share of them the others would
        hold (1 - 1/N). They reconnect through the kernel's even spread, so with two
        workers this one keeps about three quarters of them, the other a quarter: both
        cores in use, not an even split (that would mean sending every one away)."""
        if self.runtime is not None:
            self.runtime.shed(1 - 1 / self.settings.workers, SHED_SPREAD)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.hangup:
            log.info("SIGHUP: stopping as on SIGTERM (settings are read at start only)")
        for srv in self.servers:
            srv.close()
        # A proxy (nginx `keepalive`) keeps idle HTTP connections open and would
        # send new requests (WS upgrades, SSE) down them during the drain, to an
        # instance that is leaving. Close the idle ones now (a request in flight,
        # such as an SSE stream, only loses keep-alive); the proxy then retries
        # elsewhere. WebSockets are left to the drain (1001, spread over time).
        for connection in list(self.server_state.connections):
            if not isinstance(connection, WebSocketProtocol):
                connection.shutdown()
        if self.runtime is not None:
            # a second Ctrl-C (uvicorn's force_exit) cuts the drain short
            await self.runtime.drain(self.settings.shutdown_grace, lambda: self.force_exit)
        await super().shutdown(sockets)
        if self.force_exit:
            # uvicorn skips the app's shutdown then, and its lifespan task, cancelled when
            # the loop closed, logged a traceback; the app's own shutdown is quick.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_FLOOR * 4):
                    await self.lifespan.shutdown()


def _worker(server: DualcastServer, address: tuple[str, int], listening: Any,
            slot: int, wake: Any = None) -> None:
    """A worker process's entry point (spawned: nothing inherited but these arguments).

    `listening` (a shared int per slot) becomes nonzero (its open files) once this
    worker listens, which is how the parent knows to announce the server (its own
    socket never listens) and when woken spares are ready. Lockless values, not
    Events: a worker killed inside Event.set() would leave its lock taken and the
    parent blocked on it. `wake`, for a spare (see `dualcast.spares`), is the read end
    of a pipe: the worker neither listens nor reads the log until the supervisor writes
    to it, and leaves if the supervisor is gone (end of file)."""
    server.config.log_config = logging_config(server.settings.log_level, slot)
    server.config.configure_logging()
    # SIGUSR1 (shed, see DualcastServer.startup) before the handler is in place: nothing
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if wake is not None:
        # its imports done while asleep (0.2 s here): once woken it listens that much sooner
        import dualcast.app  # noqa: F401

        log.debug("worker %d: a spare, asleep until worker 0 is busy", os.getpid())
        try:
            wake.recv_bytes()
        except (EOFError, OSError):
            return  # the supervisor is gone or stopping, before this one was needed
        finally:
            wake.close()
    try:
        sock = worker_socket(*address)
    except OSError as exc:
        log.error("worker %d cannot listen on %s: %s", os.getpid(), _shown(*address),
                  (exc.strerror or str(exc)).lower())
        sys.exit(STARTUP_FAILURE)

    def announce() -> None:
        # its open files before its first connection (`FirstWorker.listening`); nonzero
        listening[slot] = max(1, open_files(os.getpid()) or 1)

    server.on_listening = announce
    server.worker = slot
    try:
        server.run([sock])
    except KeyboardInterrupt:  # the parent already asked us to stop
        pass


@dataclass
class _Slot:
    """One worker's place: its process, or the moment its replacement may start."""

    index: int = 0  # its place, 0..N-1, which its replacements keep
    process: Any = None
    started_at: float = 0.0
    quick_deaths: int = 0  # deaths in a row soon after starting
    restart_at: float = 0.0
    wake: Any = None  # a sleeping spare's wake-up pipe (its write end)


class Workers:
    """N worker processes, each on its own socket: started, kept alive, stopped by signal.

    Under DUALCAST_WORKERS_WAKE=busy (the default) all but the first are spares, asleep
    until the first is busy (`dualcast.spares`). A worker that dies is replaced (after
    a backoff growing to 30 s when it keeps dying soon after starting), unless it
    failed to start: a broken app or setting would fail the same way every time, so
    the whole server stops. SIGTERM or SIGINT here is passed on to every worker as
    SIGTERM, so each drains its own subscribers, and is waited for for the drain's
    grace plus a margin.
    """

    QUICK = 10.0  # a worker that dies sooner than this after starting backs off

    def __init__(self, server: DualcastServer, sock: socket.socket, count: int,
                 on_listening: Callable[[], None] | None = None) -> None:
        self.server = server
        server.supervisor = os.getpid()  # (each worker is given a copy of `server`)
        self.sock = sock
        self.count = count
        self.on_listening = on_listening
        self.stop = threading.Event()
        self.failed = False
        self.signalled: int | None = None
        self._spawn = multiprocessing.get_context("spawn")
        # nonzero once that slot's worker listens: its open files then
        self.listening = self._spawn.RawArray("i", count)
        self.slots = [_Slot(index) for index in range(count)]
        settings = server.settings
        self.first = FirstWorker(crowd(process_cap(settings.max_connections), count))
        self.awake = settings.workers_wake == "start"
        self.shed_at: float | None = None  # when to ask worker 0 to shed at the latest
        if not self.awake and not self.first.readable():
            log.info("no /proc to watch worker 0's load in: all %d workers serve from the "
                     "start", count)
            self.awake = True

    def _start(self, slot: _Slot) -> None:
        host, port = self.sock.getsockname()[:2]
        wake = None
        if slot.index and not self.awake:
            wake, slot.wake = self._spawn.Pipe(duplex=False)
        slot.process = self._spawn.Process(target=_worker, name="dualcast-worker",
                                           args=(self.server, (host, port), self.listening,
                                                 slot.index, wake))
        # Started with SIGINT blocked (the mask is kept across the exec; the worker lifts
        # it once uvicorn handles signals, in DualcastServer.startup): a Ctrl-C, which
        # the terminal sends to the whole group, reached a worker still importing or
        # building its app as a KeyboardInterrupt traceback. Here a SIGINT of those
        # moments waits, and is handled when the mask is restored.
        # (multiprocessing's resource tracker, started with the first worker, lifts a
        # SIGINT block of its own when it starts: started before ours is put in place)
        resource_tracker.ensure_running()
        masked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            slot.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, masked)
            if wake is not None:
                wake.close()  # (the worker holds its own copy)
        slot.started_at = time.monotonic()
        if slot.index == 0:
            self.first.follow(slot.process.pid)

    def _look_at_the_first(self) -> None:
        """Wake the spares if worker 0 is busy; if busy with the connections it holds
        (its CPU, not their number), have it send some of them to the others."""
        crowded = self.first.crowded()
        if crowded is not None:
            self._wake_spares(f"worker 0 is busy: {crowded}")
            return
        busy = self.first.busy(time.monotonic())
        if busy is not None:
            self._wake_spares(f"worker 0 is busy: {busy}")
            self.shed_at = time.monotonic() + SHED_WAIT

    def _shed_when_ready(self) -> None:
        """Once every woken spare listens (or `SHED_WAIT` has passed), ask worker 0 to
        shed: before, the connections it sends away would all come back to it."""
        assert self.shed_at is not None
        first = self.slots[0].process
        if not all(self.listening) and time.monotonic() < self.shed_at:
            return
        self.shed_at = None
        if first is not None and first.is_alive() and first.pid is not None:
            os.kill(first.pid, signal.SIGUSR1)

    def _wake_spares(self, why: str) -> None:
        """Every spare serves from now on (they stay awake: see `dualcast.spares`)."""
        self.awake = True
        spares = [slot for slot in self.slots if slot.wake is not None]
        if spares:
            log.info("%s: worker%s %s now serve%s too", why, "s" if len(spares) > 1 else "",
                     ", ".join(str(slot.index) for slot in spares),
                     "" if len(spares) > 1 else "s")
        for slot in spares:
            with contextlib.suppress(OSError):  # (it died meanwhile: it is replaced awake)
                slot.wake.send_bytes(b"w")
            slot.wake.close()
            slot.wake = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = signum
        self.stop.set()

    def run(self) -> int:
        # SIGHUP too: left to its default, a hangup ended this process alone, at once,
        # and its workers served on unsupervised (none replaced, none stopped). Unless
        # it was ignored from the start (`nohup`): then it stays ignored, here and in
        # the workers, which inherit that.
        hangup = signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN
        for sig in (signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hangup else [])):
            signal.signal(sig, self._on_signal)
        log.info("starting %d workers (parent process %d)%s", self.count, os.getpid(),
                 "" if self.awake else
                 f"; workers 1-{self.count - 1} wait until worker 0 is busy"
                 if self.count > 2 else "; worker 1 waits until worker 0 is busy")
        for slot in self.slots:
            self._start(slot)
        announced = False
        while not self.stop.wait(0.2):
            if not announced and any(self.listening):
                announced = True
                self.first.listening(self.listening[0])
                if self.on_listening is not None:
                    self.on_listening()
            if announced and not self.awake:
                self._look_at_the_first()
            if self.shed_at is not None:
                self._shed_when_ready()
            self._replace_dead()
        if self.signalled is not None:
            log.info("%s: stopping %d workers (draining up to %gs)",
                     signal.Signals(self.signalled).name, self.count,
                     self.server.settings.shutdown_grace)
        self._stop_all()
        return 1 if self.failed else 0

    def _replace_dead(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            process = slot.process
            if process is None:
                if now >= slot.restart_at:
                    self._start(slot)
                continue
            if process.is_alive():
                continue
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                log.error("worker %d failed to start; stopping", process.pid)
                self.failed = True
                self.stop.set()
                return
            if not self.awake:
                self._wake_spares(f"worker {slot.index} died")
            slot.quick_deaths = slot.quick_deaths + 1 if now - slot.started_at < self.QUICK else 0
            delay = min(30.0, 0.5 * 2 ** (slot.quick_deaths - 1)) if slot.quick_deaths else 0.0
            log.warning("worker %d died (exit code %s); starting another in %.1fs",
                        process.pid, process.exitcode, delay)
            slot.process, slot.restart_at = None, now + delay

    def _stop_all(self) -> None:
        # Not listening, this socket takes no connects; closed first all the same, so
        # the port is free as soon as the last worker has gone.
        self.sock.close()
        for slot in self.slots:
            if slot.wake is not None:
                slot.wake.close()  # a spare still asleep reads the end of its pipe and leaves
                slot.wake = None
        running = [slot.process for slot in self.slots if slot.process is not None]
        for process in running:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        wait = stop_bound(self.server.settings.shutdown_grace) + 5.0
        for process in running:
            process.join(wait)
            if process.is_alive():
                log.error("worker %d did not stop within %.0fs; killing it", process.pid, wait)
                process.kill()
                process.join(5)


def _engine(settings: Settings) -> str:
    """The engine for the start-up line, and for Redis which one and which stream key
    (password masked): "redis engine" alone left an operator with several Redis servers
    or keys to guess which this instance reads."""
    if settings.redis_url is None:
        return "memory engine"
    return (f"redis engine at {redact_url(settings.redis_url)}, "
            f"stream {settings.stream!r}")


def serve(settings: Settings, on_listening: Callable[[str], None] | None = None) -> int:
    """Run dualcast until a signal stops it; the exit status. `on_listening(url)` is
    called once the server accepts connections (never if it cannot)."""
    sock = bind(settings.host, settings.port, settings.workers)  # raises ListenError
    bound, port = sock.getsockname()[:2]
    # the link a person opens on this machine; the log says what was bound
    host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = _url(host, port)

    def announce() -> None:
        if on_listening is not None:
            on_listening(url)

    server = DualcastServer(settings, None if settings.workers > 1 else announce)
    # (uvicorn's config has set up logging by now, in this process)
    log.info("dualcast on %s: %s, %d worker%s", _url(bound, port), _engine(settings),
             settings.workers, "s" if settings.workers > 1 else "")
    check_file_limit(settings)  # before any worker starts: they inherit the raised limit
    if settings.static_dir and not os.path.isfile(os.path.join(settings.static_dir, "index.html")):
        # (the admin link below would open a 404 without a word on why)
        log.warning("DUALCAST_STATIC_DIR %s holds no index.html: the dashboard at / answers "
                    "404 (unset it for the bundled dashboard)", settings.static_dir)
    if settings.workers > 1:
        return Workers(server, sock, settings.workers, announce).run()
    try:
        server.run([sock])
    except KeyboardInterrupt:
        if not server.started:
            raise  # Ctrl-C before it listened: the command's exit for an interrupt, not 3
    return 0 if server.started else STARTUP_FAILURE
