"""A warm template for workers: new workers are forked from a process that has already
imported the libraries, but never the application.

Why: a worker started by fork and exec (``python -m sdserve worker APP``) spends most of
its start importing aiohttp, sdserve, uvloop and prometheus-client: about 270 ms of CPU
and 6,500 page faults of its 390 ms and 8,300 on a 2-core machine. On a reload that work
competes with the workers serving, and a host with 32 workers does it 32 times.

How:

- The supervisor starts the template once (``python -m sdserve template``), with one end
  of a ``SOCK_SEQPACKET`` pair. It imports :data:`WARM_MODULES`, freezes what it has
  (``gc.freeze()``: a worker's collections then never write to, and so copy, the pages it
  shares with the template), and says it is ready.
- A spawn is one message to it: the worker's command line and environment, and its fds
  (``SCM_RIGHTS``) with the numbers they must have. The template forks a child, which
  forks the worker and exits at once: the worker, orphaned, is adopted by the
  supervisor, a child subreaper (``PR_SET_CHILD_SUBREAPER``). So the supervisor is the
  worker's parent as with fork and exec: it collects its exit status (:class:`Adopted`),
  and the worker's ``PR_SET_PDEATHSIG`` follows the supervisor. The worker waits for its
  first parent's end (a pidfd: the kernel adopts the orphans before it says so), puts its
  fds where its environment says, starts a session of its own, takes the environment and
  runs ``sdserve worker APP`` as the exec'd one would; the template answers the worker's
  PID.
- **Stale libraries:** the template notes, once ready, every imported module's file (and
  the interpreter's) by size, modification time and inode. Each spawn checks them first
  (a ``stat`` each, about a millisecond): when a release has upgraded a library, or
  sdserve itself, the template answers ``stale`` and exits. That worker, and any spawn
  while no template is ready, is started by fork and exec as before, and a new template
  is started for the next.
- Anything else that goes wrong (no answer within :data:`ANSWER_TIMEOUT`, the template
  gone) falls back to fork and exec too: the template only makes a start cheaper, never
  possible. A template that did not answer is killed at once and replaced: the
  supervisor's loop waits for it no longer than that. A worker it may yet have started
  holds a link the supervisor has closed (the worker exec'd instead gets a new one), and
  the supervisor stops it when it says it is ready (:mod:`sdserve.supervisor`).

The supervisor reaps its other adopted orphans (:mod:`sdserve.reaper`), so the template
is off with ``reap_orphans = "no"``, and with ``warm_template = false``.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import select
import socket
import subprocess
import sys
from collections.abc import Sequence

log = logging.getLogger("sdserve.template")
_FIELDS = {"SDSERVE_PHASE": "template"}

#: what the template imports: what a worker imports before it loads the application
WARM_MODULES = (
    "asyncio",
    "aiohttp.web",
    "multidict",
    "yarl",
    "uvloop",
    "prometheus_client",
    "prometheus_client.multiprocess",
    "sdserve.cli",
    "sdserve.worker",
    "sdserve.supervisor",
    "sdserve.builtin_checks",
)
#: seconds the supervisor waits for the template's answer to a spawn (it forks twice: a
#: few milliseconds), on its loop, before it starts the worker by fork and exec
ANSWER_TIMEOUT = 1.0
#: the environment variable that gives the template its end of the socket pair
ENV_SOCKET = "_SDSERVE_TEMPLATE_FD"
#: the template's process name; the workers it forks are named as exec'd ones are (their
#: command line stays the template's: ``sdserve status`` lists the workers)
NAME = "sdserve-warm"
READY = b"ready"
STALE = b"stale"
_MAX_MESSAGE = 1 << 20
_MAX_FDS = 64
_CAP_SYS_NICE = 23


# -- the supervisor's side ----------------------------------------------------------------


class Adopted:
    """A worker forked by the template and adopted by the supervisor: its exit status is
    collected as a child's (the subset of :class:`subprocess.Popen` the supervisor uses)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def ask(sock: socket.socket, argv: Sequence[str], env: dict[str, str], fds: Sequence[int]) -> int:
    """Ask the template behind ``sock`` to start a worker; its PID. The worker gets each of
    ``fds`` at the same number. Raises :class:`TemplateStale` when the template's libraries
    changed on disk (it exits), OSError or TimeoutError when it did not answer."""
    request = json.dumps({"argv": list(argv), "env": env, "fds": list(fds)}).encode()
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    sock.settimeout(ANSWER_TIMEOUT)
    sock.sendmsg([request], rights)
    answer = sock.recv(256)
    if answer == STALE:
        raise TemplateStale("the template's libraries changed on disk")
    if not answer.startswith(b"pid "):
        raise OSError(f"the template answered {answer[:80]!r}")
    return int(answer[4:])


