"""``[checks.NAME]`` tables: validation (every problem at once), secrets, registration."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web

from sdserve.builtin_checks import add_builtin
from sdserve.checks import CheckRegistry, add_check, checks_from_config, registry, run_check
from sdserve.config import ConfigError, load_config


def problems_of(tables: dict[str, dict[str, object]], environ: dict[str, str]) -> list[str]:
    reg = CheckRegistry()
    with pytest.raises(ConfigError) as info:
        checks_from_config(reg, tables, environ)
    assert reg.checks == {}, "nothing is registered when a table is invalid"
    return list(info.value.problems)


def test_every_problem_of_every_table_is_reported_at_once() -> None:
    problems = problems_of(
        {
            "db": {
                "type": "postgres",
                "dsn": "postgresql://app:hunter2@db/app",
                "password_env": "NOT_SET_ANYWHERE",
                "pool_size": 3,
            },
            "cache": {"type": "redis", "url": "http://u:hunter3@wrong", "password": "x"},
            "up": {"type": "tcp", "host": "127.0.0.1", "port": 70000, "timeout": "soon"},
            "web": {"type": "http", "url": "http://127.0.0.1/", "status": "ok", "body": "("},
            "gone": {"type": "ftp"},
            "disk": {"type": "disk", "min_free": "lots", "critical": "yes"},
            "file": {"type": "file"},
            "name": {"type": "dns", "name": "localhost", "family": "ipv5", "interval": 0},
            "cred": {"type": "postgres", "dsn": "postgresql://a@b/c", "password_credential": "pg"},
        },
        environ={},
    )
    text = "\n".join(problems)
    for where in (
        "checks.db.dsn: must not contain a password",
        "checks.db.password_env: environment variable NOT_SET_ANYWHERE is not set",
        "checks.db.pool_size: unknown key for a postgres check",
        "checks.cache.url: expected a redis:// URL",
        "checks.cache.password: secrets are never read from the config file",
        "checks.up.port: expected a port number, got 70000",
        "checks.up.timeout: expected a duration",
        "checks.web.status: expected an HTTP status",
        "checks.web.body: expected a regular expression",
        "checks.gone.type: expected one of postgres, redis, tcp, http, dns, disk, file",
        "checks.disk.min_free: expected a size",
        "checks.disk.critical: expected true or false",
        "checks.disk.path: required for a disk check",
        "checks.file.path: required for a file check",
        "checks.name.family: expected any, ipv4 or ipv6",
        "checks.name.interval: expected a duration greater than 0",
        "checks.cred.password_credential: CREDENTIALS_DIRECTORY is not set",
    ):
        assert where in text, f"{where!r} missing from:\n{text}"
    assert len(problems) == 17, text
    # the password of the rejected DSN is still never printed back
    assert "hunter2" not in text
    assert "hunter3" not in text


def test_valid_tables_register_checks_with_their_settings() -> None:
    reg = CheckRegistry()
    checks_from_config(
        reg,
        {
            "db": {
                "type": "postgres",
                "dsn": "postgresql://postgres@127.0.0.1:5432/test",
                "timeout": "250ms",
                "interval": "2s",
            },
            "cache": {"type": "redis", "url": "redis://127.0.0.1:6379/0", "critical": False},
            "flag": {"type": "file", "path": "/etc/hostname", "continuous": False},
            "space": {"type": "disk", "path": "/", "min_free": "1MiB", "min_free_percent": 1},
            "web": {"type": "http", "url": "http://127.0.0.1/", "status": [200, 204]},
            "up": {"type": "tcp", "host": "::1", "port": 1, "component_type": "queue"},
        },
        environ={},
    )
    db = reg.checks["db"]
    assert (db.timeout, db.interval, db.critical, db.component_type) == (
        0.25,
        2.0,
        True,
        "datastore",
    )
    assert reg.checks["cache"].critical is False
    assert reg.checks["flag"].continuous is False
    assert reg.checks["flag"].component_type == "system"
    assert reg.checks["up"].component_type == "queue"
    assert list(reg.checks) == ["db", "cache", "flag", "space", "web", "up"]


@pytest.mark.asyncio
async def test_passwords_from_environment_and_credentials_are_secrets(tmp_path: Path) -> None:
    (tmp_path / "pg").write_text("from-a-credential\n")
    reg = CheckRegistry()
    checks_from_config(
        reg,
        {
            "a": {
                "type": "postgres",
                "dsn": "postgresql://postgres@127.0.0.1:5432/test",
                "password_env": "PGPW",
            },
            "b": {
                "type": "postgres",
                "dsn": "postgresql://postgres@127.0.0.1:5432/test",
                "password_credential": "pg",
            },
        },
        environ={"PGPW": "from-the-env", "CREDENTIALS_DIRECTORY": str(tmp_path)},
    )
    assert {"from-the-env", "from-a-credential"} <= reg.secrets
    # trust authentication on the shared server: the password is sent and ignored
    for name in ("a", "b"):
        result = await run_check(reg.checks[name], reg)
        assert result.ok, result.output


def test_credential_problems_name_the_key(tmp_path: Path) -> None:
    problems = problems_of(
        {
            "a": {"type": "redis", "url": "redis://h", "password_credential": "missing"},
            "b": {"type": "redis", "url": "redis://h", "password_credential": "../etc/passwd"},
            "c": {
                "type": "redis",
                "url": "redis://h",
                "password_credential": "x",
                "password_env": "Y",
            },
        },
        environ={"CREDENTIALS_DIRECTORY": str(tmp_path), "Y": "y"},
    )
    assert problems == [
        "checks.a.password_credential: cannot read credential 'missing': No such file or directory",
        "checks.b.password_credential: not a credential name: '../etc/passwd'",
        "checks.c: give only one of password_env and password_credential",
    ]


def test_a_name_the_application_already_uses_is_a_problem() -> None:
    app = web.Application()

    async def mine() -> bool:
        return True

    add_check(app, "db", mine)
    with pytest.raises(ConfigError) as info:
        checks_from_config(registry(app), {"db": {"type": "file", "path": "/"}}, {})
    assert info.value.problems == (
        "checks.db: the application already registers a check of that name",
    )


def test_tables_from_a_config_file(tmp_path: Path) -> None:
    toml = tmp_path / "sdserve.toml"
    toml.write_text(
        '[checks.db]\ntype = "postgres"\ndsn = "postgresql://postgres@127.0.0.1/test"\n'
        'password_env = "PGPW"\n\n[checks.flag]\ntype = "file"\npath = "/tmp"\ntimeout = "2s"\n'
    )
    cfg = load_config(toml_path=toml, environ={})
    reg = CheckRegistry()
    checks_from_config(reg, cfg.checks, {"PGPW": "pw"})
    assert set(reg.checks) == {"db", "flag"}
    assert reg.checks["flag"].timeout == 2.0


@pytest.mark.asyncio
async def test_add_builtin_from_code_accepts_a_password_and_redacts_it() -> None:
    app = web.Application()
    check = add_builtin(
        app, "db", "postgres", dsn="postgresql://postgres:s%40cret@127.0.0.1:5432/test"
    )
    add_builtin(app, "cache", "redis", url="redis://127.0.0.1:6379/0", password="pw-redis")
    reg = registry(app)
    assert {"s@cret", "s%40cret", "pw-redis"} <= reg.secrets
    assert reg.redact("postgresql://postgres:s%40cret@h") == "postgresql://postgres:***@h"
    result = await run_check(check, reg)
    assert result.ok, result.output
    with pytest.raises(ConfigError) as info:
        add_builtin(app, "x", "tcp", host="127.0.0.1")
    assert info.value.problems == ("checks.x.port: required for a tcp check",)
