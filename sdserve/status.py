"""``sdserve status``: the service at a glance, as a person wants it at 3 a.m.

It asks the running service itself, twice:

- its **control socket** (:mod:`sdserve.control`, ``status``): the phase (starting,
  running, reloading, stopping), the generation, each worker (pid, generation, state,
  age, what it says), the last reload and the sockets;
- its **admin socket** (the ``admin`` socket it listens on, or ``--admin``): ``/livez``,
  ``/readyz`` and ``/startupz`` in their JSON form, so every check is shown with its
  status, latency and output, exactly as a load balancer or Kubernetes sees them.

The PID is the one given, else ``$MAINPID``, else the ``MainPID`` of ``--unit``
(``sdserve.service`` by default) from ``systemctl show``.

Exit status: 0 ready; 1 running but not ready (starting, a check failing, stopping);
2 the service could not be asked (usage, no control socket); 3 not running.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from .control import ReloadError, request_status

NOT_RUNNING = 3
UNREACHABLE = 2
NOT_READY = 1


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _connection(address: str, timeout: float) -> http.client.HTTPConnection:
    """An HTTP connection to ``HOST:PORT``, ``[V6]:PORT`` or ``unix:PATH``."""
    if address.startswith("unix:"):
        return _UnixHTTPConnection(address[len("unix:") :], timeout)
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def probe(address: str, path: str, timeout: float) -> tuple[int, dict[str, Any]]:
    """(HTTP status, health+json report) of one health endpoint."""
    conn = _connection(address, timeout)
    try:
        conn.request("GET", f"{path}?format=json", headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", errors="replace")
    finally:
        conn.close()
    try:
        report: dict[str, Any] = json.loads(body)
    except ValueError:
        report = {"status": "fail", "output": body.strip()[:200], "checks": {}}
    return resp.status, report


def main_pid(unit: str) -> int:
    """The MainPID of ``unit`` (0 when it is not running)."""
    try:
        out = subprocess.run(
            ["systemctl", "show", "--property=MainPID", "--value", unit],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ReloadError(f"cannot ask systemd for the PID of {unit}: {exc}") from exc
    text = out.stdout.strip()
    if out.returncode != 0 or not text.isdigit():
        raise ReloadError(f"systemd does not know {unit}: {out.stderr.strip() or text}")
    return int(text)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]


_MARK = {"pass": "ok", "warn": "WARN", "fail": "FAIL"}


def render(service: dict[str, Any], health: dict[str, tuple[int, dict[str, Any]]]) -> list[str]:
    """The report's lines."""
    lines = []
    ready = service.get("workers_ready")
    head = f"sdserve {service.get('version', '?')}  pid {service['pid']}  {service['mode']}"
    head += f"  phase {service['phase']}"
    if "generation" in service:
        head += f"  generation {service['generation']}"
        if service.get("incoming"):
            head += f" (reloading to {service['incoming']})"
    lines.append(head)
    readyz = health.get("readyz")
    if readyz is not None:
        verdict = "READY" if readyz[0] == 200 else "NOT READY"
        lines.append(f"readiness: {verdict} (/readyz {readyz[0]})")
    if service.get("status"):
        lines.append(f"status: {service['status']}")
    if service.get("last_reload") and service["last_reload"] not in service.get("status", ""):
        lines.append(f"last reload: {service['last_reload']}")
    sockets = ", ".join(f"{s['name']}={s['address']}" for s in service.get("sockets", []))
    lines.append(f"sockets: {sockets}")
    if "workers" in service:
        lines.append("")
        lines.append(f"workers: {ready}/{service['workers_wanted']} ready")
        rows = [["ID", "PID", "GEN", "STATE", "AGE", "READY FOR", "SAYS"]]
        for w in service["workers"]:
            rows.append(
                [
                    str(w["id"]),
                    str(w["pid"]),
                    str(w["generation"]),
                    w["state"],
                    _age(w["age"]),
                    _age(w["ready_for"]),
                    w["status"][:100],
                ]
            )
        lines += _table(rows)
        if service.get("failed_starts"):
            lines.append(
                f"  {service['failed_starts']} failed start(s) in a row; "
                f"last: {service['last_failure']}"
            )
    else:
        lines.append(f"up {_age(service.get('age'))}, ready for {_age(service.get('ready_for'))}")
    for endpoint in ("readyz", "startupz", "livez"):
        if endpoint not in health:
            continue
        code, report = health[endpoint]
        if endpoint != "readyz":
            # the service's own liveness and its start: one line, unless failing
            failing = [
                f"{key.partition(':')[0]}: {item.get('output', '')}"
                for key, items in report.get("checks", {}).items()
                for item in items
                if item.get("status") == "fail"
            ]
            text = f"{endpoint}: {report.get('status', '?')} ({code})"
            lines.append(f"{text}; " + "; ".join(failing)[:160] if failing else text)
            continue
        lines.append("")
        lines.append(f"{endpoint}: {report.get('status', '?')} ({code})")
        rows = [["", "CHECK", "TYPE", "TOOK", "OUTPUT"]]
        for key, items in report.get("checks", {}).items():
            for item in items:
                took = item.get("observedValue")
                unit = item.get("observedUnit", "")
                rows.append(
                    [
                        _MARK.get(item.get("status", ""), "?"),
                        key.partition(":")[0],
                        item.get("componentType", ""),
                        "-" if took is None else f"{took:.1f}{unit}",
                        str(item.get("output", ""))[:120],
                    ]
                )
        if len(rows) > 1:
            lines += _table(rows)
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "pid", nargs="?", type=int, help="the service's main PID (default: $MAINPID, or --unit's)"
    )
    parser.add_argument(
        "--unit",
        default="sdserve.service",
        help="the service unit whose MainPID to ask for (default: sdserve.service)",
    )
    parser.add_argument(
        "--admin",
        metavar="ADDRESS",
        help="the admin socket (HOST:PORT, [V6]:PORT, unix:PATH; default: the service's "
        "socket named admin)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds per question (default: 5)"
    )
    parser.epilog = (
        "exit status: 0 ready, 1 running but not ready, 2 could not ask the service, 3 not running"
    )


