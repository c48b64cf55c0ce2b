"""Several hosts behind a real HAProxy: the pieces of ``test_hosts.py``.

Each host is a box (``testbed.Box``) booted in a network namespace that the test creates
(``ip netns add``), joined to this machine by a veth pair on a /30 of its own in 10.77.N.0/24.
The shipped units run there, with drop-ins that move both sockets from 127.0.0.1 to the
box's address (``http`` on :8080, ``admin``, the health endpoints, on :8081) and make every
start of the service start the admin socket too (``Wants=``, see units/LOADBALANCER.md).

HAProxy (Debian's package) runs on this machine: its frontend is a socket the test bound on
127.0.0.1 and hands over (``bind fd@N``), so the drill's traffic only ever goes to loopback
and to the namespaces. It checks each host's ``/readyz`` on the admin port and logs every
server state change to a unix datagram socket of the test's: ``Server hosts/h1 is DOWN`` and
``is UP`` are the events the test waits on (HAProxy offers nothing else to wait on).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .conftest import shipped_units
from .test_systemd import SERVICE
from .testbed import Box, BoxError

HTTP_PORT = 8080
ADMIN_PORT = 8081
#: admin socket first: `systemctl start` queues a job per unit, one after the other, and a
#: connection to the http socket starts the service at once; started before the admin
#: socket, the service makes systemd refuse it ("already active, refusing"). (The drop-in
#: Wants= of Host.boot makes it certain.)
UNITS = ("sdserve-admin.socket", "sdserve.socket", SERVICE)
CONFIG = "/etc/sdserve/sdserve.toml"
#: numbers the groups of hosts of one pytest process (their namespaces' and veths' names)
_GROUPS = itertools.count()


def sh(*argv: str) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if res.returncode != 0:
        raise BoxError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")


def free_subnet() -> int:
    """A third octet N such that no interface of this machine has an address in 10.77.N.0/24
    (another run of these tests, or anything else, may hold one)."""
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True)
    used = {int(m) for m in re.findall(r"inet 10\.77\.(\d+)\.", out.stdout)}
    start = os.getpid() % 250
    for k in range(250):
        n = (start + k) % 250 + 1
        if n not in used:
            return n
    raise BoxError("every 10.77.N.0/24 is in use")


@dataclass
class Host:
    """One host: its namespace, its veth pair, its box and the sdserve it runs."""

    name: str  # h1, h2, ... (HAProxy's server name)
    netns: str
    veth: str  # the host side; the box side is eth0 in the namespace
    gateway: str  # this machine's address on the veth
    address: str  # the box's
    flavour: str
    workdir: Path
    box: Box | None = None
    drain_delay: float = 0.0
    #: HAProxy's check window, told to sdserve (``lb_check_window``)
    lb_check_window: float = 0.0
    #: whether this host made its namespace and veth pair (and so removes them)
    network: bool = False

    @property
    def netns_path(self) -> Path:
        return Path("/run/netns") / self.netns

    def create_network(self) -> None:
        sh("ip", "netns", "add", self.netns)
        self.network = True
        sh(
            "ip",
            "link",
            "add",
            self.veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            self.netns,
        )
        sh("ip", "addr", "add", f"{self.gateway}/30", "dev", self.veth)
        sh("ip", "link", "set", self.veth, "up")
        sh("ip", "-n", self.netns, "addr", "add", f"{self.address}/30", "dev", "eth0")
        sh("ip", "-n", self.netns, "link", "set", "eth0", "up")
        # nspawn brings lo up only in a namespace of its own making
        sh("ip", "-n", self.netns, "link", "set", "lo", "up")

    def remove_network(self) -> None:
        """Remove what create_network made (never a namespace of the same name it found)."""
        if not self.network:
            return
        self.network = False
        # deleting the namespace deletes its veth end, and with it the pair
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True, check=False)

    def boot(self) -> Box:
        """Boot the box (again, after a kill), install the units and start sdserve."""
        if self.box is not None:
            self.box.stop()
        boxdir = Path(tempfile.mkdtemp(prefix=f"box-{self.name}-", dir=self.workdir))
        self.box = Box.boot(self.flavour, workdir=boxdir, netns=self.netns_path)
        units = shipped_units()
        for unit, port in (("sdserve.socket", HTTP_PORT), ("sdserve-admin.socket", ADMIN_PORT)):
            units[f"{unit}.d/50-host.conf"] = (
                f"[Socket]\nListenStream=\nListenStream={self.address}:{port}\n"
            )
        # the admin socket starts with every start of the service (units/LOADBALANCER.md)
        units[f"{SERVICE}.d/60-admin.conf"] = "[Unit]\nWants=sdserve-admin.socket\n"
        self.box.install_units(units)
        self.configure(self.drain_delay)
        self.box.systemctl("start", *UNITS)
        return self.box

    def configure(self, drain_delay: float) -> None:
        """The service's config file (read at its next start or reload)."""
        self.running.write(
            CONFIG,
            'app = "sdserve.demo:create_app"\nworkers = 2\n'
            f"drain_delay = {drain_delay}\nlb_check_window = {self.lb_check_window}\n",
        )

    @property
    def running(self) -> Box:
        if self.box is None or self.box.proc.poll() is not None:
            raise BoxError(f"{self.name}: its box is not running")
        return self.box

    def command(self, *argv: str) -> list[str]:
        return self.running.command(argv)


