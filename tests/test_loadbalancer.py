"""The warning about ``drain_delay`` against a load balancer's check window
(``sdserve.loadbalancer``, ``units/LOADBALANCER.md``): the rule on its own, and said once at
start by a real ``sdserve run`` with an admin socket."""

from __future__ import annotations

import signal
import socket
from typing import Any

import pytest

from sdserve.config import ConfigError, load_config
from sdserve.loadbalancer import drain_delay_warnings
from tests.conftest import LauncherFactory
from tests.helpers import HOST


def cfg(**overrides: Any) -> Any:
    return load_config(environ={}, overrides=overrides)


def test_a_drain_delay_shorter_than_the_check_window_is_warned_about() -> None:
    [text] = drain_delay_warnings(cfg(drain_delay="0.5s", lb_check_window="0.7s"), ["http"])
    assert "drain_delay (0.5s) is shorter than lb_check_window (0.7s)" in text
    assert "at least 0.7s" in text
    assert "units/LOADBALANCER.md" in text
    # zero is shorter too, with or without an admin socket
    assert drain_delay_warnings(cfg(lb_check_window=2), ["http", "admin"])


@pytest.mark.parametrize(
    ("settings", "sockets"),
    [
        ({"drain_delay": 1.4, "lb_check_window": 0.7}, ["http", "admin"]),
        ({"drain_delay": 0.7, "lb_check_window": 0.7}, ["http"]),
        ({"drain_delay": 1.0}, ["http", "admin"]),
        # no admin socket and no window given: nothing tells sdserve a balancer is there
        ({}, ["http"]),
        # the admin socket does not serve the health endpoints
        ({"health": {"placement": "main"}}, ["http", "admin"]),
        # the application serves its own readiness
        ({"health": {"enabled": False}}, ["http", "admin"]),
    ],
)
def test_settings_that_keep_the_rule_are_not_warned_about(
    settings: dict[str, Any], sockets: list[str]
) -> None:
    assert drain_delay_warnings(cfg(**settings), sockets) == []


def test_no_drain_delay_with_an_admin_socket_is_warned_about() -> None:
    [text] = drain_delay_warnings(cfg(), ["http", "admin"])
    assert text.startswith("drain_delay is 0 while an admin socket serves /readyz")
    assert "lb_check_window" in text


def test_a_negative_window_is_refused() -> None:
    with pytest.raises(ConfigError, match="lb_check_window"):
        cfg(lb_check_window=-1)


@pytest.mark.asyncio
async def test_sdserve_run_says_it_once_at_start(
    make_launcher: LauncherFactory, listen_sock: socket.socket
) -> None:
    admin = socket.create_server((HOST, 0))
    try:
        launcher = make_launcher(
            "--drain-delay", "0.2", "--lb-check-window", "0.5",
            sockets=[("http", listen_sock), ("admin", admin)],
        )  # fmt: skip
        instance = await launcher.start()
        launcher.send_signal(signal.SIGTERM)
        await instance.exited
        log = instance.log_text()
        assert log.count("drain_delay (0.2s) is shorter than lb_check_window (0.5s)") == 1, log
    finally:
        admin.close()
