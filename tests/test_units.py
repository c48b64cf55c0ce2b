"""The unit renderer behind ``sdserve units`` (pure functions; the units' behaviour under a
real systemd is in tests/system)."""

from __future__ import annotations

import argparse
import shlex
import shutil
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdserve import units
from sdserve.config import Config
from sdserve.units import UnitError, UnitSpec, render_units

REPO = Path(__file__).resolve().parents[1]
REPO_UNITS = REPO / "units"


@pytest.fixture
def etc() -> Iterator[Path]:
    """A folder for config files that the rendered service could read: not under /tmp,
    which the units refuse (the service has a private /tmp)."""
    candidates = [REPO / ".cache", Path.home() / ".cache"]
    base = next(c for c in candidates if not str(c).startswith(("/tmp/", "/var/tmp/")))
    base = base / "sdserve-test-units"
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path)


def parse(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]} (comments dropped, order kept)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key, value))
    return sections


def values(text: str, section: str, key: str) -> list[str]:
    return [v for k, v in parse(text)[section] if k == key]


def value(text: str, section: str, key: str) -> str:
    found = values(text, section, key)
    assert len(found) == 1, f"{key}= appears {len(found)} times in [{section}]"
    return found[0]


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    units.add_arguments(parser)
    return parser.parse_args(argv)


def test_repository_units_are_the_rendered_defaults() -> None:
    shipped = units.shipped_units()
    on_disk = {
        str(p.relative_to(REPO_UNITS)): p.read_text()
        for p in REPO_UNITS.rglob("*")
        if p.is_file() and p.suffix in {".socket", ".service", ".conf"}
    }
    assert on_disk == shipped, "units/ is stale: regenerate it from sdserve.units.shipped_units()"


def test_stop_timeout_exceeds_the_daemons_stop_budget() -> None:
    for drain, shutdown in [(0.0, 25.0), (5.0, 60.0), (0.5, 1.5), (12.25, 3.0)]:
        files = render_units(
            UnitSpec(app="m:f", drain_delay=drain, shutdown_timeout=shutdown, start_timeout=1)
        )
        service = files["sdserve.service"]
        budget = Config(drain_delay=drain, shutdown_timeout=shutdown).stop_budget
        stop = int(value(service, "Service", "TimeoutStopSec"))
        assert stop >= budget + units.STOP_MARGIN
        assert stop < budget + units.STOP_MARGIN + 1
        assert f"--drain-delay {drain:g}" in value(service, "Service", "ExecStart")
        assert f"--shutdown-timeout {shutdown:g}" in value(service, "Service", "ExecStart")


def test_start_timeout_exceeds_the_daemons_start_timeout() -> None:
    files = render_units(UnitSpec(app="m:f", start_timeout=42.5))
    service = files["sdserve.service"]
    assert int(value(service, "Service", "TimeoutStartSec")) == 53
    assert "--start-timeout 42.5" in value(service, "Service", "ExecStart")


def test_settings_that_sdserve_rejects_are_rejected() -> None:
    with pytest.raises(UnitError, match="shutdown_timeout"):
        render_units(UnitSpec(app="m:f", shutdown_timeout=0))
    with pytest.raises(UnitError, match="app"):
        render_units(UnitSpec(app="no-colon"))
    with pytest.raises(UnitError, match="workers"):
        render_units(UnitSpec(app="m:f", workers=-1))


def test_listen_addresses() -> None:
    assert units.listen_stream("8080") == "8080"
    assert units.listen_stream("127.0.0.1:80") == "127.0.0.1:80"
    assert units.listen_stream("[::1]:8080") == "[::1]:8080"
    assert units.listen_stream("unix:/run/app.sock") == "/run/app.sock"
    assert units.listen_stream("/run/app.sock") == "/run/app.sock"
    for bad in ["", "http", "70000", "host:", "::1:80", "[::1:80", "/run/a b.sock"]:
        with pytest.raises(UnitError):
            units.listen_stream(bad)


