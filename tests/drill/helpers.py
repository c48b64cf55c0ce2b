"""Small real processes the action tests act on."""

from __future__ import annotations

import select
import subprocess
import sys

# Counts SIGHUPs; prints "ready" once the handler is in place, and the count on SIGTERM.
SIGNAL_COUNTER = """
import signal, sys
count = 0
def hup(*_):
    global count
    count += 1
signal.signal(signal.SIGHUP, hup)
signal.signal(signal.SIGTERM, lambda *_: (print(count, flush=True), sys.exit(0)))
print("ready", flush=True)
while True:
    signal.pause()
"""

# Starts two children, prints their PIDs, then reports how the first one ended.
WORKER_PARENT = """
import subprocess, sys
kids = [subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
        for _ in range(2)]
print(" ".join(str(k.pid) for k in kids), flush=True)
rc = kids[0].wait()
print(rc, flush=True)
kids[1].kill()
kids[1].wait()
"""


def spawn_python(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )


def read_line(proc: subprocess.Popen[str], timeout: float = 20.0) -> str:
    """One line from the child's stdout, waiting at most ``timeout``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError("the child wrote nothing")
    return proc.stdout.readline().strip()


def finish(proc: subprocess.Popen[str]) -> None:
    """Kill the child if it still runs, reap it and close its pipe."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
