"""``sdserve check MODULE:FACTORY``: the real command, as an operator runs it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from .helpers import CHECKOUT

APP = "tests.checks.apps:factory"


async def sdserve_check(
    tmp_path: Path, config: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, str, str]:
    cfg = tmp_path / "sdserve.toml"
    cfg.write_text(config)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SDSERVE_", "NOTIFY_"))}
    environ["CHECKS_APP_FLAGS"] = str(tmp_path)
    environ.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sdserve",
        "check",
        APP,
        "--config",
        str(cfg),
        *args,
        cwd=CHECKOUT,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


TABLES = """
[checks.db]
type = "postgres"
dsn = "postgresql://postgres@127.0.0.1:5432/test"
password_env = "PGPW"

[checks.cache]
type = "redis"
url = "redis://127.0.0.1:6379/0"

[checks.flag]
type = "file"
path = "/etc/hostname"
"""


@pytest.mark.asyncio
async def test_all_pass_prints_a_table_and_exits_0(tmp_path: Path) -> None:
    code, out, err = await sdserve_check(
        tmp_path, TABLES, env={"CHECKS_APP_CHECKS": "counted,pool", "PGPW": "pw-in-env-123"}
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["CHECK", "TYPE", "CRITICAL", "RESULT", "TIME", "OUTPUT"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    for name in ("counted", "pool", "db", "cache", "flag"):
        assert rows[name][3] == "pass", out
    assert rows["db"][1:3] == ["datastore", "yes"]
    assert "5 check(s): 5 passed, 0 critical failed, 0 optional failed" in out
    assert "pw-in-env-123" not in out + err


@pytest.mark.asyncio
async def test_critical_failure_exits_1_optional_failure_only_warns(
    tmp_path: Path, closed_port: int
) -> None:
    optional = f"""
[checks.up]
type = "tcp"
host = "127.0.0.1"
port = {closed_port}
critical = false
"""
    code, out, err = await sdserve_check(tmp_path, optional)
    assert code == 0, out + err
    assert "warn" in out
    assert "0 critical failed, 1 optional failed" in out
    critical = optional.replace("critical = false", "critical = true")
    code, out, err = await sdserve_check(tmp_path, critical, "--format", "json")
    assert code == 1, out + err
    (item,) = json.loads(out)["checks"]
    assert item["name"] == "up"
    assert item["status"] == "fail"
    assert item["critical"] is True
    assert item["observedUnit"] == "ms"


@pytest.mark.asyncio
async def test_startup_hooks_run_for_checks_that_use_app_resources(tmp_path: Path) -> None:
    code, out, err = await sdserve_check(tmp_path, "", env={"CHECKS_APP_CHECKS": "pool"})
    assert code == 0, out + err
    code, out, err = await sdserve_check(
        tmp_path, "", "--no-startup", env={"CHECKS_APP_CHECKS": "pool"}
    )
    assert code == 1, out + err
    assert "KeyError" in out


@pytest.mark.asyncio
async def test_a_check_that_hangs_does_not_hang_the_command(tmp_path: Path) -> None:
    (tmp_path / "hang").touch()
    code, out, err = await sdserve_check(
        tmp_path, "", env={"CHECKS_APP_CHECKS": "hang,counted"}, timeout=30
    )
    assert code == 1, out + err
    assert "timed out after 0.5s" in out
    assert "ignored cancellation for 1.0s and are left behind: sdserve-check-run:hang" in err


@pytest.mark.asyncio
async def test_config_problems_exit_2_naming_the_key(tmp_path: Path) -> None:
    code, out, err = await sdserve_check(
        tmp_path, '[checks.db]\ntype = "postgres"\ndsn = "postgresql://u:pw1234@h/db"\nport = 1\n'
    )
    assert code == 2
    assert "checks.db.dsn: must not contain a password" in err
    assert "checks.db.port: unknown key for a postgres check" in err
    assert "pw1234" not in err + out
