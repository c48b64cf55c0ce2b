"""units/DEPLOY.md, followed literally in a fresh box on systemd 252 and 254.

Each ```sh block after a ``<!-- guide:step NAME -->`` comment is run as it is written, in
order, as root in the box (``sh -e``), and what the guide says it does is checked after it.
One step is replaced: ``install`` (``pip install 'sdserve[postgres,redis]'``), since the box
has no network. Its stand-in does what pip would: it puts sdserve (the checkout under test,
bind-mounted at /opt/sdserve-src) and the dependencies the box already has (/opt/venv, built
from pyproject.toml) on the new venv's path, and writes ``bin/sdserve`` as pip's console
script. The test checks that the guide's block is still that one line, so the stand-in cannot
drift from it silently.
"""

from __future__ import annotations

import itertools
import json
import re
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from .testbed import Box, JournalEntry, message

GUIDE = Path(__file__).resolve().parents[2] / "units" / "DEPLOY.md"
STEPS = [
    "prerequisites",
    "app",
    "venv",
    "install",
    "config",
    "credential",
    "units",
    "start",
    "try",
    "update",
    "logs",
]
INSTALL = "/srv/myapp/venv/bin/pip install 'sdserve[postgres,redis]'\n"
INSTALL_STAND_IN = """\
site=$(/srv/myapp/venv/bin/python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
deps=$(echo /opt/venv/lib/python3*/site-packages)
printf '%s\\n' /opt/sdserve-src "$deps" > "$site/sdserve-from-the-box.pth"
cat > /srv/myapp/venv/bin/sdserve <<'EOF'
#!/srv/myapp/venv/bin/python3
import sys

from sdserve.cli import main

sys.exit(main())
EOF
chmod 0755 /srv/myapp/venv/bin/sdserve
"""
PASSWORD = "correct horse battery staple"
SERVICE = "myapp.service"
CONFIG = "/etc/myapp/myapp.toml"


def guide_steps(text: str) -> list[tuple[str, str]]:
    """The (name, script) of every marked ```sh block, in order."""
    found = re.findall(r"<!-- guide:step (\S+) -->\n```sh\n(.*?)^```$", text, re.S | re.M)
    return [(name, script) for name, script in found]


def test_the_guide_marks_its_steps() -> None:
    steps = guide_steps(GUIDE.read_text())
    assert [name for name, _ in steps] == STEPS
    assert dict(steps)["install"] == INSTALL
    # every ```sh block is a step: none is left out of the test
    assert GUIDE.read_text().count("```sh\n") == len(STEPS)


def test_deploy_your_own_app(box: Box, record: Callable[[str, str], None]) -> None:
    steps = guide_steps(GUIDE.read_text())
    assert [name for name, _ in steps] == STEPS
    seen: dict[str, str] = {}
    took: dict[str, float] = {}
    cursor = ""
    started = time.monotonic()
    for name, written in steps:
        script = written
        if name == "install":
            assert written == INSTALL
            script = INSTALL_STAND_IN
        t0 = time.monotonic()
        if name == "try":
            cursor = box.cursor()  # before the guide's first request
        res = box.run(["sh", "-e", "-c", script], check=False, timeout=180)
        if name == "update" and res.returncode == 0:
            # the access log reaches the journal a moment after the answer (its own thread
            # writes in batches), v1's line possibly after this step began: the next step
            # reads both, a person a while later; wait for the second since "try"
            box.wait_journal(
                second_access_line(),
                cursor=cursor,
                unit=SERVICE,
                what="the access log lines of the requests to v1 and v2",
            )
        took[name] = time.monotonic() - t0
        assert res.returncode == 0, (
            f"step {name} exited {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}\n"
            + box.run(["journalctl", "--no-pager", "-n", "40"], check=False).stdout
        )
        check_step(box, name, res.stdout, res.stderr, seen)
    total = time.monotonic() - started
    record(
        "units/DEPLOY.md start to finish",
        f"{total:.1f} s (" + ", ".join(f"{n} {s:.1f}" for n, s in took.items()) + ")",
    )


