"""The unit renderer behind ``sdserve units`` (pure functions; the units' behaviour under a
real systemd is in tests/system)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sdserve import units
from sdserve.config import Config
from sdserve.units import UnitError, UnitSpec, render_units

REPO_UNITS = Path(__file__).resolve().parents[1] / "units"


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


def test_exec_arguments_are_quoted_for_systemd() -> None:
    files = render_units(
        UnitSpec(app="m:f", config="/etc/my app/100%.toml", executable="/opt/sds/bin/sdserve")
    )
    start = value(files["sdserve.service"], "Service", "ExecStart")
    assert start.startswith('/opt/sds/bin/sdserve run m:f --config "/etc/my app/100%%.toml" ')


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