def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    pid = args.pid
    try:
        if pid is None and os.environ.get("MAINPID", "").isdigit():
            pid = int(os.environ["MAINPID"])
        if pid is None:
            pid = main_pid(args.unit)
            if pid == 0:
                print(f"sdserve status: {args.unit} is not running", file=sys.stderr)
                return NOT_RUNNING
        service = request_status(pid, timeout=args.timeout)
    except ReloadError as exc:
        print(f"sdserve status: {exc}", file=sys.stderr)
        return UNREACHABLE
    admin = args.admin or next(
        (s["address"] for s in service.get("sockets", []) if s["name"] == "admin"), None
    )
    health: dict[str, tuple[int, dict[str, Any]]] = {}
    problem = ""
    if admin is None:
        problem = "no admin socket: checks not shown (add one: --admin-bind, or an admin .socket)"
    else:
        for endpoint in ("readyz", "livez", "startupz"):
            try:
                health[endpoint] = probe(admin, f"/{endpoint}", args.timeout)
            except (OSError, http.client.HTTPException) as exc:
                problem = f"the admin socket {admin} did not answer /{endpoint}: {exc}"
                break
    if args.json:
        out(json.dumps({"service": service, "health": health, "problem": problem}, indent=2))
    else:
        for line in render(service, health):
            out(line)
        if problem:
            out("")
            out(problem)
    readyz = health.get("readyz")
    if readyz is not None:
        return 0 if readyz[0] == 200 else NOT_READY
    ready = service.get("workers_ready")
    phase = service.get("phase")
    return 0 if (ready or phase == "ready") and phase not in ("stopping", "starting") else NOT_READY