class TemplateStale(Exception):
    """The libraries the template imported changed on disk: it is gone."""


class Template:
    """The supervisor's warm template process: started, asked for workers, started again
    when it is stale or gone. Every failure is a fallback to fork and exec (None)."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = {k: v for k, v in env.items() if k != "_SDSERVE_WARMUP_NICE"}
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._ready = False
        #: workers it started, and spawns that fell back to fork and exec
        self.forked = 0
        self.fallbacks = 0

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.set_inheritable(False)
        env = dict(self._env)
        env[ENV_SOCKET] = str(theirs.fileno())
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "sdserve", "template"],
                env=env,
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            log.warning("cannot start the warm template: %s", exc, extra=_FIELDS)
            return
        finally:
            theirs.close()
        self._sock = ours
        self._ready = False

    def spawn(self, argv: Sequence[str], env: dict[str, str], fds: Sequence[int]) -> Adopted | None:
        """A worker forked from the template, or None: start it by fork and exec."""
        sock = self._sock
        if sock is None:
            return None
        if not self._ready:
            # its "ready" may have come meanwhile; never waited for
            try:
                said = sock.recv(16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self.fallbacks += 1
                return None
            except OSError:
                said = b""
            if said != READY:
                self._again("it ended before it was ready")
                return None
            self._ready = True
        try:
            pid = ask(sock, argv, env, fds)
        except TemplateStale as exc:
            log.info("warm template: %s: starting a new one", exc, extra=_FIELDS)
            self._again("")
            return None
        except (OSError, ValueError) as exc:  # TimeoutError is an OSError
            self._again(f"it did not start a worker: {exc!r}")
            return None
        self.forked += 1
        return Adopted(pid)

    def _again(self, why: str) -> None:
        if why:
            log.warning("warm template: %s: starting a new one", why, extra=_FIELDS)
        self.fallbacks += 1
        # a stale one exits on its own; one that failed is not waited for
        self.close(kill=bool(why))
        self.start()

    def close(self, *, kill: bool = False) -> None:
        """End the template (it exits when its socket closes; ``kill``: at once, by
        SIGKILL) and collect it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:
            proc.kill()
        try:
            proc.wait(timeout=ANSWER_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the template's side --------------------------------------------------------------------


def lower_priority_for_warm_up(environ: dict[str, str] | os._Environ[str]) -> None:
    """A worker warms up at a lower CPU priority (``_SDSERVE_WARMUP_NICE``), so that its
    start does not take CPU from the workers serving; only where it may return to its
    current priority once ready (``RLIMIT_NICE``, i.e. ``LimitNICE=``, or CAP_SYS_NICE):
    otherwise it would stay behind every other process of the host."""
    nice = int(environ.pop("_SDSERVE_WARMUP_NICE", "0") or 0)
    if not nice:
        return
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if _may_return_to(current):
        with contextlib.suppress(OSError):  # a sandbox may forbid it: then warm up as is
            os.setpriority(os.PRIO_PROCESS, 0, current + nice)


def _may_return_to(nice: int) -> bool:
    import resource

    if resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20 - nice:
        return True
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_NICE & 1)
    return False


def _files() -> dict[str, tuple[int, int, int]]:
    """Every imported module's file, and the interpreter: (size, mtime, inode)."""
    seen: dict[str, tuple[int, int, int]] = {}
    paths = {sys.executable}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            paths.add(path)
    for path in paths:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            seen[path] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return seen


def _changed(seen: dict[str, tuple[int, int, int]]) -> str | None:
    """The first file that is not as it was, or None."""
    for path, was in seen.items():
        try:
            st = os.stat(path)
        except OSError:
            return path
        if (st.st_size, st.st_mtime_ns, st.st_ino) != was:
            return path
    return None


