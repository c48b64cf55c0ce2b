"""The randomized interleaving test of issue 10: seeded random sequences of lifecycle events
thrown at a supervised sdserve under load, with real processes, signals and sockets.

One sequence (:func:`run_sequence`):

- sdserve runs ``relapp`` (tests/apps/release.py) with 2 workers, a real TCP dependency
  check (``[checks.dep]``, ``type = "tcp"``, against a listener this test opens and closes),
  and a watchdog (``WATCHDOG_USEC``, as systemd would set it);
- clients load it the whole time and never retry: keep-alive clients, new-connection
  clients, and clients of slow requests (up to 1.5 s);
- a seeded random sequence of events, with random pauses (the pauses are the schedule
  being tested, not synchronisation): SIGHUP, SIGTERM (then a new instance, as systemd
  restarts it), ``kill -9`` of a random worker, a bad release swapped in and the good one
  back, the dependency down and up, and one worker's loop blocked past the watchdog;
- then the good release and the dependency are restored.

The invariants (:meth:`Sequence.check`):

- every request that failed was on a worker killed with SIGKILL or aborted by the
  watchdog: a keep-alive client knows its worker's PID from the previous answer; a request
  on a new connection must have failed between such a kill and just after that worker's
  exit;
- the worker count is back to 2 within :data:`RECOVERY_BOUND` after the last event;
- no worker process is left once the supervisor has exited (each one's pidfd says so), and
  none is a zombie;
- the notify messages of every instance are in a valid order: READY=1 first; each
  RELOADING=1 followed by READY=1 (or STOPPING=1); after STOPPING=1 only STATUS=;
- every exit status is truthful: 0, or 4 where a worker was killed as the stop began;
- the supervisor's fd count is the same at the end as at its start.

``make fuzz`` runs many more sequences than CI, and a failure names its seed:
``SDS_FUZZ_SEEDS=SEED make fuzz`` replays it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from sdserve.launcher import Instance, Launcher, LaunchError, NotifyMessage
from tests.apps.release import BAD_RELEASES
from tests.helpers import (
    HOST,
    Gate,
    ProtocolError,
    children,
    classify,
    process_state,
    read_response,
    request_bytes,
    wait_exit,
    write_app,
)

#: the events and how often each is drawn
EVENTS = {
    "hup": 5,
    "term": 2,
    "kill9": 3,
    "bad_release": 2,
    "good_release": 2,
    "dep_down": 2,
    "dep_up": 2,
    "block": 1,
}
#: pauses between events, seconds (0: the next event comes at once)
PAUSES = (0.0, 0.0, 0.05, 0.2, 0.5, 1.0, 2.0)
WORKERS = 2
#: the worker count must be back to WORKERS this long after the last event
RECOVERY_BOUND = 45.0
#: a request on a new connection that fails this long after a killed worker's exit is not
#: excused by that kill
KILL_SLACK = 1.0
BLOCK_SECONDS = 5.0


@dataclass
class Failure:
    at: float
    kind: str
    pid: int | None
    what: str


@dataclass
class Kill:
    """A worker killed with SIGKILL by the test, or aborted by the watchdog."""

    pid: int
    at: float
    exited: float | None = None

    def excuses(self, failure: Failure) -> bool:
        if failure.pid is not None:
            return failure.pid == self.pid
        end = (self.exited if self.exited is not None else time.monotonic()) + KILL_SLACK
        return self.at <= failure.at <= end


@dataclass
class Stats:
    ok: Counter[str] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    _progress: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def requests(self) -> int:
        return sum(self.ok.values()) + len(self.failures)

    def answered(self, kind: str) -> None:
        self.ok[kind] += 1
        self._progress.set()

    async def wait_ok(self, target: int, timeout: float = 60) -> None:
        """Until ``target`` requests in all have been answered (an event per answer)."""
        async with asyncio.timeout(timeout):
            while sum(self.ok.values()) < target:
                self._progress.clear()
                await self._progress.wait()


class Dependency:
    """A real TCP listener that the sdserve check connects to; down means refused."""

    def __init__(self) -> None:
        probe = socket.create_server((HOST, 0))
        self.port = int(probe.getsockname()[1])
        probe.close()
        self._server: asyncio.Server | None = None

    async def up(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, HOST, self.port)

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()


def pid_of(body: bytes) -> int | None:
    parts = body.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


async def _keepalive_client(port: int, stop: asyncio.Event, stats: Stats, path: str) -> None:
    while not stop.is_set() and len(stats.failures) < 500:
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError as exc:
            stats.failures.append(Failure(time.monotonic(), "keepalive", None, classify(exc)))
            continue
        pid: int | None = None
        try:
            while not stop.is_set():
                try:
                    async with asyncio.timeout(60):
                        writer.write(request_bytes(path))
                        response = await read_response(reader)
                except (OSError, ProtocolError, TimeoutError) as exc:
                    stats.failures.append(
                        Failure(time.monotonic(), "keepalive", pid, classify(exc))
                    )
                    break
                if response.status != 200:
                    stats.failures.append(
                        Failure(time.monotonic(), "keepalive", pid, f"status {response.status}")
                    )
                    break
                stats.answered("keepalive")
                pid = pid_of(response.body)
                if response.closes:
                    break
        finally:
            writer.close()


async def _fresh_client(port: int, stop: asyncio.Event, stats: Stats, path: str, kind: str) -> None:
    while not stop.is_set() and len(stats.failures) < 500:
        try:
            async with asyncio.timeout(60):
                reader, writer = await asyncio.open_connection(HOST, port)
                try:
                    writer.write(request_bytes(path, close=True))
                    response = await read_response(reader)
                finally:
                    writer.close()
        except (OSError, ProtocolError, TimeoutError) as exc:
            stats.failures.append(Failure(time.monotonic(), kind, None, classify(exc)))
            continue
        if response.status != 200:
            stats.failures.append(
                Failure(time.monotonic(), kind, None, f"status {response.status}")
            )
        else:
            stats.answered(kind)


@contextlib.asynccontextmanager
async def load(port: int, rng: random.Random) -> AsyncIterator[Stats]:
    """4 keep-alive clients, 3 new-connection clients, and a keep-alive and a new-connection
    client of slow requests; none retries."""
    stats = Stats()
    stop = asyncio.Event()
    slow = [f"/slow?ms={rng.randint(100, 1500)}" for _ in range(2)]
    clients = [_keepalive_client(port, stop, stats, "/") for _ in range(4)]
    clients += [_fresh_client(port, stop, stats, "/", "fresh") for _ in range(3)]
    clients += [_keepalive_client(port, stop, stats, slow[0])]
    clients += [_fresh_client(port, stop, stats, slow[1], "slow")]
    tasks = [asyncio.create_task(c) for c in clients]
    try:
        yield stats
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 90)


def notify_order_problems(messages: list[NotifyMessage]) -> list[str]:
    """What is out of order in one instance's notify messages (empty: all is well)."""
    problems = []
    state = "starting"
    for m in messages:
        keys = set(m.fields)
        if state == "stopped":
            if not keys <= {"STATUS"}:
                problems.append(f"after STOPPING=1: {dict(m.fields)}")
            continue
        if m.has("STOPPING", "1"):
            state = "stopped"
        elif m.has("READY", "1"):
            if state not in ("starting", "reloading"):
                problems.append(f"READY=1 while {state}")
            state = "running"
        elif m.has("RELOADING", "1"):
            if state != "running":
                problems.append(f"RELOADING=1 while {state}")
            state = "reloading"
    return problems


