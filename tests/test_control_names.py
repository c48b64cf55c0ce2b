"""The control socket's name carries the PID namespace: services in containers that share a
network namespace but not their PIDs (each a PID 1 of its own, or the same PID by chance)
must not collide on ``@sdserve/PID/control``; a service started by an older sdserve, which
still listens on that name, is reached too."""

from __future__ import annotations

import os
import socket
import threading

from sdserve.control import (
    control_address,
    legacy_control_address,
    pid_namespace,
    request_status,
)


def test_the_name_differs_between_pid_namespaces() -> None:
    assert control_address(1, "4026531836") == "\0sdserve/1/4026531836/control"
    assert control_address(1, "4026531836") != control_address(1, "4026532001")
    # the caller's own namespace by default, read from /proc
    inode = os.stat("/proc/self/ns/pid").st_ino
    assert pid_namespace() == str(inode)
    assert control_address(7) == f"\0sdserve/7/{inode}/control"
    assert control_address(7, "") == legacy_control_address(7) == "\0sdserve/7/control"


def test_a_service_on_the_old_name_is_still_reached() -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(legacy_control_address(os.getpid()))
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.makefile("r").readline()
            conn.sendall(b'status {"phase": "serving"}\n')

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        assert request_status(os.getpid(), timeout=10) == {"phase": "serving"}
    finally:
        thread.join(timeout=10)
        server.close()
