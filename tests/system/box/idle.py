"""Idle keep-alive connections, held inside a test box while the test acts on the service.

Standard library only. It opens ``--connections`` connections, sends one request on each
and prints ``idle N``. Then, for each line on standard input:

* ``reuse``: one more request on every connection; prints ``{"ok": N, "failed": {...}}``
  (a connection that fails is not used again);
* ``closed``: waits up to ``--timeout`` seconds for each connection to be closed by the
  server (EOF or a reset); prints ``{"closed": N, "open": M}``.

End of standard input ends it.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time

REQUEST = b"GET / HTTP/1.1\r\nHost: box\r\n\r\n"


def read_response(sock: socket.socket, timeout: float) -> bytes:
    """One response with a Content-Length body; raises on EOF or timeout."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("eof")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("eof in body")
        body += chunk
    if b"connection: close" in head.lower():
        raise ConnectionError("the server said Connection: close")
    return head


def closed(sock: socket.socket, deadline: float) -> bool:
    ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
    if not ready:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args()
    conns = []
    for _ in range(args.connections):
        sock = socket.create_connection(("127.0.0.1", args.port), timeout=args.timeout)
        sock.sendall(REQUEST)
        read_response(sock, args.timeout)
        conns.append(sock)
    print(f"idle {len(conns)}", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "reuse":
            ok, failed = 0, dict[str, int]()
            for sock in list(conns):
                try:
                    sock.sendall(REQUEST)
                    read_response(sock, args.timeout)
                    ok += 1
                except OSError as exc:
                    key = type(exc).__name__ + ": " + str(exc)
                    failed[key] = failed.get(key, 0) + 1
                    conns.remove(sock)
                    sock.close()
            print(json.dumps({"ok": ok, "failed": failed}), flush=True)
        elif command == "closed":
            deadline = time.monotonic() + args.timeout
            n = sum(closed(sock, deadline) for sock in conns)
            print(json.dumps({"closed": n, "open": len(conns) - n}), flush=True)
    for sock in conns:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