@dataclass
class StateChange:
    at: float  # time.monotonic() when the test received it
    server: str
    state: str  # UP or DOWN
    text: str


class HAProxyLog:
    """HAProxy's log, received on a unix datagram socket by a thread; the server state changes
    kept in order, with the time each arrived."""

    PATTERN = re.compile(r"Server hosts/(\w+) is (UP|DOWN)")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.changes: list[StateChange] = []
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            text = data.decode(errors="replace")
            now = time.monotonic()
            with self._cond:
                self.lines.append(text)
                m = self.PATTERN.search(text)
                if m:
                    self.changes.append(StateChange(now, m.group(1), m.group(2), text))
                self._cond.notify_all()

    def mark(self) -> int:
        """A position: pass it to :meth:`wait` to see only the changes after it."""
        with self._cond:
            return len(self.changes)

    def since(self, mark: int) -> list[StateChange]:
        with self._cond:
            return list(self.changes[mark:])

    def wait(self, server: str, state: str, *, after: int, timeout: float) -> StateChange:
        """The first change of ``server`` to ``state`` after the position ``after``."""

        def found() -> StateChange | None:
            for change in self.changes[after:]:
                if change.server == server and change.state == state:
                    return change
            return None

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout=timeout):
                raise TimeoutError(
                    f"HAProxy did not report {server} {state} within {timeout} s; its log:\n"
                    + "".join(self.lines[-20:])
                )
            change = found()
            assert change is not None
            return change

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(timeout=5)


@dataclass(frozen=True)
class Checks:
    """HAProxy's health checks of every server: ``inter``, ``fall`` and ``rise`` as in its
    ``server`` lines, ``timeout check`` as in its defaults (seconds)."""

    inter: float = 0.2
    fall: int = 2
    rise: int = 2
    timeout: float = 0.3

    @property
    def down_window(self) -> float:
        """The longest HAProxy takes from /readyz turning 503 to taking the server out of
        rotation (units/LOADBALANCER.md): up to one ``inter`` until the next check, then
        ``fall`` - 1 more, and the last one may take its whole timeout."""
        return self.inter * self.fall + self.timeout