def second_access_line() -> Callable[[JournalEntry], bool]:
    """A journal match that holds for the second access log line it is shown."""
    count = itertools.count(1)

    def match(entry: JournalEntry) -> bool:
        return entry.get("SDSERVE_PHASE") == "access" and next(count) == 2

    return match


def check_step(box: Box, name: str, out: str, err: str, seen: dict[str, str]) -> None:
    """What the guide says each step does (``seen`` keeps what later steps compare with)."""
    if name == "app":
        box.run(["python3", "-c", "import ast; ast.parse(open('/srv/myapp/myapp.py').read())"])
    elif name == "venv":
        box.run(["test", "-x", "/srv/myapp/venv/bin/pip"])
    elif name == "install":
        res = box.run(["/srv/myapp/venv/bin/sdserve", "units", "--help"])
        assert "--venv DIR" in res.stdout
    elif name == "config":
        shown = box.run(["/srv/myapp/venv/bin/sdserve", "config", "--config", CONFIG]).stdout
        cfg = tomllib.loads(shown)
        assert (cfg["workers"], cfg["access_log"], cfg["shutdown_timeout"]) == (2, True, 20.0)
        assert cfg["checks"]["disk"]["path"] == "/srv/myapp"
    elif name == "credential":
        mode = box.run(["stat", "-c", "%a %U", "/etc/myapp/dbpass"]).stdout.split()
        assert mode == ["600", "root"]
    elif name == "units":
        assert out.split() == [
            "/etc/systemd/system/myapp.socket",
            "/etc/systemd/system/myapp.service",
            "/etc/systemd/system/myapp-admin.socket",
        ]
        assert err == ""  # no note: nothing is missing
        verify = box.run(["systemd-analyze", "verify", SERVICE], check=False)
        assert verify.returncode == 0, verify.stderr
    elif name == "start":
        props = box.show(
            SERVICE, "ActiveState", "WorkingDirectory", "ExecStart", "MainPID", "TimeoutStopUSec"
        )
        seen["pid"] = props["MainPID"]
        assert props["ActiveState"] == "active"
        assert props["WorkingDirectory"] == "/srv/myapp"
        assert "path=/srv/myapp/venv/bin/sdserve" in props["ExecStart"]
        assert "--config /etc/myapp/myapp.toml" in props["ExecStart"]
        # sized from the file: 0 drain delay + 20 shutdown + 5 cleanup + 5 margin
        assert props["TimeoutStopUSec"] == "30s"
        for unit in ("myapp.socket", "myapp-admin.socket"):
            assert box.show(unit, "ActiveState", "UnitFileState") == {
                "ActiveState": "active",
                "UnitFileState": "enabled",
            }
    elif name == "try":
        assert out.startswith("hello from myapp v1\n"), out
        lines = out.splitlines()
        for check in ("phase", "database", "disk"):  # disk: [checks] of the config file
            assert any(line.startswith(f"[+]{check} ok") for line in lines), out
        assert lines[-1] == "readyz check passed", out
        # the service got the password: the check's output, with details, on the admin socket
        body = box.run(["curl", "-sS", "http://127.0.0.1:8081/readyz?format=json"]).stdout
        database = json.loads(body)["checks"]["database:responseTime"][0]
        assert database["output"] == f"password of {len(PASSWORD)} characters"
        assert database["status"] == "pass"
    elif name == "update":
        assert out == "hello from myapp v2\n"
        # a reload, not a restart: the same main process, new workers
        props = box.show(SERVICE, "ActiveState", "MainPID")
        assert props == {"ActiveState": "active", "MainPID": seen["pid"]}
        phases = [e.get("SDSERVE_PHASE") for e in box.journal(unit=SERVICE)]
        assert "reloaded" in phases, [message(e) for e in box.journal(unit=SERVICE)][-20:]
    elif name == "logs":
        # the two requests of the guide on the main socket, v1's and v2's, from two workers
        lines = out.splitlines()
        assert len(lines) == 2, out
        assert all('"GET /" 200' in line for line in lines), out
        pids = {line.split("]: ", 1)[0].rsplit("[", 1)[-1] for line in lines}
        assert len(pids) == 2, out
