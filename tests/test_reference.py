"""The configuration reference: generated from the dataclasses, complete, and what the
command line, the environment, ``--help`` and README.md say."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sdserve import cli, reference
from sdserve.builtin_checks import (
    COMMON_KEYS,
    COMPONENT_TYPES,
    REQUIRED,
    TYPE_KEYS,
    add_builtin,
    register_tables,
)
from sdserve.checks import CheckRegistry, run_check
from sdserve.config import Config, HealthConfig, Number, load_config

ROOT = Path(__file__).resolve().parent.parent


def _sdserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sdserve", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        # wide enough that argparse wraps no help line
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "1000", **(env or {})},
        timeout=60,
        check=False,
    )


#: keys whose valid values the generic rule below does not give
OTHER_VALUES: dict[str, Any] = {
    "overload.critical_paths": ("/pay", "/login"),
    "overload.sheddable_paths": ("/report",),
    "overload.priority_header": "X-Priority",
    "access_log_sample": 0.5,  # a share: at most 1
    "trusted_proxies": ("10.0.0.0/8", "unix"),  # networks, not addresses to bind
}


def _other_value(tp: Any, default: Any, name: str = "") -> Any:
    """A valid value of type ``tp`` that is not ``default`` (for key ``name``)."""
    if name in OTHER_VALUES:
        return OTHER_VALUES[name]
    if tp is bool:
        return not default
    if tp is int:
        return default + 1
    if tp is float or tp is Number:
        return default * 2 if default else 1.5  # within every key's range (ratios too)
    if tp is str:
        return "/other" if default.startswith("/") else "pkg.mod:factory"
    if typing.get_origin(tp) is typing.Literal:
        return next(v for v in typing.get_args(tp) if v != default)
    if typing.get_origin(tp) is tuple:
        return ("127.0.0.1:9", "unix:/run/x.sock")
    raise AssertionError(f"no value for {tp!r}")


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def _leaves() -> list[tuple[str, Any, Any]]:
    """(dotted key, type, default) of every key that is not a section or the check tables."""
    out = []
    defaults = Config()
    sections = [(Config, "", defaults)] + [
        (type(getattr(defaults, f.name)), f"{f.name}.", getattr(defaults, f.name))
        for f in dataclasses.fields(Config)
        if dataclasses.is_dataclass(getattr(defaults, f.name))
    ]
    assert HealthConfig in {cls for cls, _, _ in sections}
    for cls, prefix, obj in sections:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if typing.get_origin(tp) in (None, tuple, typing.Literal) and not (
                isinstance(tp, type) and dataclasses.is_dataclass(tp)
            ):
                out.append((prefix + f.name, tp, getattr(obj, f.name)))
    return out


def _get(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# -- completeness ------------------------------------------------------------------------


def test_every_field_has_a_doc() -> None:
    undocumented = [
        f"{cls.__name__}.{f.name}"
        for cls in (Config, HealthConfig)
        for f in dataclasses.fields(cls)
        if not str(f.metadata.get("doc", "")).strip()
    ]
    assert undocumented == []


def test_the_reference_lists_every_key_once() -> None:
    names = [k.name for k in reference.config_keys()]
    assert len(names) == len(set(names))
    assert set(names) == {name for name, _tp, _default in _leaves()}
    for key in reference.config_keys():
        assert key.doc, key
        assert key.type, key
        assert key.default, key
        assert key.env, key


def test_the_reference_lists_every_check_type_and_key() -> None:
    tables = reference.check_keys()
    assert list(tables) == ["", *TYPE_KEYS]
    assert [k.name for k in tables[""]] == list(COMMON_KEYS)
    for kind, keys in TYPE_KEYS.items():
        assert [k.name for k in tables[kind]] == list(keys)
        required = [k.name for k in tables[kind] if k.default == "required"]
        assert required == list(REQUIRED[kind]), kind
    for table in tables.values():
        for key in table:
            assert key.doc, key
            assert key.type, key
            assert key.default, key
            assert key.flag == key.env == ""  # check tables come from the file only


def test_documented_defaults_are_the_real_ones() -> None:
    defaults = Config()
    types = {name: tp for name, tp, _ in _leaves()}
    for key in reference.config_keys():
        if key.literal:
            shown = reference.render_value(_get(defaults, key.name), types.get(key.name))
            assert key.default == shown, key.name
    assert reference.render_value(defaults.bind) == "127.0.0.1:8080"
    # the common keys of a check table, as a built-in check gets them
    common = {k.name: k.default for k in reference.check_keys()[""]}
    assert set(_MINIMAL) == set(TYPE_KEYS)
    for kind, component in COMPONENT_TYPES.items():
        # as the config file gives them (a dns check's `name` cannot go through add_builtin)
        (check,) = register_tables(CheckRegistry(), {"c": {"type": kind, **_MINIMAL[kind]}}, {})
        assert f"{check.timeout:g}s" == common["timeout"]
        assert str(check.critical).lower() == common["critical"]
        assert str(check.continuous).lower() == common["continuous"]
        assert check.interval is None  # health.interval
        assert check.component_type == component
        assert f"{component} for" in next(
            k.doc for k in reference.check_keys()[""] if k.name == "component_type"
        )


#: the required keys of each check type, and nothing else
_MINIMAL: dict[str, dict[str, Any]] = {
    "postgres": {"dsn": "postgresql://u@127.0.0.1:1/db"},
    "redis": {"url": "redis://127.0.0.1:1"},
    "tcp": {"host": "127.0.0.1", "port": 1},
    "http": {"url": "http://127.0.0.1:1/"},
    "dns": {"name": "localhost"},
    "disk": {"path": "/"},
    "file": {"path": "/"},
}


@pytest.mark.asyncio
async def test_an_http_check_wants_the_documented_default_status() -> None:
    """``status`` defaults to 200: a real server answering 204 fails the check, 200 passes."""
    documented = next(k.default for k in reference.check_keys()["http"] if k.name == "status")
    assert documented == "200"

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=int(request.query["s"]))

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        outcomes = {}
        for status in (200, 204):
            reg = CheckRegistry()
            check = add_builtin(
                reg, f"h{status}", "http", url=f"http://127.0.0.1:{port}/?s={status}"
            )
            outcomes[status] = (await run_check(check, reg)).ok
        assert outcomes == {200: True, 204: False}
    finally:
        await runner.cleanup()


# -- the names it gives are the ones that work ------------------------------------------------


def test_every_environment_variable_sets_its_key() -> None:
    by_name = {k.name: k for k in reference.config_keys()}
    for name, tp, default in _leaves():
        value = _other_value(tp, default, name)
        cfg = load_config(environ={by_name[name].env: _as_text(value)})
        assert _get(cfg, name) == value, by_name[name].env


@pytest.mark.parametrize("command", ["run", "config"])
def test_every_flag_sets_its_key(command: str) -> None:
    parser = cli.build_parser()
    keys = {k.name: k for k in reference.config_keys()}
    flagged = 0
    for name, tp, default in _leaves():
        shown = keys[name].flag
        if name == "app":
            assert shown == "argument"
            args = parser.parse_args([command, "pkg.mod:factory"])
            assert load_config(environ={}, overrides=cli._overrides(args)).app == "pkg.mod:factory"
            continue
        if "." in name:
            assert shown == "", name  # sections: file and environment only
            continue
        value = _other_value(tp, default, name)
        flag = reference.flag_name(name)
        if tp is bool:
            argv = [flag if value else f"--no-{flag[2:]}"]
        elif isinstance(value, tuple):
            argv = [part for v in value for part in (flag, v)]
        else:
            argv = [flag, _as_text(value)]
        args = parser.parse_args([command, *argv])
        cfg = load_config(environ={}, overrides=cli._overrides(args))
        assert _get(cfg, name) == value, argv
        assert shown.startswith(flag)
        flagged += 1
    assert flagged == len([k for k in reference.config_keys() if k.flag.startswith("--")])


# -- where it is shown ------------------------------------------------------------------------


def test_readme_holds_the_reference() -> None:
    text = (ROOT / "README.md").read_text()
    assert reference.readme_section(text) == reference.render_markdown(), (
        f"README.md's configuration reference is stale: run `{reference.REGENERATE}`"
    )


def test_update_rewrites_only_the_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{reference.START}\nstale\n{reference.END}\nafter\n")
    code = [sys.executable, "-m", "sdserve.reference", "--update", str(readme)]
    first = subprocess.run(code, capture_output=True, text=True, cwd=ROOT, check=True)
    assert first.stdout.strip() == f"{readme}: updated"
    text = readme.read_text()
    assert text.startswith(f"# x\n\nbefore\n{reference.START}\n")
    assert text.endswith(f"{reference.END}\nafter\n")
    assert reference.readme_section(text) == reference.render_markdown()
    again = subprocess.run(code, capture_output=True, text=True, cwd=ROOT, check=True)
    assert again.stdout.strip() == f"{readme}: already up to date"
    readme.write_text("no markers\n")
    bad = subprocess.run(code, capture_output=True, text=True, cwd=ROOT, check=False)
    assert bad.returncode == 2
    assert "config-reference:start" in bad.stderr


def test_config_help_keys_prints_the_reference() -> None:
    # it is the reference, not the configuration: a broken environment does not stop it
    result = _sdserve("config", "--help-keys", env={"SDSERVE_NOPE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference.render_text()
    for key in reference.config_keys():
        assert f"\n{key.name.rpartition('.')[2]}  ({key.type}; default {key.default})\n" in (
            result.stdout
        )
        assert key.env in result.stdout
    for kind in TYPE_KEYS:
        assert f'[checks.NAME]  type = "{kind}"' in result.stdout
    assert "\nbind  (list of strings; default 127.0.0.1:8080)\n" in result.stdout
    assert "SDSERVE_HEALTH__FAIL_THRESHOLD" in result.stdout


def test_config_prints_the_effective_bind() -> None:
    default = _sdserve("config")
    assert default.returncode == 0, default.stderr
    assert 'bind = ["127.0.0.1:8080"]\n' in default.stdout
    given = _sdserve("config", "--bind", "[::1]:9", "--bind", "unix:/run/a.sock")
    assert 'bind = ["[::1]:9", "unix:/run/a.sock"]\n' in given.stdout


def test_an_empty_bind_list_is_refused_in_one_line(tmp_path: Path) -> None:
    toml = tmp_path / "sdserve.toml"
    toml.write_text("bind = []\n")
    result = _sdserve(
        "run", "sdserve.demo:create_app", "--config", str(toml), "--log", "stderr", "--workers", "0"
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "bind" in line]
    assert len(lines) == 1, result.stderr
    assert "bind: no address to bind" in lines[0]


def test_run_help_gives_each_flag_its_meaning_and_default() -> None:
    result = _sdserve("run", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for key in reference.config_keys():
        if not key.flag.startswith("--"):
            continue
        assert reference.flag_name(key.name) in text
        # argparse unescapes %% when it prints
        assert reference.flag_help(key.name).replace("%%", "%") in text, key.name
        assert f"default {key.default}" in text
    assert (
        "--bind ADDRESS addresses to bind when not socket-activated: "
        "HOST:PORT (a host name binds every address it resolves to), [V6]:PORT, PORT "
        "(127.0.0.1:PORT), unix:PATH; default 127.0.0.1:8080"
    ) in text
    assert f"default one per usable CPU (here {Config().workers})" in text
    assert "--shutdown-timeout DURATION" in text
    assert "default 25s" in text


def test_the_reference_is_light_to_import() -> None:
    """The command line renders the flags' help from it in every process (workers too):
    importing it must not import aiohttp (builtin_checks is imported for the check tables)."""
    code = "import sys, sdserve.reference; print('aiohttp' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "False"
