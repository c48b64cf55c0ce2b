"""Boxes: a real systemd (PID 1) booted with systemd-nspawn from a cached rootfs.

A box boots from a rootfs of ``rootfs.py`` with ``--volatile=overlay``: everything a test
writes lands in a tmpfs and vanishes at stop, so the cached tree stays pristine and several
boxes (and pytest sessions) can boot from it at once. The box has a private network: only its
own ``lo``, so the load it runs never leaves it. The checkout's ``sdserve/`` package is
bind-mounted read-only where the rootfs's venv looks for it.

How a box is launched (see ``systemd-testbed.md`` in shared/ for why each step is needed):
the launching shell moves itself into a cgroup of its own, enters a private mount namespace
with a fresh tmpfs on ``/run``, and execs ``systemd-nspawn --boot --keep-unit --register=no``.
nspawn runs with ``--notify-ready=yes`` and a ``NOTIFY_SOCKET`` of ours, so the boot is
awaited as an event: nspawn's ``READY=1`` (the box's systemd finished starting up), then
``systemctl is-system-running --wait`` inside. Commands run inside through ``nsenter``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from . import rootfs

CHECKOUT = rootfs.CHECKOUT
BOX_TOOLS = "/opt/sds-test"  # tests/system/box, read-only inside the box
BOX_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A folder holding the sdserve/ package to test instead of this checkout's (e.g. a clean
# `git worktree` of a commit, while the checkout is being edited).
SOURCE_ENV = "SDS_TEST_SOURCE"


def sdserve_source() -> Path:
    """The sdserve package the boxes run: the checkout's, unless $SDS_TEST_SOURCE says."""
    base = Path(os.environ.get(SOURCE_ENV) or CHECKOUT).resolve()
    if not (base / "sdserve" / "__init__.py").is_file():
        raise BoxError(f"{base} holds no sdserve package (from ${SOURCE_ENV} or the checkout)")
    return base / "sdserve"


JournalEntry = dict[str, Any]


class BoxError(RuntimeError):
    """The box did not boot, or a command in it failed."""


