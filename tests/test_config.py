"""Configuration layers, validation and printing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sdserve.config import Config, ConfigError, dump_toml, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults() -> None:
    cfg = load_config(environ={})
    assert cfg == Config()
    assert cfg.shutdown_timeout == 25.0
    assert cfg.idle_grace == 1.0
    assert cfg.stop_budget == cfg.drain_delay + cfg.shutdown_timeout + cfg.cleanup_timeout


def test_layers_in_order(tmp_path: Path) -> None:
    toml = tmp_path / "sdserve.toml"
    toml.write_text(
        'app = "a:b"\nshutdown_timeout = 10\nidle_grace = "250ms"\nworkers = 2\n'
        "[health]\nreadyz_path = '/ready'\n"
    )
    env = {
        "SDSERVE_SHUTDOWN_TIMEOUT": "12s",
        "SDSERVE_HEALTH__LIVEZ_PATH": "/alive",
        "SDSERVE_BIND": "127.0.0.1:1, [::1]:2",
        "OTHER": "ignored",
    }
    cfg = load_config(toml_path=toml, environ=env, overrides={"workers": "3"})
    assert cfg.app == "a:b"
    assert cfg.idle_grace == 0.25  # file
    assert cfg.shutdown_timeout == 12.0  # environment beats file
    assert cfg.workers == 3  # command line beats file
    assert cfg.health.readyz_path == "/ready"
    assert cfg.health.livez_path == "/alive"
    assert cfg.bind == ("127.0.0.1:1", "[::1]:2")


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text('shutdown_timout = 3\nworkers = "many"\n[health]\nbogus = 1\n')
    env = {"SDSERVE_IDLE_GRACE": "soon", "SDSERVE_NOPE": "1"}
    with pytest.raises(ConfigError) as info:
        load_config(toml_path=toml, environ=env, overrides={"log": "syslog"})
    problems = "\n".join(info.value.problems)
    assert len(info.value.problems) == 6, problems
    assert "shutdown_timout: unknown key (did you mean 'shutdown_timeout'?)" in problems
    assert "workers: expected a whole number, got 'many'" in problems
    assert "health.bogus: unknown key" in problems
    assert "environment: SDSERVE_IDLE_GRACE: expected a duration" in problems
    assert "environment: SDSERVE_NOPE: unknown setting" in problems
    assert (
        "command line: --log: expected one of auto, journal, stderr, json, got 'syslog'" in problems
    )


def test_a_share_or_a_factor_is_a_number_not_a_duration(tmp_path: Path) -> None:
    """A key of type Number takes a plain number from each layer, and a unit is a problem
    that says so (a duration's units would turn 250ms into a share of 0.25)."""
    toml = tmp_path / "n.toml"
    toml.write_text("canary_latency_factor = 4\n")
    env = {"SDSERVE_ACCESS_LOG_SAMPLE": " 0.25 "}
    cfg = load_config(toml_path=toml, environ=env, overrides={"canary_error_margin": ".5"})
    assert (cfg.access_log_sample, cfg.canary_latency_factor) == (0.25, 4.0)
    assert cfg.canary_error_margin == 0.5
    with pytest.raises(ConfigError) as info:
        load_config(
            environ={"SDSERVE_ACCESS_LOG_SAMPLE": "250ms"},
            overrides={"canary_latency_factor": "nan"},
        )
    assert list(info.value.problems) == [
        "environment: SDSERVE_ACCESS_LOG_SAMPLE: expected a number (such as 0.5 or 3), got '250ms'",
        "command line: --canary-latency-factor: expected a number (such as 0.5 or 3), got 'nan'",
    ]


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={}, overrides={"idle_grace": "30", "shutdown_timeout": "5"})
    assert any(p.startswith("idle_grace: must be shorter") for p in info.value.problems)
    with pytest.raises(ConfigError) as info:
        load_config(environ={}, overrides={"shutdown_timeout": "0", "app": "nocolon"})
    assert len(info.value.problems) == 2


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(toml_path=tmp_path / "missing.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(toml_path=broken, environ={})


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config(
        environ={}, overrides={"app": "x:y", "bind": ["127.0.0.1:9", 'unix:/run/a "b"']}
    )
    out = tmp_path / "out.toml"
    out.write_text(dump_toml(cfg))
    assert load_config(toml_path=out, environ={}) == cfg


def _sdserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sdserve", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        timeout=60,
        check=False,
    )


def test_config_command_prints_effective_configuration() -> None:
    result = _sdserve(
        "config", "demo:app", "--shutdown-timeout", "7", env={"SDSERVE_DRAIN_DELAY": "2"}
    )
    assert result.returncode == 0, result.stderr
    assert 'app = "demo:app"' in result.stdout
    assert "shutdown_timeout = 7.0" in result.stdout
    assert "drain_delay = 2.0" in result.stdout
    assert "[health]" in result.stdout


def test_bad_check_table_exits_2_before_binding(tmp_path: Path) -> None:
    toml = tmp_path / "checks.toml"
    toml.write_text('[checks.db]\ntype = "postgres"\npasword = "x"\n')
    result = _sdserve("run", "sdserve.demo:create_app", "--config", str(toml), "--log", "stderr")
    assert result.returncode == 2
    assert "checks.db.pasword" in result.stderr
    assert "sockets" not in result.stderr  # nothing was bound


def test_bad_config_exits_2_listing_problems() -> None:
    result = _sdserve("run", "sdserve.demo:create_app", "--workers", "-1", env={"SDSERVE_FOO": "1"})
    assert result.returncode == 2
    assert "2 problem(s)" in result.stderr
    assert "SDSERVE_FOO: unknown setting" in result.stderr
    assert "workers: must not be negative" in result.stderr


def test_out_of_range_whole_numbers_are_problems_not_crashes(tmp_path: Path) -> None:
    toml = tmp_path / "sdserve.toml"
    toml.write_text("backlog = 9999999999\nmax_body_size = -99999999999999999999\n")
    with pytest.raises(ConfigError) as info:
        load_config(toml_path=toml, environ={"SDSERVE_WORKERS": "99999999999999999999999"})
    text = str(info.value)
    assert "backlog: must be at most 2147483647, got 9999999999" in text
    assert "max_body_size: expected a whole number of 64 bits at most" in text
    assert "environment: SDSERVE_WORKERS: expected a whole number of 64 bits at most" in text
    assert str(toml) in text