@dataclass
class HAProxy:
    """An HAProxy process in front of ``hosts``; ``retry`` adds the safe retries."""

    hosts: list[Host]
    workdir: Path
    checks: Checks = field(default_factory=Checks)
    retry: bool = False
    proc: subprocess.Popen[str] | None = None
    log: HAProxyLog | None = None
    port: int = 0

    def config(self, fd: int, log_path: Path) -> str:
        if self.retry:
            retries = (
                "    retries 3\n    option redispatch 1\n    retry-on conn-failure empty-response\n"
            )
        else:
            retries = "    retries 0\n"
        c = self.checks
        servers = "".join(
            f"    server {h.name} {h.address}:{HTTP_PORT} check port {ADMIN_PORT}\n"
            for h in self.hosts
        )
        return (
            "global\n"
            f"    log {log_path} local0 info\n"
            "    maxconn 4096\n"
            "defaults\n"
            "    mode http\n"
            "    timeout connect 2s\n"
            "    timeout client 30s\n"
            "    timeout server 30s\n"
            "    timeout http-keep-alive 10s\n"
            f"    timeout check {int(c.timeout * 1000)}ms\n"
            "frontend www\n"
            f"    bind fd@{fd}\n"
            "    default_backend hosts\n"
            "backend hosts\n"
            "    log global\n"
            "    balance roundrobin\n"
            f"{retries}"
            "    option httpchk GET /readyz\n"
            "    http-check expect status 200\n"
            f"    default-server inter {int(c.inter * 1000)}ms fall {c.fall} rise {c.rise}\n"
            f"{servers}"
        )

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.port = listener.getsockname()[1]
        log_path = self.workdir / f"haproxy-{time.monotonic_ns()}.log.sock"
        self.log = HAProxyLog(log_path)
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(self.config(listener.fileno(), log_path))
        check = subprocess.run(
            ["haproxy", "-c", "-q", "-f", str(cfg)],
            capture_output=True,
            text=True,
            check=False,
            pass_fds=[listener.fileno()],
        )
        if check.returncode != 0:
            listener.close()
            raise BoxError(f"haproxy -c: {check.stdout}{check.stderr}\n{cfg.read_text()}")
        self.proc = subprocess.Popen(
            ["haproxy", "-db", "-f", str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            pass_fds=[listener.fileno()],
            start_new_session=True,
        )
        listener.close()  # HAProxy holds it now

    def stop(self) -> str:
        """Stop HAProxy (SIGTERM, by its PID); what it printed."""
        out = ""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                out, _ = self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, _ = self.proc.communicate()
        if self.log is not None:
            self.log.close()
        return out

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


@contextlib.contextmanager
def haproxy(hosts: list[Host], workdir: Path, *, retry: bool = False) -> Iterator[HAProxy]:
    for h in hosts:  # every host serves (systemctl start returns on READY=1)
        h.running.systemctl("start", *UNITS)
    proxy = HAProxy(hosts, workdir, retry=retry)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@contextlib.contextmanager
def hosts_in_namespaces(
    flavour: str, n: int, drain_delay: float, lb_check_window: float
) -> Iterator[list[Host]]:
    workdir = Path(tempfile.mkdtemp(prefix="sds-hosts-"))
    subnet = free_subnet()
    tag = f"{os.getpid() % 100_000}x{next(_GROUPS)}"  # interface names: 15 characters at most
    hosts = [
        Host(
            name=f"h{k + 1}",
            netns=f"sds-h{k + 1}-{tag}",
            veth=f"sdsh{k + 1}-{tag}",
            gateway=f"10.77.{subnet}.{4 * k + 1}",
            address=f"10.77.{subnet}.{4 * k + 2}",
            flavour=flavour,
            workdir=workdir,
            drain_delay=drain_delay,
            lb_check_window=lb_check_window,
        )
        for k in range(n)
    ]
    try:
        for h in hosts:
            h.create_network()
            h.boot()
        yield hosts
    finally:
        for h in hosts:
            if h.box is not None:
                h.box.stop()
            h.remove_network()
        shutil.rmtree(workdir, ignore_errors=True)
