"""Errors that say what to fix (issue 13): each bad input, through the real command line.

Every case runs ``python -m sdserve`` as a process and checks its exit status and the
line (or the application's traceback) that it prints.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pytest

from sdserve.config import MAX_WORKERS
from sdserve.exitcodes import ExitCode
from tests.conftest import ROOT

#: a host name that never resolves (RFC 6761)
UNRESOLVABLE = "no-such-host.invalid"


def _env(**extra: str) -> dict[str, str]:
    """A clean environment: nothing of the caller's LISTEN_*, NOTIFY_SOCKET or SDSERVE_*;
    this tree first on the path (the subprocess imports the sdserve under test)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": path, **extra}


def _run(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, python: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``python -m sdserve ARGS`` to its exit (bounded)."""
    return subprocess.run(
        [sys.executable, *python, "-m", "sdserve", *args],
        cwd=cwd,
        env=env if env is not None else _env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _until_ready(
    argv: list[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> tuple[str, int]:
    """Run ``argv`` until it logs that it is ready (or exits), then stop it: its log up to
    there, and its pid."""
    env = env if env is not None else _env()
    with subprocess.Popen(argv, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        lines = []
        try:
            for line in proc.stderr:  # bounded: the process logs "ready" or exits
                lines.append(line)
                if "ready after" in line:
                    break
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return "".join(lines), proc.pid


def _serve(*args: str, cwd: Path = ROOT) -> str:
    """``sdserve run ARGS`` until it is ready (or exits); returns its log, stopped after."""
    argv = [sys.executable, "-m", "sdserve", "run", *args, "--workers", "0", "--log", "stderr"]
    return _until_ready(argv, cwd=cwd)[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _bound(log: str) -> list[str]:
    """The addresses of the "sockets bound" line, sorted."""
    bound = re.search(r"sockets bound: (.*?) SDSERVE_PHASE", log)
    assert bound is not None, log
    return sorted(item.split("=")[1].split(" ")[0] for item in bound.group(1).split(", "))


def _problems(stderr: str) -> list[str]:
    """The problems of a ConfigError as printed: one line each."""
    return [line[4:] for line in stderr.splitlines() if line.startswith("  - ")]


# -- 1. addresses --------------------------------------------------------------------------


def test_a_bare_port_binds_the_loopback_and_host_names_resolve() -> None:
    port = _free_port()
    log = _serve("sdserve.demo:create_app", "--bind", str(port))
    assert f"sockets bound: http=127.0.0.1:{port} (fd 3)" in log, log

    port = _free_port()
    log = _serve("sdserve.demo:create_app", "--bind", f"localhost:{port}")
    infos = socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)
    expected = sorted(
        {f"[{a[0]}]:{port}" if fam == socket.AF_INET6 else f"{a[0]}:{port}" for fam, *_, a in infos}
    )
    assert _bound(log) == expected, log  # every address localhost resolves to, each once

    done = _run("run", "sdserve.demo:create_app", "--bind", f"{UNRESOLVABLE}:{port}")
    assert done.returncode == ExitCode.CONFIG, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert (
        f"bind {UNRESOLVABLE}:{port}: the host name {UNRESOLVABLE!r} does not resolve" in (lines[0])
    )


HOSTS = "127.0.0.1 both.test\n::1 both.test\n"


@pytest.mark.parametrize("ipv6", [True, False])
def test_a_host_name_binds_each_address_it_has(tmp_path: Path, ipv6: bool) -> None:
    """In network and mount namespaces of its own: a name with an IPv4 and an IPv6 address
    (its own /etc/hosts), on a loopback with IPv6, then without (as in many containers)."""
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS)
    port = _free_port()
    setup = f"mount --bind {hosts} /etc/hosts && ip link set lo up"
    if not ipv6:
        setup += " && echo 1 > /proc/sys/net/ipv6/conf/lo/disable_ipv6"
    argv = ["unshare", "-mn", "/bin/sh", "-c", setup + ' && exec "$0" "$@"', sys.executable]
    argv += ["-m", "sdserve", "run", "sdserve.demo:create_app", "--bind", f"both.test:{port}"]
    argv += ["--workers", "0", "--log", "stderr"]
    env = _env(PATH="/usr/sbin:/usr/bin:/sbin:/bin")
    log, _ = _until_ready(argv, env=env)
    if log.startswith("unshare:"):  # not root, or no user namespaces in this sandbox
        pytest.skip(f"no namespaces here: {log.strip()}")
    if ipv6:
        assert _bound(log) == [f"127.0.0.1:{port}", f"[::1]:{port}"], log
        assert "left out" not in log
    else:
        assert _bound(log) == [f"127.0.0.1:{port}"], log
        assert (
            f"bind both.test:{port}: left out, this host does not have it: cannot bind "
            f"[::1]:{port}: cannot assign requested address (EADDRNOTAVAIL)"
        ) in log, log


def test_help_says_what_a_bare_port_means() -> None:
    done = _run("run", "--help")
    assert done.returncode == 0
    assert "PORT (127.0.0.1:PORT)" in " ".join(done.stdout.split())


# -- 2, 3, 4. the application ----------------------------------------------------------------


FACTORY_RAISES = """\
import os
from aiohttp import web

def database_url():
    return os.environ["DATABASE_URL"]

def create_app():
    database_url()
    return web.Application()
"""

IMPORT_RAISES = """\
import os
DATABASE_URL = os.environ["DATABASE_URL"]

def create_app():
    pass
"""


@pytest.mark.parametrize(
    ("source", "line", "reason"),
    [
        (FACTORY_RAISES, 5, "the factory raised KeyError: 'DATABASE_URL'"),
        (IMPORT_RAISES, 2, "importing badapp failed: KeyError: 'DATABASE_URL'"),
    ],
)
def test_the_applications_error_is_its_own_traceback_once(
    tmp_path: Path, source: str, line: int, reason: str
) -> None:
    app = tmp_path / "badapp.py"
    app.write_text(source)
    done = _run("run", "badapp:create_app", "--workers", "0", "--log", "stderr", cwd=tmp_path)
    assert done.returncode == ExitCode.STARTUP, done.stderr
    log = done.stderr
    assert f"start failed: app 'badapp:create_app': {reason} (at {app}, line {line})" in log, log
    assert "KeyError('DATABASE_URL')" not in log  # not the repr
    assert log.count("Traceback (most recent call last):") == 1, log
    trace = log.split("Traceback (most recent call last):\n", 1)[1]
    frames = re.findall(r'^  File "([^"]+)", line (\d+)', trace, re.MULTILINE)
    # the application's frames first, none of sdserve's or of the import machinery
    assert frames[0][0] == str(app), trace
    assert not [f for f, _ in frames if "sdserve/" in f or "importlib" in f], trace
    assert (str(app), str(line)) in frames
    assert "\nKeyError: 'DATABASE_URL'" in trace


def test_a_syntax_error_shows_file_line_and_caret(tmp_path: Path) -> None:
    app = tmp_path / "typo.py"
    app.write_text("from aiohttp import web\n\ndef create_app()\n    return web.Application()\n")
    done = _run("run", "typo:create_app", "--workers", "0", "--log", "stderr", cwd=tmp_path)
    assert done.returncode == ExitCode.STARTUP, done.stderr
    log = done.stderr
    caret = " " * (4 + len("def create_app()")) + "^"
    expected = f"  File \"{app}\", line 3\n    def create_app()\n{caret}\nSyntaxError: expected ':'"
    assert expected in log, log
    assert f"importing typo failed: SyntaxError: expected ':' (at {app}, line 3)" in log, log
    assert "Traceback" not in log  # no frame of the application ran: no frames to show
    assert "('expected" not in log  # not the exception's args


def test_a_directory_named_like_the_module_is_called_a_namespace_package(
    tmp_path: Path,
) -> None:
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "web.py").write_text("def create_app(): pass\n")
    done = _run("run", "myapp:create_app", "--workers", "0", "--log", "stderr", cwd=tmp_path)
    assert done.returncode == ExitCode.STARTUP, done.stderr
    failed = [line for line in done.stderr.splitlines() if "start failed" in line]
    assert len(failed) == 1, done.stderr
    assert (
        f"myapp was imported as a namespace package (directory {tmp_path}/myapp, "
        "no __init__.py), so it has no create_app; it holds myapp.web"
    ) in failed[0]


# -- 5. LISTEN_PID -----------------------------------------------------------------------------


def test_a_foreign_listen_pid_is_an_error_under_systemd_only(tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    try:
        env = _env(LISTEN_FDS="1", LISTEN_PID="1", NOTIFY_SOCKET=str(tmp_path / "notify"))
        argv = [sys.executable, "-m", "sdserve", "run", "sdserve.demo:create_app"]
        argv += ["--log", "stderr"]
        with subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) as proc:
            _, stderr = proc.communicate(timeout=60)
        status = notify.recv(4096).decode()  # what systemd would show
    finally:
        notify.close()
    assert proc.returncode == ExitCode.CONFIG, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert f"LISTEN_PID=1 is not this process (pid {proc.pid}), but NOTIFY_SOCKET" in lines[0]
    assert status.startswith("STATUS=start failed: LISTEN_PID=1 is not this process"), status
    # outside systemd the variables were only inherited: a warning, then the configured bind
    port = _free_port()
    env = _env(LISTEN_FDS="1", LISTEN_PID="1")
    argv = [sys.executable, "-m", "sdserve", "run", "sdserve.demo:create_app", "--workers", "0"]
    argv += ["--log", "stderr", "--bind", f"127.0.0.1:{port}"]
    log, pid = _until_ready(argv, env=env)
    assert f"ignoring LISTEN_FDS=1: LISTEN_PID=1 is not this process (pid {pid})" in log
    assert f"sockets bound: http=127.0.0.1:{port}" in log


# -- 6. numbers too large ------------------------------------------------------------------------

HUGE = "99999999999999999999"


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("toml", "sdserve.toml: workers: expected a whole number of 64 bits at most, got " + HUGE),
        ("env", f"environment: SDSERVE_MAX_CONNECTIONS: expected a whole number of 64 bits "
                f"at most, got '{HUGE}'"),
        ("env-section", f"environment: SDSERVE_HEALTH__FAIL_THRESHOLD: expected a whole number "
                        f"of 64 bits at most, got '{HUGE}'"),
        ("cli", f"command line: --max-requests: expected a whole number of 64 bits at most, "
                f"got '{HUGE}'"),
        ("workers", f"workers: must be at most {MAX_WORKERS}, got 9999999999999"),
        ("listen_fds", f"LISTEN_FDS={HUGE}: more sockets than this process may have open"),
    ],
)  # fmt: skip
def test_numbers_too_large_are_named_not_overflows(tmp_path: Path, how: str, expected: str) -> None:
    args = ["run", "sdserve.demo:create_app", "--log", "stderr"]
    env = _env()
    prefix: tuple[str, ...] = ()
    if how == "toml":
        (tmp_path / "sdserve.toml").write_text(f"workers = {HUGE}\n")
        args += ["-c", "sdserve.toml"]
    elif how == "env":
        env["SDSERVE_MAX_CONNECTIONS"] = HUGE
    elif how == "env-section":
        env["SDSERVE_HEALTH__FAIL_THRESHOLD"] = HUGE
    elif how == "cli":
        args += ["--max-requests", HUGE]
    elif how == "workers":  # fits 64 bits, but would start that many processes
        args += ["--workers", "9999999999999"]
    else:  # LISTEN_PID must be the process's own: the shell's pid is kept by exec
        env["LISTEN_FDS"] = HUGE
        prefix = ("/bin/sh", "-c", 'export LISTEN_PID=$$; exec "$0" "$@"')
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "sdserve", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert "Error:" not in done.stderr  # no OverflowError, MemoryError...
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # one problem, one line


# -- 7. one round ----------------------------------------------------------------------------------


def test_every_problem_of_the_file_at_once_checks_included(tmp_path: Path) -> None:
    (tmp_path / "sdserve.toml").write_text(
        "workerz = 2\n"
        'shutdown_timeout = "soon"\n'
        "[checks.db]\n"
        'type = "tcp"\n'
        'host = "127.0.0.1"\n'
        'port = "abc"\n'
        "[checks.cache]\n"
        'type = "nosuch"\n'
    )
    done = _run("run", "sdserve.demo:create_app", "-c", "sdserve.toml", cwd=tmp_path)
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert "invalid configuration (4 problem(s))" in done.stderr
    assert _problems(done.stderr) == [
        "sdserve.toml: workerz: unknown key (did you mean 'workers'?)",
        "sdserve.toml: shutdown_timeout: expected a duration (seconds, or e.g. 250ms, 2s, "
        "1min), got 'soon'",
        "sdserve.toml: checks.db.port: expected a port number, got 'abc'",
        "sdserve.toml: checks.cache.type: expected one of postgres, redis, tcp, http, dns, "
        "disk, file, got 'nosuch'",
    ]


# -- 8. the drill without its extra --------------------------------------------------------------

DRILL_EXTRA = ("numpy", "rich", "matplotlib", "mpl_toolkits", "uvloop", "pylab")


@pytest.fixture
def without_drill_extra(tmp_path: Path) -> Path:
    """A site directory with every package installed here except the drill extra's."""
    site = tmp_path / "site"
    site.mkdir()
    for where in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for entry in Path(where).iterdir():
            name = entry.name.lower()
            if name.startswith(DRILL_EXTRA) or (site / entry.name).exists():
                continue
            (site / entry.name).symlink_to(entry)
    return site


def test_the_drill_without_its_extra_says_what_to_install(without_drill_extra: Path) -> None:
    env = _env()
    env["PYTHONPATH"] += os.pathsep + str(without_drill_extra)
    # -S: no site-packages of this interpreter; only the directory without the extra
    done = _run("drill", "http://127.0.0.1:1/", env=env, python=("-S",))
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert done.stderr.strip().splitlines() == [
        "sdserve drill: needs the 'drill' extra (numpy is not installed): "
        "pip install 'sdserve[drill]'"
    ]


# -- 9. health paths the application takes ---------------------------------------------------------

SUBAPP_AT_LIVEZ = """\
from aiohttp import web

async def page(request):
    return web.Response(text="mine")

def create_app():
    app = web.Application()
    sub = web.Application()
    sub.router.add_get("/status", page)
    app.add_subapp("/livez", sub)
    return app
"""

FROZEN = """\
from aiohttp import web

app = web.Application()
app.freeze()

def create_app():
    return app
"""


@pytest.mark.parametrize(
    ("source", "env", "status", "expected"),
    [
        (
            SUBAPP_AT_LIVEZ,
            {},
            ExitCode.STARTUP,
            "health.livez_path: the application answers GET /livez with its route /livez "
            "(PrefixedSubApp), before sdserve's; set health.livez_path to a path it does not "
            "route, or health.enabled = false to serve your own",
        ),
        (
            FROZEN,
            {},
            ExitCode.STARTUP,
            "the factory returned an Application that is frozen (already started, or a "
            "sub-application of another): return a new one from the factory",
        ),
        (
            SUBAPP_AT_LIVEZ.replace('"/livez"', '"/app"'),
            {"SDSERVE_HEALTH__READYZ_PATH": "/livez"},
            ExitCode.CONFIG,
            "health.readyz_path: is '/livez', as health.livez_path is: give each its own",
        ),
    ],
)
def test_health_paths_the_application_takes_are_named(
    tmp_path: Path, source: str, env: dict[str, str], status: int, expected: str
) -> None:
    (tmp_path / "healthapp.py").write_text(source)
    done = _run(
        "run",
        "healthapp:create_app",
        "--workers",
        "0",
        "--log",
        "stderr",
        "--bind",
        f"127.0.0.1:{_free_port()}",
        cwd=tmp_path,
        env=_env(**env),
    )
    assert done.returncode == status, done.stderr
    failed = [line for line in done.stderr.splitlines() if expected in line]
    assert len(failed) == 1, done.stderr  # one line, which says it all
    assert "RuntimeError" not in done.stderr
    assert "Traceback" not in done.stderr


CATCH_ALL = """\
import os
from aiohttp import web

async def page(request):
    return web.Response(text="the application's")

def create_app():
    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    app.router.add_static("/", os.path.dirname(__file__))
    return app
"""


def test_routes_that_do_not_answer_the_health_paths_are_no_error(tmp_path: Path) -> None:
    """A catch-all pattern or static files registered before sdserve's routes: aiohttp
    resolves the plain health paths first, so sdserve's answer, and the start goes on."""
    (tmp_path / "catchall.py").write_text(CATCH_ALL)
    port = _free_port()
    argv = [sys.executable, "-m", "sdserve", "run", "catchall:create_app", "--workers", "0"]
    argv += ["--log", "stderr", "--bind", f"127.0.0.1:{port}"]
    with subprocess.Popen(argv, cwd=tmp_path, env=_env(), stderr=subprocess.PIPE, text=True) as p:
        assert p.stderr is not None
        try:
            for line in p.stderr:  # bounded: "ready", or the process exits
                if "ready after" in line:
                    break
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=10) as r:
                assert r.read() == b"ok\n"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10) as r:
                assert r.read() == b"the application's"
        finally:
            p.terminate()
            assert p.wait(timeout=30) == ExitCode.OK
