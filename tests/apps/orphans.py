"""An application that leaves orphans behind, for the PID 1 tests (``tests/test_pid1.py``,
``tests/system/test_container.py``).

- ``GET /``: ``ok``;
- ``POST /orphans?n=N&status=S``: starts a helper that forks N children and exits once they
  are set up; each child, re-parented to PID 1 (or the nearest subreaper) when the helper
  exits, gets its parent-death signal then and exits with status S. Answers their PIDs,
  one per line. Unless their new parent reaps them, they stay zombies.
- ``POST /stray``: a process that, once orphaned (adopted by the supervisor, a subreaper),
  says ``READY=1`` on the worker's ``NOTIFY_SOCKET`` as a worker would, and waits for a
  signal. Answers its PID once it has said so.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

HELPER = """
import ctypes, os, signal, sys
n, status = (int(a) for a in sys.argv[1:])
helper = os.getpid()
libc = ctypes.CDLL(None, use_errno=True)
ready_r, ready_w = os.pipe()
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)  # the app reads the helper's stdout to its end
        os.dup2(null, 2)
        signal.signal(signal.SIGUSR1, lambda *_: os._exit(status))
        if libc.prctl(1, signal.SIGUSR1, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            os._exit(99)
        if os.getppid() != helper:  # the helper is gone already
            os._exit(status)
        os.close(ready_w)  # set up
        while True:
            signal.pause()
    print(pid, flush=True)
os.close(ready_w)
os.read(ready_r, 1)  # end of file once every child has closed its end: all set up
"""


STRAY = """
import os, signal, select, socket
helper = os.getpid()
said_r, said_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(said_r)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    gone = os.pidfd_open(helper)
    os.write(said_w, b"x")  # the helper may exit now
    os.close(said_w)
    select.select([gone], [], [])  # it has: this process is adopted
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", address)
    while True:
        signal.pause()
os.close(said_w)
os.read(said_r, 1)
print(pid, flush=True)
"""


async def stray(request: web.Request) -> web.Response:
    helper = await asyncio.create_subprocess_exec(
        sys.executable, "-c", STRAY, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await helper.communicate()
    return web.Response(text=out.decode())


async def index(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def orphans(request: web.Request) -> web.Response:
    n = int(request.query.get("n", "1"))
    status = int(request.query.get("status", "0"))
    helper = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HELPER, str(n), str(status), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await helper.communicate()
    if helper.returncode != 0:
        raise web.HTTPInternalServerError(text=f"the helper exited {helper.returncode}\n")
    return web.Response(text=out.decode())


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_post("/orphans", orphans)
    app.router.add_post("/stray", stray)
    return app