@dataclass
class Sequence:
    seed: int
    events: int
    workdir: Path
    listen_sock: socket.socket
    gate: Gate
    log: list[str] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)
    exit_codes: list[tuple[int, set[int]]] = field(default_factory=list)
    recovery: float = 0.0
    fds: tuple[int, int] = (0, 0)
    problems: list[str] = field(default_factory=list)
    port: int = 0
    stats: Stats = field(default_factory=Stats)
    messages: list[NotifyMessage] = field(default_factory=list)
    #: tasks that watch killed workers and blocked requests
    watchers: list[asyncio.Task[None]] = field(default_factory=list)
    #: what is on disk and in the dependency now
    broken_release: bool = False
    dep_down: bool = False
    blocking: bool = False
    fd_lists: list[list[str]] = field(default_factory=list)
    fd_note: str = ""

    def note(self, text: str) -> None:
        self.log.append(f"{time.monotonic():.3f} {text}")

    # -- the run ------------------------------------------------------------------------

    async def run(self) -> None:
        rng = random.Random(self.seed)
        appdir = self.workdir / "app"
        appdir.mkdir()
        write_app(appdir, "v1")
        dep = Dependency()
        await dep.up()
        conf = self.workdir / "fuzz.toml"
        conf.write_text(
            f'[checks.dep]\ntype = "tcp"\nhost = "{HOST}"\nport = {dep.port}\ntimeout = "0.5s"\n'
        )
        self.port = int(self.listen_sock.getsockname()[1])
        argv = [sys.executable, "-m", "sdserve", "run", "relapp:create_app"]
        argv += ["--workers", str(WORKERS), "--log", "stderr", "--config", str(conf)]
        argv += ["--start-timeout", "4", "--reload-timeout", "6", "--retry-max", "0.5"]
        argv += ["--crash-window", "1"]
        env = {
            "PYTHONDONTWRITEBYTECODE": "1",
            "TESTAPP_GATE": str(self.gate.path),
            "WATCHDOG_USEC": "2000000",
            "SDSERVE_HEALTH__INTERVAL": "0.3",
            "SDSERVE_HEALTH__FAIL_THRESHOLD": "1",
        }
        launcher = Launcher(
            argv, [("http", self.listen_sock)], workdir=self.workdir, env=env, cwd=appdir
        )
        self.messages = launcher.sink.messages
        try:
            self.instances.append(await launcher.start(timeout=60))
            await self.steady(launcher, timeout=30)
            self.fds = (self.fd_count(launcher), 0)
            start_instance = launcher.current
            async with load(self.port, rng) as stats:
                self.stats = stats
                await stats.wait_ok(50)
                names = list(EVENTS)
                weights = [EVENTS[n] for n in names]
                for i in range(self.events):
                    event = rng.choices(names, weights)[0]
                    self.note(f"event {i}: {event}")
                    await self.apply(event, launcher, rng, dep, appdir)
                    await asyncio.sleep(rng.choice(PAUSES))  # the schedule, not a sync
                await self.settle(launcher, appdir, dep)
                await self.restore(appdir, dep)
                began = time.monotonic()
                self.note("restored the good release and the dependency")
                await self.steady(launcher, timeout=RECOVERY_BOUND)
                self.recovery = time.monotonic() - began
                self.note(f"back to {WORKERS} workers in {self.recovery:.2f}s")
                await stats.wait_ok(sum(stats.ok.values()) + 50)
            if launcher.current is start_instance:  # the same supervisor all along
                self.fds = (self.fds[0], self.fd_count(launcher))
            else:
                self.fds = (0, 0)
            await self.stop(launcher, expected={0})
            await asyncio.gather(*self.watchers)
        finally:
            await launcher.close()
            await dep.down()

    def fd_count(self, launcher: Launcher) -> int:
        """The supervisor's open fds, less the unnamed datagram socket that each notify
        message opens and closes (sd_notify's own): a listing can catch one mid-send."""
        assert launcher.pid is not None
        passing = notify_sockets()
        folder = Path(f"/proc/{launcher.pid}/fd")
        listing = []
        for entry in sorted(folder.iterdir(), key=lambda p: int(p.name)):
            with contextlib.suppress(OSError):
                target = os.readlink(entry)
                if target not in passing:
                    listing.append(f"{entry.name} -> {target}")
        self.fd_lists.append(listing)
        # what the supervisor said last, and its children, for a failure's message
        pid = launcher.pid
        said = [m.fields["STATUS"] for m in self.messages if m.pid == pid and "STATUS" in m.fields]
        self.fd_note = f"(its status then: {said[-1] if said else ''!r}; children {children(pid)})"
        return len(listing)

    async def settle(self, launcher: Launcher, appdir: Path, dep: Dependency) -> None:
        """Wait for what the events set going: killed workers to exit, blocked ones to be
        aborted. A block request queued while the service was down needs it running, and
        the service may give up meanwhile (status 6): then it is started again."""
        async with asyncio.timeout(BLOCK_SECONDS + 150):
            while pending := [w for w in self.watchers if not w.done()]:
                await self.revive(launcher, appdir, dep)
                instance = launcher.current
                assert instance is not None
                await asyncio.wait([*pending, instance.exited], return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*self.watchers)
        await self.revive(launcher, appdir, dep)

    async def revive(self, launcher: Launcher, appdir: Path, dep: Dependency) -> None:
        """If the service exited by itself, check that it had to, and start it again (as
        systemd's Restart= does). The one way: with the release on disk broken or the
        dependency down, every worker died and crash_limit replacements failed (status 6)."""
        current = launcher.current
        if current is None or not current.exited.done():
            return
        self.exit_codes.append((current.exited.result(), self.gave_up()))
        self.note(f"{current.pid} exited by itself with {current.exited.result()}")
        await self.start_again(launcher, appdir, dep)

    def gave_up(self) -> set[int]:
        """The truthful statuses of a service that exited by itself: 6, and only when
        workers were killed while the release on disk was broken or the dependency down."""
        return {6} if (self.broken_release or self.dep_down) and self.kills else set()

    async def restore(self, appdir: Path, dep: Dependency) -> None:
        write_app(appdir, "v1")
        await dep.up()
        self.broken_release = self.dep_down = False

    async def start_again(self, launcher: Launcher, appdir: Path, dep: Dependency) -> None:
        """Like systemd's restart: start; a start that fails because the release on disk is
        broken or the dependency is down must fail with status 3; then, once the operator
        fixed it, the next start must work."""
        try:
            self.instances.append(await launcher.start(timeout=60))
            return
        except LaunchError:
            failed = launcher.current
            assert failed is not None
            self.instances.append(failed)
            expected = {3} if (self.broken_release or self.dep_down) else set()
            self.exit_codes.append((failed.exited.result(), expected))
            self.note(f"start failed with {failed.exited.result()}: restoring")
        await self.restore(appdir, dep)
        self.instances.append(await launcher.start(timeout=60))

    async def steady(self, launcher: Launcher, *, timeout: float) -> None:
        """Until the current instance serves with WORKERS workers, all ready, none draining
        and no respawn pending.

        Waits on events only: the supervisor's next notify message, or the exit of a worker
        still draining (its pidfd); the timeout is the bound of the whole wait.
        """
        instance = launcher.current
        assert instance is not None
        want = f": {WORKERS}/{WORKERS} workers ready"
        async with asyncio.timeout(timeout):
            while True:
                mark = len(launcher.sink.messages)
                statuses = [
                    m.fields["STATUS"]
                    for m in launcher.sink.messages[instance.first_message :]
                    if m.pid == instance.pid and "STATUS" in m.fields
                ]
                status = statuses[-1] if statuses else ""
                first = status.split(";")[0]
                ok = first.startswith("generation ") and first.endswith(want)
                # nothing pending either: a respawn waiting for its backoff ("degraded" or
                # "recycling fails: ... retrying") starts one more worker later
                busy = ("reloading", "draining", "retrying")
                if ok and not any(word in status for word in busy):
                    workers = children(instance.pid)
                    if len(workers) == WORKERS:
                        return
                    if len(workers) > WORKERS:  # a worker retiring after a recycle
                        await asyncio.wait(
                            [asyncio.create_task(wait_exit(p, timeout)) for p in workers],
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                        continue
                await launcher.sink.expect(lambda m: True, timeout=timeout, start=mark)

    async def apply(
        self, event: str, launcher: Launcher, rng: random.Random, dep: Dependency, appdir: Path
    ) -> None:
        watchers = self.watchers
        await self.revive(launcher, appdir, dep)
        instance = launcher.current
        assert instance is not None
        if event == "hup":
            with contextlib.suppress(ProcessLookupError):  # it may be exiting by itself
                launcher.send_signal(signal.SIGHUP)
        elif event == "term":
            await self.stop(launcher, expected=self.kill_pending())
            await self.start_again(launcher, appdir, dep)
        elif event == "kill9":
            workers = children(instance.pid)
            if workers:
                pid = rng.choice(workers)
                kill = Kill(pid, time.monotonic())
                self.kills.append(kill)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                watchers.append(asyncio.create_task(self.watch(kill)))
        elif event == "bad_release":
            write_app(appdir, "v2-bad", BAD_RELEASES[rng.choice(sorted(BAD_RELEASES))])
            self.broken_release = True
        elif event == "good_release":
            write_app(appdir, f"v{rng.randint(3, 99)}")
            self.broken_release = False
        elif event == "dep_down":
            await dep.down()
            self.dep_down = True
        elif event == "dep_up":
            await dep.up()
            self.dep_down = False
        elif event == "block":
            watchers.append(asyncio.create_task(self.block()))

    async def block(self) -> None:
        """One request that blocks its worker's loop past the watchdog: the supervisor
        aborts that worker; what it held is lost, as with a kill. One at a time. The request
        may wait in the listen queue through a restart and reach the next instance, so this
        waits for whichever worker takes it."""
        if self.blocking:
            return
        self.blocking = True
        request = asyncio.create_task(self._block_request())
        name = await self.gate.wait_prefix("block-", timeout=BLOCK_SECONDS + 120)
        kill = Kill(int(name.split("-")[1]), time.monotonic())
        self.kills.append(kill)
        await self.watch(kill)
        self.gate.release(name)
        await request
        self.blocking = False

    async def _block_request(self) -> None:
        with contextlib.suppress(OSError, ProtocolError, TimeoutError):
            async with asyncio.timeout(BLOCK_SECONDS + 30):
                reader, writer = await asyncio.open_connection(HOST, self.port)
                try:
                    writer.write(request_bytes(f"/block?s={BLOCK_SECONDS}", close=True))
                    await read_response(reader)
                finally:
                    writer.close()

    async def watch(self, kill: Kill) -> None:
        await wait_exit(kill.pid, timeout=60)
        kill.exited = time.monotonic()

    def kill_pending(self) -> set[int]:
        """The truthful exit statuses of a stop now: 4 too if a kill may overlap the stop."""
        recent = [
            k for k in self.kills if k.exited is None or time.monotonic() - k.exited < KILL_SLACK
        ]
        return {0, 4} if recent else {0}

    async def stop(self, launcher: Launcher, *, expected: set[int]) -> None:
        instance = launcher.current
        assert instance is not None
        self.note(f"SIGTERM to {instance.pid}")
        try:
            code = await launcher.stop(timeout=90)
        except ProcessLookupError:  # it exited by itself just before: revive() judges that
            await instance.exited
            self.exit_codes.append((instance.exited.result(), self.gave_up()))
            return
        self.exit_codes.append((code, expected))
        self.note(f"{instance.pid} exited {code}")

    # -- the verdict --------------------------------------------------------------------

    async def check(self) -> None:
        problems = self.problems
        unexcused = [f for f in self.stats.failures if not any(k.excuses(f) for k in self.kills)]
        if unexcused:
            problems.append(
                f"{len(unexcused)} request(s) failed on no killed worker: {unexcused[:5]}"
            )
        if self.recovery > RECOVERY_BOUND:
            problems.append(f"recovery took {self.recovery:.1f}s")
        for code, expected in self.exit_codes:
            if code not in expected:
                problems.append(f"exit status {code}, expected one of {sorted(expected)}")
        if self.fds[0] != self.fds[1]:
            first, last = self.fd_lists[0], self.fd_lists[-1]
            problems.append(
                f"the supervisor's fds went from {self.fds[0]} to {self.fds[1]}: "
                f"{sorted(set(first) - set(last))} -> {sorted(set(last) - set(first))} "
                f"{self.fd_note}"
            )
        for instance in self.instances:
            mine = [m for m in self.messages if m.pid == instance.pid]
            problems += [f"pid {instance.pid}: {p}" for p in notify_order_problems(mine)]
            for pid in worker_pids(instance):
                try:
                    await wait_exit(pid, timeout=30)
                except TimeoutError:
                    problems.append(f"worker {pid} of {instance.pid} outlived it")
                if process_state(pid) == "Z":
                    problems.append(f"worker {pid} of {instance.pid} is a zombie")

    def report(self) -> str:
        kinds = dict(self.stats.ok)
        return (
            f"seed {self.seed}: {self.events} events, {self.stats.requests} requests {kinds}, "
            f"{len(self.stats.failures)} failed ({len(self.kills)} worker(s) killed), "
            f"back to {WORKERS} workers in {self.recovery:.2f}s, exits {self.exit_codes}"
        )


def notify_sockets() -> set[str]:
    """``socket:[INODE]`` of every unnamed AF_UNIX datagram socket (/proc/net/unix)."""
    found = set()
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            # Num RefCount Protocol Flags Type St Inode [Path]; Type 0002 is SOCK_DGRAM
            if len(fields) == 7 and fields[4] == "0002":
                found.add(f"socket:[{fields[6]}]")
    return found


def worker_pids(instance: Instance) -> list[int]:
    text = instance.log_text()
    pids = []
    for line in text.splitlines():
        if "started worker" in line and "(pid " in line:
            pids.append(int(line.split("(pid ")[1].split(",")[0]))
    return pids
