"""Start and stop the faulty server (:mod:`tests.drill.faulty`) as a real process."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

START_TIMEOUT = 20.0


@dataclass
class FaultyServer:
    proc: subprocess.Popen[str]
    port: int
    records: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @classmethod
    def start(cls, *args: str, module: str = "tests.drill.faulty") -> FaultyServer:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("PORT "):
            proc.kill()
            proc.wait()
            raise RuntimeError(f"faulty server did not start: {line!r}")
        return cls(proc, int(line.split()[1]))

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> dict[str, Any]:
        """SIGTERM, then the records the server wrote on its way out."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=20)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        assert self.proc.returncode == 0, out
        assert lines, out
        self.records = json.loads(lines[-1])
        return self.records

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