def test_socket_units_name_their_descriptors() -> None:
    files = render_units(
        UnitSpec(
            name="shop",
            app="shop.web:create",
            listen=("127.0.0.1:9000", "[::1]:9000"),
            admin_listen=("127.0.0.1:9001",),
        )
    )
    assert sorted(files) == ["shop-admin.socket", "shop.service", "shop.socket"]
    http, admin, service = files["shop.socket"], files["shop-admin.socket"], files["shop.service"]
    assert values(http, "Socket", "ListenStream") == ["127.0.0.1:9000", "[::1]:9000"]
    assert value(http, "Socket", "FileDescriptorName") == "http"
    assert value(http, "Socket", "Backlog") == "4096"
    assert values(admin, "Socket", "ListenStream") == ["127.0.0.1:9001"]
    assert value(admin, "Socket", "FileDescriptorName") == "admin"
    assert value(admin, "Socket", "Service") == "shop.service"
    assert value(service, "Service", "Sockets") == "shop.socket shop-admin.socket"
    assert value(service, "Unit", "Requires") == "shop.socket"
    assert value(service, "Service", "ExecStart").startswith(
        "/usr/bin/sdserve run shop.web:create "
    )


def test_service_basics_and_hardening() -> None:
    service = render_units(UnitSpec(app="m:f", watchdog=7.5))["sdserve.service"]
    expect = {
        "Type": "notify",
        "KillMode": "mixed",
        "Restart": "on-failure",
        "WatchdogSec": "7.5s",
        "ExecReload": "/usr/bin/sdserve reload $MAINPID",
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }
    for key, want in expect.items():
        assert value(service, "Service", key) == want, key
    assert values(service, "Service", "SystemCallFilter")[0] == "@system-service"
    assert "User" not in dict(parse(service)["Service"])


def test_fixed_user_gets_a_sysusers_entry() -> None:
    files = render_units(UnitSpec(name="shop", app="m:f", user="shop"))
    service = files["shop.service"]
    assert value(service, "Service", "User") == "shop"
    assert value(service, "Service", "DynamicUser") == "no"
    assert files["sysusers.d/shop.conf"].startswith("u shop - ")
    assert ":" not in files["sysusers.d/shop.conf"]  # sysusers rejects it in GECOS
    with pytest.raises(UnitError, match="user"):
        render_units(UnitSpec(app="m:f", user="Bad User"))


def test_the_same_units_for_every_systemd_and_reload_reports_its_outcome() -> None:
    files = render_units(UnitSpec(app="m:f", executable="/opt/my sds/bin/sdserve"))
    assert sorted(files) == ["sdserve.service", "sdserve.socket"]  # no version drop-in
    service = files["sdserve.service"]
    assert value(service, "Service", "Type") == "notify"
    # `sdserve reload` waits for the outcome; $MAINPID is left for systemd to expand
    assert value(service, "Service", "ExecReload") == '"/opt/my sds/bin/sdserve" reload $MAINPID'
    # no start rate limit: its hit would fail the socket and close the port
    assert value(service, "Unit", "StartLimitIntervalSec") == "0"
    assert value(service, "Service", "RestartSec") == "1s"


def test_templates_use_the_instance() -> None:
    files = render_units(UnitSpec(name="sdserve@", listen=("/run/sdserve/%i.sock",)))
    assert sorted(files) == ["sdserve@.service", "sdserve@.socket"]
    service = files["sdserve@.service"]
    assert value(service, "Service", "Sockets") == "sdserve@%i.socket"
    assert "--config /etc/sdserve/%i.toml" in value(service, "Service", "ExecStart")
    assert value(service, "Service", "EnvironmentFile") == "-/etc/default/sdserve-%i"
    assert value(service, "Service", "SyslogIdentifier") == "sdserve-%i"
    assert values(files["sdserve@.socket"], "Socket", "ListenStream") == ["/run/sdserve/%i.sock"]
    # a dynamic user per instance
    assert value(service, "Service", "User") == "sdserve-%i"
    assert value(service, "Service", "DynamicUser") == "yes"


def test_exec_arguments_are_quoted_for_systemd(etc: Path) -> None:
    config = etc / "my app" / "100%.toml"
    config.parent.mkdir()
    config.write_text("")
    files = render_units(UnitSpec(app="m:f", config=str(config), executable="/opt/sds/bin/sdserve"))
    start = value(files["sdserve.service"], "Service", "ExecStart")
    quoted = str(config).replace("%", "%%")
    assert start == f'/opt/sds/bin/sdserve run m:f --config "{quoted}" --fd-store-max 4096'