def missing_prerequisites() -> list[str]:
    """Why nspawn boxes cannot run on this machine (empty when they can)."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append("not root")
    for tool in ("systemd-nspawn", "nsenter", "unshare", "debootstrap", "chroot"):
        if not any(Path(d, tool).exists() for d in BOX_PATH.split(":")):
            reasons.append(f"{tool} not installed (make apt)")
    if not cgroup_roots():
        reasons.append("no writable cgroup hierarchy under /sys/fs/cgroup")
    if "overlay" not in Path("/proc/filesystems").read_text():
        reasons.append("kernel has no overlayfs (needed for --volatile=overlay)")
    return reasons


def cgroup_roots() -> list[Path]:
    """The cgroup hierarchies the launching shell must move into: on a hybrid host, the named
    ``systemd`` v1 hierarchy and the ``unified`` v2 one; on a pure v2 host, the root."""
    base = Path("/sys/fs/cgroup")
    roots = [base / "systemd", base / "unified"]
    found = [r for r in roots if (r / "cgroup.procs").exists() and os.access(r, os.W_OK)]
    if found:
        return found
    if (base / "cgroup.controllers").exists() and os.access(base, os.W_OK):
        return [base]
    return []


def _remove_cgroup(path: Path) -> None:
    if not path.is_dir():
        return
    for dirpath, _dirs, _files in os.walk(path, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


def _pidfd_wait(pid: int, sock: socket.socket, timeout: float) -> list[str]:
    """Collect notify messages from ``sock`` until ``READY=1`` arrives; raise if the process
    ``pid`` exits first or the timeout passes."""
    pidfd = os.pidfd_open(pid)
    try:
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BoxError(f"no READY=1 from systemd-nspawn within {timeout} s: {seen}")
            readable, _, _ = select.select([sock.fileno(), pidfd], [], [], left)
            if sock.fileno() in readable:
                msg = sock.recv(4096).decode(errors="replace")
                seen.extend(msg.splitlines())
                if "READY=1" in msg.splitlines():
                    return seen
            elif pidfd in readable:
                raise BoxError(f"systemd-nspawn exited during boot (messages: {seen})")
    finally:
        os.close(pidfd)


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """Kill a command started in the box. ``nsenter`` forks to enter the box's PID namespace:
    its child is killed so that nsenter reaps it and exits (killing nsenter first would leave
    the child a zombie that only the host's PID 1 may reap, and the box's shutdown waits for
    it). Before the fork, the session of nsenter is killed instead."""
    if proc.poll() is not None:
        return
    inner = [pid for pid, _comm in _children(proc.pid)]
    for pid in inner:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if not inner:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _children(pid: int) -> list[tuple[int, str]]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == pid:
            out.append((int(entry.name), comm))
    return out


@dataclass
class LoadResult:
    """The totals that ``box/load.py`` printed."""

    requests: int
    ok: int
    failed: int
    failures: dict[str, int]
    longest_s: float
    seconds: float
    hung_clients: int
    by_kind: dict[str, dict[str, int]]
    examples: list[str]

    def summary(self) -> str:
        return (
            f"{self.requests} requests, {self.failed} failed {self.failures}, "
            f"longest {self.longest_s * 1000:.0f} ms, {self.seconds:.1f} s, "
            f"keep-alive {self.by_kind['keepalive']}, fresh {self.by_kind['fresh']}, "
            f"paced keep-alive {self.by_kind['paced']}"
        )


@dataclass
class Load:
    """A load running inside the box; ``finish()`` ends it and returns its totals."""

    proc: subprocess.Popen[str]
    result: LoadResult | None = None

    def finish(self, timeout: float = 60.0) -> LoadResult:
        if self.result is not None:
            return self.result
        try:
            # communicate() closes the load's standard input: its signal to stop
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            self.proc.communicate()
            raise
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if self.proc.returncode != 0 or not lines:
            raise BoxError(f"load exited {self.proc.returncode}: {out!r}")
        self.result = LoadResult(**json.loads(lines[-1]))
        return self.result


@dataclass
class Box:
    """A running box. Create it with ``Box.boot()``; always ``stop()`` it."""

    flavour: str
    name: str
    workdir: Path
    proc: subprocess.Popen[bytes]
    leader: int = 0
    cgroups: list[Path] = field(default_factory=list)
    lock: IO[str] | None = None
    boot_seconds: float = 0.0

    # ---- life cycle -------------------------------------------------------------------
    @classmethod
    def boot(
        cls,
        flavour: str,
        *,
        root: Path | None = None,
        workdir: Path | None = None,
        timeout: float = 60.0,
        binds: Sequence[tuple[Path, str]] = (),
        netns: Path | None = None,
    ) -> Box:
        """``binds``: host folders mounted read-only into the box (host path, box path).
        ``netns``: a network namespace the test made (``ip netns add``: its file under
        /run/netns) for the box to boot in, instead of a private one with only ``lo``; the
        test gives it its interfaces (a veth end, addresses) and removes it after."""
        root = root or rootfs.rootfs_path(flavour)
        if not rootfs.is_current(flavour, root.parent):
            raise BoxError(f"rootfs {root} is missing or stale: run `make test` or rootfs.py")
        workdir = workdir or Path(tempfile.mkdtemp(prefix=f"sds-box-{flavour}-"))
        name = f"sds-{flavour}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
        # A shared lock: a build waits for running boxes, and boxes wait for a build.
        lock = (root.parent / "lock").open("a")
        fcntl.flock(lock, fcntl.LOCK_SH)
        cgroups = []
        for r in cgroup_roots():
            cg = r / name
            cg.mkdir()
            cgroups.append(cg)
        notify_path = workdir / "nspawn.notify"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        nspawn = [
            "systemd-nspawn",
            f"--directory={root}",
            f"--machine={name}",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--console=read-only",
            "--timezone=off",
            "--link-journal=no",
            "--resolv-conf=off",
            "--volatile=overlay",
            "--notify-ready=yes",
            f"--bind-ro={sdserve_source()}:{rootfs.SRC_MOUNT}/sdserve",
            f"--bind-ro={Path(__file__).parent / 'box'}:{BOX_TOOLS}",
        ]
        # A bind's host folder may be under /run, which the box's mount namespace covers with
        # a fresh tmpfs: mount each on a stage in the workdir first (in that namespace only).
        # The same for the network namespace's file (nspawn opens it after the tmpfs).
        stages = ""
        if netns is None:
            nspawn.append("--private-network")
        else:
            if not netns.exists():
                raise BoxError(f"no network namespace at {netns}")
            stage = workdir / "netns"
            stage.touch()
            stages += f"mount --bind {shlex.quote(str(netns))} {shlex.quote(str(stage))} && "
            nspawn.append(f"--network-namespace-path={stage}")
        for i, (host, inside) in enumerate(binds):
            stage = workdir / f"bind{i}"
            stage.mkdir()
            stages += f"mount --bind {shlex.quote(str(host))} {shlex.quote(str(stage))} && "
            nspawn.append(f"--bind-ro={stage}:{inside}")
        inner = f'{stages}mount -t tmpfs -o mode=0755 tmpfs /run && exec "$@"'
        moves = "".join(f"echo $$ > {shlex.quote(str(cg / 'cgroup.procs'))}; " for cg in cgroups)
        launcher = (
            f"set -e; {moves}"
            f"exec unshare --mount --propagation private sh -c {shlex.quote(inner)} sh "
            + shlex.join(nspawn)
        )
        env = {
            "PATH": BOX_PATH,
            "LANG": "C.UTF-8",
            "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
            "NOTIFY_SOCKET": str(notify_path),
        }
        started = time.monotonic()
        console = (workdir / "console.log").open("wb")
        proc = subprocess.Popen(
            ["sh", "-c", launcher],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        console.close()
        box = cls(flavour, name, workdir, proc, cgroups=cgroups, lock=lock)
        try:
            _pidfd_wait(proc.pid, notify, timeout)
            leaders = [pid for pid, comm in _children(proc.pid) if comm == "systemd"]
            if len(leaders) != 1:
                raise BoxError(f"cannot tell the box's PID 1 among {_children(proc.pid)}")
            box.leader = leaders[0]
            state = box.run(
                ["systemctl", "is-system-running", "--wait"], check=False, timeout=timeout
            )
            if state.stdout.strip() != "running":
                failed = box.run(["systemctl", "--failed", "--no-legend"], check=False)
                raise BoxError(f"box is {state.stdout.strip()!r}; failed units: {failed.stdout}")
            box.boot_seconds = time.monotonic() - started
        except BaseException as exc:
            box.stop()
            if isinstance(exc, BoxError):
                raise BoxError(f"{exc}\n--- console ---\n{box.console()}") from exc
            raise
        finally:
            notify.close()
        return box

    def console(self) -> str:
        try:
            return (self.workdir / "console.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill(self, timeout: float = 30.0) -> None:
        """Kill the box outright, as a host that loses power: SIGKILL to its PID 1, after
        which the kernel kills every process of its PID namespace at once (no unit is
        stopped, no socket drained). Waits for nspawn to exit; ``stop()`` still cleans up."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.leader, signal.SIGKILL)
        self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Power the box off (SIGTERM to nspawn), then clean up its cgroups."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        for cg in self.cgroups:
            _remove_cgroup(cg)
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    # ---- commands ---------------------------------------------------------------------
    def command(self, argv: Sequence[str]) -> list[str]:
        """The host argv that runs ``argv`` inside the box, with a clean environment."""
        return [
            "nsenter",
            "-t",
            str(self.leader),
            "-a",
            "env",
            "-i",
            f"PATH={BOX_PATH}",
            "LANG=C.UTF-8",
            "SYSTEMD_COLORS=0",
            "SYSTEMD_PAGER=",
            "SYSTEMD_LESS=",
            *argv,
        ]

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        with subprocess.Popen(
            self.command(argv),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as proc:
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                proc.communicate()
                raise
        res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check and res.returncode != 0:
            raise BoxError(
                f"{shlex.join(argv)} exited {res.returncode}\n"
                f"stdout: {res.stdout[-3000:]}\nstderr: {res.stderr[-3000:]}"
            )
        return res

    @contextlib.contextmanager
    def background(self, argv: Sequence[str]) -> Iterator[subprocess.Popen[str]]:
        """Run ``argv`` inside the box while the block runs (stdout and stderr piped, text).
        Read its result with ``communicate()``; leaving the block kills it if it still runs."""
        with subprocess.Popen(
            self.command(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as proc:
            try:
                yield proc
            finally:
                kill_group(proc)
                proc.communicate()

    def sh(self, script: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-c", script], **kw)

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.run(
            [
                "sh",
                "-c",
                'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"',
                "sh",
                path,
                mode,
            ],
            input=text,
        )

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        res = self.run(["systemctl", *args], check=False, timeout=timeout)
        if check and res.returncode != 0:
            tail = self.run(["journalctl", "--no-pager", "-n", "40"], check=False).stdout
            raise BoxError(
                f"systemctl {shlex.join(args)} exited {res.returncode}: {res.stderr.strip()}\n"
                f"--- journal ---\n{tail}"
            )
        return res

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def install_units(
        self, units: Mapping[str, str], *, directory: str = "/etc/systemd/system"
    ) -> None:
        """Write unit files (names may hold a drop-in folder: ``x.service.d/y.conf``) and
        reload systemd."""
        for name, text in units.items():
            self.write(f"{directory}/{name}", text)
        self.systemctl("daemon-reload")

    # ---- journal ----------------------------------------------------------------------
    def cursor(self) -> str:
        """The cursor of the newest journal entry: pass it to read only what follows."""
        out = self.run(["journalctl", "-o", "json", "-n", "1", "--no-pager"]).stdout
        return str(json.loads(out.splitlines()[-1])["__CURSOR"])

    def journal(
        self, *, cursor: str | None = None, unit: str | None = None, args: Sequence[str] = ()
    ) -> list[JournalEntry]:
        argv = ["journalctl", "-o", "json", "--no-pager", "--all", *args]
        if cursor:
            argv.append(f"--after-cursor={cursor}")
        if unit:
            argv.append(f"--unit={unit}")
        out = self.run(argv).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def wait_journal(
        self,
        match: Callable[[JournalEntry], bool],
        *,
        cursor: str,
        unit: str | None = None,
        timeout: float = 30.0,
        what: str = "a matching journal entry",
    ) -> JournalEntry:
        """Follow the journal after ``cursor`` until an entry matches; the timeout is only an
        upper bound.

        ``journalctl --follow`` on systemd 252 can go silent while entries keep arriving
        (seen in CI: a reload's last entries were in the journal, the follower never printed
        them). So a follower that has printed nothing for :data:`FOLLOW_SILENCE` seconds is
        replaced by a new one from the last entry it did print: nothing is read twice or
        lost, and the wait still ends on the entry itself."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            found, cursor = self._follow(match, cursor, unit, deadline, seen)
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no {what} within {timeout} s; saw:\n" + "\n".join(seen[-40:]))

    def _follow(
        self,
        match: Callable[[JournalEntry], bool],
        cursor: str,
        unit: str | None,
        deadline: float,
        seen: list[str],
    ) -> tuple[JournalEntry | None, str]:
        """One ``journalctl --follow`` from ``cursor``: the matching entry, or None once it
        has been silent for FOLLOW_SILENCE s or the deadline passed; and the last cursor."""
        argv = ["journalctl", "--follow", "-o", "json", "--no-pager", "--all"]
        argv.append(f"--after-cursor={cursor}")
        if unit:
            argv.append(f"--unit={unit}")
        with subprocess.Popen(
            self.command(argv),
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        ) as follow:
            assert follow.stdout is not None
            fd = follow.stdout.fileno()
            buf = b""
            try:
                while True:
                    left = min(deadline - time.monotonic(), FOLLOW_SILENCE)
                    if left <= 0:
                        return None, cursor
                    readable, _, _ = select.select([fd], [], [], left)
                    if not readable:
                        return None, cursor  # silent: start a new follower from here
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        raise BoxError("journalctl --follow ended while waiting")
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if not line.startswith(b"{"):
                            continue
                        entry: JournalEntry = json.loads(line)
                        cursor = str(entry["__CURSOR"])
                        seen.append(message(entry))
                        if match(entry):
                            return entry, cursor
            finally:
                kill_group(follow)

    # ---- load -------------------------------------------------------------------------
    @contextlib.contextmanager
    def load(
        self,
        *,
        port: int = 8080,
        path: str = "/",
        keepalive: int = 4,
        fresh: int = 4,
        paced: int = 0,
        pause: float = 0.2,
        max_requests: int = 100_000,
        max_seconds: float = 120.0,
        timeout: float = 30.0,
        start_timeout: float = 30.0,
    ) -> Iterator[Load]:
        """Run ``box/load.py`` inside the box against its own 127.0.0.1 while the block runs.
        It is bounded by ``max_requests`` and ``max_seconds``; leaving the block ends it."""
        argv = [
            "python3",
            f"{BOX_TOOLS}/load.py",
            f"--port={port}",
            f"--path={path}",
            f"--keepalive={keepalive}",
            f"--fresh={fresh}",
            f"--paced={paced}",
            f"--pause={pause}",
            f"--max-requests={max_requests}",
            f"--max-seconds={max_seconds}",
            f"--timeout={timeout}",
        ]
        with subprocess.Popen(
            self.command(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as proc:
            handle = Load(proc)
            try:
                assert proc.stdout is not None
                readable, _, _ = select.select([proc.stdout], [], [], start_timeout)
                first = proc.stdout.readline().strip() if readable else ""
                if first != "started":
                    raise BoxError(f"the load did not start within {start_timeout} s: {first!r}")
                yield handle
                handle.finish()
            finally:
                kill_group(proc)


#: a journal follower that prints nothing this long is replaced (see Box.wait_journal)
FOLLOW_SILENCE = 5.0


def wait_until(
    condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.02
) -> None:
    """Re-check ``condition`` until it holds. Only for state that offers no event to wait on
    (the kernel's socket tables); the timeout is an upper bound, not a guess."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def message(entry: JournalEntry) -> str:
    """An entry's MESSAGE as text (journalctl gives non-UTF-8 ones as a list of bytes)."""
    msg = entry.get("MESSAGE", "")
    if isinstance(msg, list):
        return bytes(msg).decode(errors="replace")
    return str(msg)