def run_template() -> int:
    """``python -m sdserve template``: import, say ready, fork workers on request."""
    import gc
    import importlib

    sock = socket.socket(fileno=int(os.environ.pop(ENV_SOCKET)))
    sock.set_inheritable(False)
    _set_name(NAME)  # what ps -o comm and the tests tell it from the workers by
    for name in WARM_MODULES:
        with contextlib.suppress(ImportError):  # an extra that is not installed
            importlib.import_module(name)
    gc.collect()
    gc.freeze()
    seen = _files()
    if not _say(sock, READY):
        return 0
    while True:
        try:
            data, ancdata, _flags, _addr = sock.recvmsg(
                _MAX_MESSAGE, socket.CMSG_SPACE(_MAX_FDS * 4)
            )
        except OSError:
            return 0
        if not data:
            return 0  # the supervisor is gone
        fds = _received_fds(ancdata)
        if (path := _changed(seen)) is not None:
            _close(fds)
            if _say(sock, STALE):
                print(f"sdserve template: {path} changed: exiting", file=sys.stderr)
            return 0
        try:
            request = json.loads(data)
            pid = _fork_worker(sock, request, fds)
        except (OSError, ValueError, KeyError) as exc:
            answer = f"error {exc}".encode()[:200]
        else:
            answer = f"pid {pid}".encode()
        finally:
            _close(fds)
        if not _say(sock, answer):
            return 0


def _say(sock: socket.socket, message: bytes) -> bool:
    """Send to the supervisor; False if it is gone (it may end, a failed start say,
    while the template imports: nothing to report then, and no one to report it to)."""
    try:
        sock.sendall(message)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(fds)


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fork_worker(sock: socket.socket, request: dict[str, object], fds: list[int]) -> int:
    """Fork a child that forks the worker and exits; the worker's PID."""
    argv = [str(a) for a in request["argv"]]  # type: ignore[attr-defined]
    env = {str(k): str(v) for k, v in request["env"].items()}  # type: ignore[attr-defined]
    targets = [int(t) for t in request["fds"]]  # type: ignore[attr-defined]
    if len(targets) != len(fds):
        raise ValueError(f"{len(fds)} fds for {len(targets)} places")
    reader, writer = os.pipe()
    first = os.fork()
    if first == 0:  # the first child: fork the worker, say its PID, go
        code = 1
        try:
            os.close(reader)
            me = os.getpid()  # before the fork: the worker's getppid() may already be another
            worker = os.fork()
            if worker == 0:
                os.close(writer)
                _become_worker(sock, argv=argv, env=env, fds=fds, targets=targets, first=me)
            os.write(writer, str(worker).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    try:
        with os.fdopen(reader, "rb") as pipe:
            said = pipe.read()
    finally:
        os.waitpid(first, 0)
    if not said.isdigit():
        raise OSError("the worker was not forked")
    return int(said)


def _become_worker(
    sock: socket.socket,
    *,
    argv: list[str],
    env: dict[str, str],
    fds: list[int],
    targets: list[int],
    first: int,
) -> None:
    """In the worker: what fork and exec would have given it, then ``sdserve worker``."""
    code = 1
    try:
        sock.close()
        # Adopted by the supervisor once the first child has ended: the kernel re-parents
        # orphans before it makes an exited process's pidfd readable.
        try:
            pidfd = os.pidfd_open(first)
        except ProcessLookupError:
            pass  # already ended and collected
        else:
            select.select([pidfd], [], [])
            os.close(pidfd)
        os.setsid()
        _set_name(os.path.basename(sys.executable))  # as a worker exec'd is named
        _place(fds, targets)
        _close_others(keep={0, 1, 2, *targets})
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.environ.clear()
        os.environ.update(env)
        lower_priority_for_warm_up(os.environ)
        import importlib

        importlib.invalidate_caches()  # the application's files may be new
        sys.argv = [argv[0], *argv[3:]]  # as ``python -m sdserve worker APP`` sees it
        from .cli import exit_without_teardown, main

        exit_without_teardown(main(argv[3:]))
    except SystemExit as exc:  # as the interpreter would end it
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _place(fds: list[int], targets: list[int]) -> None:
    """Each received fd to its target number, inheritable as ``pass_fds`` makes them."""
    top = max([*fds, *targets, 2]) + 1
    moved = [_dup_above(fd, top) for fd in fds]  # out of every target's way first
    _close(fds)
    for fd, target in zip(moved, targets, strict=True):
        os.dup2(fd, target, inheritable=True)
        os.close(fd)


def _set_name(name: str) -> None:
    """This process's name (``/proc/PID/comm``, 15 bytes at most)."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(name[:15])


def is_template(pid: int) -> bool:
    """Whether ``pid`` is a warm template (a child of the supervisor that is no worker)."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip() == NAME
    except OSError:
        return False


def _close_others(keep: set[int]) -> None:
    """Close every fd but ``keep`` (as ``close_fds`` does for a process exec'd)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _dup_above(fd: int, low: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)