def test_bad_names_are_rejected() -> None:
    for name in ["", "a b", "a@b@", "x/y"]:
        with pytest.raises(UnitError, match="unit name"):
            render_units(UnitSpec(name=name, app="m:f"))


def test_cli_writes_the_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = cli(
        "--name",
        "shop",
        "--app",
        "shop.web:create",
        "--listen",
        "127.0.0.1:9000",
        "--listen",
        "9443",
        "--admin-listen",
        "127.0.0.1:9001",
        "--user",
        "shop",
        "--environment-file",
        "/etc/shop.env",
        "--workers",
        "3",
        "--shutdown-timeout",
        "40",
        "--start-timeout",
        "20",
        "--watchdog",
        "9",
        "--out",
        str(tmp_path),
    )
    assert units.run(args) == 0
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {
        "shop.socket",
        "shop-admin.socket",
        "shop.service",
        "sysusers.d/shop.conf",
    }
    assert sorted(capsys.readouterr().out.split()) == sorted(str(tmp_path / w) for w in written)
    service = (tmp_path / "shop.service").read_text()
    assert value(service, "Service", "EnvironmentFile") == "/etc/shop.env"
    assert "--workers 3" in value(service, "Service", "ExecStart")
    assert value(service, "Service", "WatchdogSec") == "9s"
    assert value(service, "Service", "TimeoutStopSec") == str(
        units.timeout_stop_sec(Config(shutdown_timeout=40))
    )
    assert values((tmp_path / "shop.socket").read_text(), "Socket", "ListenStream") == [
        "127.0.0.1:9000",
        "9443",
    ]


def test_cli_reports_bad_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = cli("--app", "m:f", "--listen", "nope", "--out", str(tmp_path))
    assert units.run(args) == 2
    assert "listen address 'nope'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_an_output_directory_that_cannot_be_made_is_a_clear_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = argparse.Namespace(out=Path("/dev/null/units"))
    files = {"shop.service": "[Service]\n"}
    assert units.write_out(files, args.out) == 2
    err = capsys.readouterr().err
    assert "sdserve units: cannot write /dev/null/units" in err
    assert "Not a directory" in err
    assert "Traceback" not in err


# ---- the operator's path (issue 13) -------------------------------------------------------


def service_of(spec: UnitSpec) -> str:
    return render_units(spec)[spec.unit("service")]


def test_a_venv_runs_its_own_sdserve_for_start_reload_and_stop() -> None:
    service = service_of(UnitSpec(app="myapp:create_app", venv="/srv/myapp/venv"))
    exe = "/srv/myapp/venv/bin/sdserve"
    assert value(service, "Service", "ExecStart").startswith(f"{exe} run myapp:create_app ")
    assert value(service, "Service", "ExecReload") == f"{exe} reload $MAINPID"
    assert value(service, "Service", "ExecStop") == f"+{exe} stopping $MAINPID"
    args = cli("--app", "m:f", "--venv", "/srv/v", "--out", "/x")
    assert units.spec_from_args(args).command == "/srv/v/bin/sdserve"
    with pytest.raises(UnitError, match=r"--venv DIR .* or --executable, not both"):
        render_units(UnitSpec(app="m:f", venv="/srv/v", executable="/usr/bin/sdserve"))
    with pytest.raises(UnitError, match="--venv 'venv': give an absolute path"):
        render_units(UnitSpec(app="m:f", venv="venv"))


def test_the_workdir_is_where_the_app_is_imported_from() -> None:
    service = service_of(UnitSpec(app="myapp:create_app", workdir="/srv/myapp"))
    assert value(service, "Service", "WorkingDirectory") == "/srv/myapp"
    assert value(service, "Service", "Environment") == "PYTHONPATH=/srv/myapp"
    # /srv is read-only under ProtectSystem=strict, and nothing else needs relaxing
    assert value(service, "Service", "ProtectSystem") == "strict"
    assert value(service, "Service", "ProtectHome") == "yes"
    assert values(service, "Service", "BindReadOnlyPaths") == []
    with pytest.raises(UnitError, match="--workdir 'srv/app': give an absolute path"):
        render_units(UnitSpec(app="m:f", workdir="srv/app"))
    with pytest.raises(UnitError, match="cannot hold spaces"):
        render_units(UnitSpec(app="m:f", workdir="/srv/my app"))


