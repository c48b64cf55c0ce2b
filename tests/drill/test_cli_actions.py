"""``--action`` values become the right actions."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from sdserve.drill.cli import add_arguments, parse_action, parse_targets


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_targets_with_weights() -> None:
    targets = parse_targets(["3=http://127.0.0.1:1/", "http://127.0.0.1:1/a?b=c"])
    assert [(t.url, t.weight) for t in targets] == [
        ("http://127.0.0.1:1/", 3.0),
        ("http://127.0.0.1:1/a?b=c", 1.0),
    ]


def test_restart_uses_the_template_and_the_unit_group(tmp_path: Path) -> None:
    out = tmp_path / "ran"
    args = parse("--unit", "demo.service", "--restart-cmd", f"sh -c 'echo {{unit}} > {out}'")
    action = parse_action("restart times=3 every=2 at=4 gap=1", args, None)
    assert action.name == "restart"
    assert action.group == "unit"
    assert action.schedule.moments() == [4.0, 6.0, 8.0]
    assert action.schedule.min_gap == 1.0
    asyncio.run(action.run())  # type: ignore[arg-type]
    assert out.read_text() == "demo.service\n"


def test_outage_has_an_end_and_a_hold(tmp_path: Path) -> None:
    args = parse()
    a, b = tmp_path / "a", tmp_path / "b"
    action = parse_action(f"outage cmd='touch {a}' end_cmd='touch {b}' hold=2.5", args, None)
    assert action.hold == 2.5
    assert action.end is not None
    assert action.group is None
    asyncio.run(action.run())  # type: ignore[arg-type]
    asyncio.run(action.end())  # type: ignore[arg-type]
    assert a.exists()
    assert b.exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("signal", "needs --pid"),
        ("kill-worker", "needs --pid"),
        ("restart", "needs --unit"),
        ("command cmd=true colour=red", "unknown keys"),
        ("command cmd=true times", "expected key=value"),
        ("explode", "unknown action kind"),
    ],
)
def test_bad_actions(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_action(text, parse(), None)
