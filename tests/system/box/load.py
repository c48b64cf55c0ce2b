"""A bounded HTTP load that runs inside a test box and counts every failure by class.

Standard library only: it runs on the box's own python3. It never retries: a request that
fails is counted once, and the client moves on to its next request. Two kinds of clients:

* ``keepalive``: one HTTP/1.1 connection reused for request after request; it opens a new
  connection only when the server said ``Connection: close`` or after a failure;
* ``fresh``: a new connection for every request, closed after the response;
* ``paced``: keep-alive clients that pause ``--pause`` seconds between requests, so that
  their connection is idle at times (as a browser's is): a drain must give such a
  connection its grace instead of closing it under the client.

The load stops at the first of: end of standard input (the test's signal), ``--max-seconds``,
``--max-requests``. Once every client has had one answer it prints ``started`` on stdout;
at the end it prints one JSON object with the totals.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Tally:
    """What one client saw. Only its own thread writes it until the end."""

    kind: str
    requests: int = 0
    ok: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    longest: float = 0.0
    connections: int = 0
    closed_by_server: int = 0

    def fail(self, cls: str, detail: str) -> None:
        self.failures[cls] = self.failures.get(cls, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f"{time.monotonic():.3f} {self.kind} {cls}: {detail}")


def classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "remote_disconnected"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, BrokenPipeError):
        return "broken_pipe"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, http.client.IncompleteRead):
        return "incomplete_read"
    if isinstance(exc, http.client.HTTPException):
        return "bad_http"
    if isinstance(exc, OSError):
        return f"oserror_{exc.errno}"
    return type(exc).__name__


class Budget:
    """The shared bound on the number of requests and on time."""

    def __init__(self, max_requests: int, max_seconds: float) -> None:
        self._lock = threading.Lock()
        self._left = max_requests
        self.deadline = time.monotonic() + max_seconds
        self.stop = threading.Event()

    def take(self) -> bool:
        if self.stop.is_set() or time.monotonic() >= self.deadline:
            return False
        with self._lock:
            if self._left <= 0:
                self.stop.set()  # the load ends here, not at its deadline
                return False
            self._left -= 1
            return True


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str
    timeout: float
    pause: float


def client(target: Target, budget: Budget, tally: Tally, first: threading.Barrier) -> None:
    kind, path = tally.kind, target.path
    conn: http.client.HTTPConnection | None = None
    announced = False
    while budget.take():
        if conn is None:
            conn = http.client.HTTPConnection(target.host, target.port, timeout=target.timeout)
            tally.connections += 1
        current = conn
        headers = {"Connection": "close"} if kind == "fresh" else {}
        started = time.monotonic()
        tally.requests += 1
        try:
            current.request("GET", path, headers=headers)
            resp = current.getresponse()
            resp.read()
            if resp.status != 200:
                tally.fail(f"status_{resp.status}", path)
            else:
                tally.ok += 1
            if kind == "fresh" or resp.will_close:
                if kind != "fresh":
                    tally.closed_by_server += 1
                current.close()
                conn = None
        except Exception as exc:  # every failure is counted, by class
            tally.fail(classify(exc), repr(exc))
            current.close()
            conn = None
        tally.longest = max(tally.longest, time.monotonic() - started)
        if kind == "paced":
            # the client's own pacing (idle time on its connection), not synchronisation;
            # a stop of the load cuts it short
            budget.stop.wait(target.pause)
        if not announced:
            announced = True
            with contextlib.suppress(threading.BrokenBarrierError):
                first.wait(timeout=max(0.0, budget.deadline - time.monotonic()))
    if not announced:
        first.abort()
    if conn is not None:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--path", default="/")
    p.add_argument("--keepalive", type=int, default=4, help="keep-alive clients")
    p.add_argument("--fresh", type=int, default=4, help="new-connection-per-request clients")
    p.add_argument("--paced", type=int, default=0, help="keep-alive clients that pause")
    p.add_argument("--pause", type=float, default=0.2, help="pause of the paced clients (s)")
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--timeout", type=float, default=30.0, help="per-request socket timeout")
    args = p.parse_args(argv)

    socket.setdefaulttimeout(args.timeout)
    budget = Budget(args.max_requests, args.max_seconds)
    tallies = [Tally("keepalive") for _ in range(args.keepalive)]
    tallies += [Tally("fresh") for _ in range(args.fresh)]
    tallies += [Tally("paced") for _ in range(args.paced)]
    first = threading.Barrier(len(tallies) + 1)
    target = Target(args.host, args.port, args.path, args.timeout, args.pause)
    threads = [
        threading.Thread(target=client, args=(target, budget, t, first), daemon=True)
        for t in tallies
    ]
    t0 = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        first.wait(timeout=args.max_seconds)
        print("started", flush=True)
    except threading.BrokenBarrierError:
        print("not-started", flush=True)

    # Standard input closes when the test is done; the budget's deadline bounds the wait.
    def watch_stdin() -> None:
        sys.stdin.read()
        budget.stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    budget.stop.wait(timeout=max(0.0, budget.deadline - time.monotonic()))
    budget.stop.set()
    for thread in threads:
        thread.join(timeout=args.timeout + 5)
    hung = sum(thread.is_alive() for thread in threads)

    failures: dict[str, int] = {}
    for t in tallies:
        for cls, n in t.failures.items():
            failures[cls] = failures.get(cls, 0) + n
    by_kind = {
        kind: {
            "requests": sum(t.requests for t in tallies if t.kind == kind),
            "failed": sum(sum(t.failures.values()) for t in tallies if t.kind == kind),
            "connections": sum(t.connections for t in tallies if t.kind == kind),
            "closed_by_server": sum(t.closed_by_server for t in tallies if t.kind == kind),
        }
        for kind in ("keepalive", "fresh", "paced")
    }
    report = {
        "requests": sum(t.requests for t in tallies),
        "ok": sum(t.ok for t in tallies),
        "failed": sum(failures.values()),
        "failures": failures,
        "longest_s": round(max((t.longest for t in tallies), default=0.0), 4),
        "seconds": round(time.monotonic() - t0, 3),
        "hung_clients": hung,
        "by_kind": by_kind,
        "examples": [e for t in tallies for e in t.examples][:20],
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