def test_a_home_folder_is_shown_alone_and_read_only() -> None:
    service = service_of(
        UnitSpec(app="m:f", workdir="/home/deploy/myapp", venv="/root/venvs/myapp")
    )
    # the homes are an empty tmpfs, with only these two folders mounted into it
    assert value(service, "Service", "ProtectHome") == "tmpfs"
    assert values(service, "Service", "BindReadOnlyPaths") == [
        "/home/deploy/myapp",
        "/root/venvs/myapp",
    ]
    assert value(service, "Service", "ProtectSystem") == "strict"
    with pytest.raises(UnitError, match="give the venv with --venv DIR instead"):
        render_units(UnitSpec(app="m:f", executable="/home/deploy/venv/bin/sdserve"))


@pytest.mark.parametrize(
    ("option", "path"), [("workdir", "/tmp/myapp"), ("venv", "/var/tmp/venv"), ("workdir", "/tmp")]
)
def test_a_temporary_folder_is_refused(option: str, path: str) -> None:
    spec = UnitSpec(app="m:f", **{option: path})  # type: ignore[arg-type]
    with pytest.raises(UnitError) as err:
        render_units(spec)
    assert f"--{option} {path}: the service has a private" in str(err.value)
    assert "put the application under /srv or /opt" in str(err.value)


CONFIG = """\
app = "myapp:create_app"
start_timeout = 30
drain_delay = 2
shutdown_timeout = 50
workers = 3

[checks.disk]
type = "disk"
path = "/srv"
"""


def sdserve_config(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    """What `sdserve config ARGV` prints, as TOML."""
    from sdserve import cli as sdserve_cli

    capsys.readouterr()
    assert sdserve_cli.main(["config", *argv]) == 0
    return tomllib.loads(capsys.readouterr().out)


def test_the_config_file_sizes_the_unit_and_nothing_overrides_it(
    etc: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = etc / "myapp.toml"
    config.write_text(CONFIG)
    service = service_of(UnitSpec(name="myapp", app="myapp:create_app", config=str(config)))
    start = shlex.split(value(service, "Service", "ExecStart"))
    assert start[:5] == ["/usr/bin/sdserve", "run", "myapp:create_app", "--config", str(config)]
    # what the service runs with is what `sdserve config --config FILE` shows
    runs_with = sdserve_config(start[2:], capsys)
    shown = sdserve_config(["--config", str(config)], capsys)
    for key in ("app", "start_timeout", "drain_delay", "shutdown_timeout", "workers", "checks"):
        assert runs_with[key] == shown[key], key
    assert shown["shutdown_timeout"] == 50.0
    assert runs_with["checks"] == {"disk": {"type": "disk", "path": "/srv"}}
    # the unit's deadlines come from the file: 2 + 50 + 5 cleanup + 5 margin, 30 + 10
    assert value(service, "Service", "TimeoutStopSec") == "62"
    assert value(service, "Service", "TimeoutStartSec") == "40"


def test_setting_flags_next_to_a_config_file_are_refused(etc: Path) -> None:
    config = etc / "myapp.toml"
    config.write_text(CONFIG)
    with pytest.raises(UnitError) as err:
        render_units(UnitSpec(app="myapp:create_app", config=str(config), shutdown_timeout=9))
    assert str(err.value).startswith(
        f"--shutdown-timeout with --config: set shutdown_timeout in {config}"
    )
    with pytest.raises(UnitError, match="--app other:app differs from app = 'myapp:create_app'"):
        render_units(UnitSpec(app="other:app", config=str(config)))
    config.write_text("workers = 2\n")
    with pytest.raises(UnitError, match="sets no app"):
        render_units(UnitSpec(config=str(config)))
    config.write_text("shutdown_timeout = 0\nbogus = 1\n")
    with pytest.raises(UnitError) as err:
        render_units(UnitSpec(app="m:f", config=str(config)))
    assert "bogus" in str(err.value)
    assert "shutdown_timeout" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(UnitError, match="No such file"):
        render_units(UnitSpec(app="m:f", config=str(etc / "missing.toml")))


def test_without_a_config_file_the_cli_says_what_that_means(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert units.run(cli("--name", "shop", "--app", "m:f", "--out", str(tmp_path))) == 0
    err = capsys.readouterr().err
    assert "note: no --config:" in err
    assert "[checks] need --config" in err
    start = value((tmp_path / "shop.service").read_text(), "Service", "ExecStart")
    assert start == "/usr/bin/sdserve run m:f --fd-store-max 4096"  # no settings behind its back


def test_credentials_are_loaded_and_checks_find_theirs(etc: Path) -> None:
    service = service_of(
        UnitSpec(app="m:f", credentials=(("dbpass", "/etc/myapp/dbpass"), ("redis", "/etc/r")))
    )
    assert values(service, "Service", "LoadCredential") == [
        "dbpass:/etc/myapp/dbpass",
        "redis:/etc/r",
    ]
    for bad in ["a/b", "..", "a b", ""]:
        with pytest.raises(UnitError, match="the name must be"):
            render_units(UnitSpec(app="m:f", credentials=((bad, "/etc/x"),)))
    with pytest.raises(UnitError, match="given twice"):
        render_units(UnitSpec(app="m:f", credentials=(("a", "/x"), ("a", "/y"))))
    with pytest.raises(UnitError, match="give an absolute path"):
        render_units(UnitSpec(app="m:f", credentials=(("a", "x"),)))
    with pytest.raises(SystemExit):
        cli("--credential", "nopath", "--out", "/x")
    assert cli("--credential", "pg:/etc/pg", "--out", "/x").credential == [("pg", "/etc/pg")]
    # a check of the config that reads a credential nobody loads fails now, not at start
    config = etc / "app.toml"
    config.write_text(
        'app = "m:f"\n[checks.db]\ntype = "postgres"\ndsn = "postgresql://db/x"\n'
        'password_credential = "pg"\n'
    )
    with pytest.raises(
        UnitError, match=r"\[checks.db\] password_credential = 'pg'.*--credential pg"
    ):
        render_units(UnitSpec(config=str(config)))
    spec = UnitSpec(config=str(config), credentials=(("pg", "/etc/pg"),))
    assert values(service_of(spec), "Service", "LoadCredential") == ["pg:/etc/pg"]


def test_each_instance_of_a_template_listens_on_its_own_address() -> None:
    files = render_units(UnitSpec(name="web@", app="m:f"))
    socket = files["web@.socket"]
    # by default the instance is the port, on loopback: web@8081.socket is 127.0.0.1:8081
    assert values(socket, "Socket", "ListenStream") == ["127.0.0.1:%i"]
    assert "`systemctl enable --now web@8081.socket`" in socket
    assert "# listens on 127.0.0.1:8081" in socket
    assert value(files["web@.service"], "Service", "User") == "web-%i"
    # elsewhere in the address
    files = render_units(
        UnitSpec(name="web@", app="m:f", listen=("unix:/run/web/%i.sock", "[::1]:%i"))
    )
    assert values(files["web@.socket"], "Socket", "ListenStream") == [
        "/run/web/%i.sock",
        "[::1]:%i",
    ]
    assert units.listen_stream("%i", template=True) == "%i"
    for same in [("8080",), ("127.0.0.1:8080", "unix:/run/web.sock")]:
        with pytest.raises(UnitError, match="every instance would listen on it; use %i"):
            render_units(UnitSpec(name="web@", app="m:f", listen=same))
    with pytest.raises(UnitError, match="only a template"):
        render_units(UnitSpec(name="web", app="m:f", listen=("127.0.0.1:%i",)))
    with pytest.raises(UnitError, match="only specifiers allowed"):
        render_units(UnitSpec(name="web@", app="m:f", listen=("127.0.0.1:%i", "/run/%n.sock")))
    with pytest.raises(UnitError, match="not a valid user name; give --user"):
        render_units(UnitSpec(name="my.web@", app="m:f"))
    fixed = render_units(UnitSpec(name="my.web@", app="m:f", user="web"))["my.web@.service"]
    assert value(fixed, "Service", "User") == "web"


def test_unix_sockets_get_the_socket_group() -> None:
    files = render_units(
        UnitSpec(name="web@", app="m:f", listen=("unix:/run/web/%i.sock",), socket_group="www-data")
    )
    assert value(files["web@.socket"], "Socket", "SocketGroup") == "www-data"
    assert value(files["web@.socket"], "Socket", "SocketMode") == "0660"
    tcp = render_units(UnitSpec(app="m:f", socket_group="www-data"))["sdserve.socket"]
    assert "SocketGroup" not in dict(parse(tcp)["Socket"])
    with pytest.raises(UnitError, match="--socket-group"):
        render_units(UnitSpec(app="m:f", socket_group="Bad Group"))


def test_a_configuration_error_is_not_restarted() -> None:
    from sdserve.exitcodes import ExitCode

    service = service_of(UnitSpec(app="m:f"))
    assert value(service, "Service", "RestartPreventExitStatus") == str(int(ExitCode.CONFIG))
    assert value(service, "Service", "Restart") == "on-failure"


def test_help_lists_every_option_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    from sdserve import cli as sdserve_cli

    with pytest.raises(SystemExit) as done:
        sdserve_cli.main(["units", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    usage = text.split("\n\n")[0]
    parser = argparse.ArgumentParser()
    units.add_arguments(parser)
    flags = [a.option_strings[-1] for a in parser._actions if a.option_strings]
    assert {"--venv", "--workdir", "--executable", "--credential", "--config"} <= set(flags)
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "out"):
            continue
        assert action.option_strings[-1] in usage, action.dest
        assert action.help, action.dest
        assert "default" in action.help, action.dest
    assert "(default: 15)" in text  # --watchdog
    assert "(default: 127.0.0.1:8080; for a template 127.0.0.1:%i)" in " ".join(text.split())


def test_write_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sdserve import cli as sdserve_cli

    # the folder cannot be made: /dev/null is not a directory (NotADirectoryError)
    assert sdserve_cli.main(["units", "--app", "m:f", "--out", "/dev/null/x"]) == 2
    err = capsys.readouterr().err
    assert err == "sdserve units: cannot write /dev/null/x: Not a directory\n"
    # a file cannot be written: a folder is in its place (IsADirectoryError)
    (tmp_path / "sdserve.service").mkdir()
    assert sdserve_cli.main(["units", "--app", "m:f", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"sdserve units: cannot write {tmp_path}/sdserve.service: Is a directory\n"
    # a bad setting: one line, nothing written
    out = tmp_path / "new"
    assert (
        sdserve_cli.main(["units", "--app", "m:f", "--workdir", "/tmp/x", "--out", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("sdserve units: --workdir /tmp/x: the service has a private /tmp")
    assert not out.exists()


def test_a_template_may_name_the_instance_in_its_paths(capsys: pytest.CaptureFixture[str]) -> None:
    spec = UnitSpec(name="web@", config="/etc/web/%i.toml", workdir="/srv/web/%i", venv="/srv/v")
    service = service_of(spec)  # the config file of an instance is not read: none exists yet
    start = value(service, "Service", "ExecStart")
    assert start == "/srv/v/bin/sdserve run --config /etc/web/%i.toml --fd-store-max 4096"
    assert value(service, "Service", "WorkingDirectory") == "/srv/web/%i"
    assert value(service, "Service", "TimeoutStopSec") == str(units.timeout_stop_sec(Config()))
    assert any("names the instance, so it was not read" in n for n in units.notes(spec))
    # elsewhere a % is a % (escaped for systemd)
    plain = service_of(UnitSpec(name="web", app="m:f", workdir="/srv/100%"))
    assert value(plain, "Service", "WorkingDirectory") == "/srv/100%%"
    with pytest.raises(UnitError, match="the service has a private /tmp"):
        render_units(UnitSpec(app="m:f", config="/tmp/app.toml"))  # before reading it
