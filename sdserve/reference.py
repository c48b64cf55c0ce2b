"""The configuration reference, generated from the config dataclasses.

Every key of :class:`sdserve.config.Config` and its sections carries its meaning in
its field's ``metadata["doc"]``; the keys of the ``[checks.NAME]`` tables are listed
here, in the order and with the requirements that :mod:`sdserve.builtin_checks`
declares (``COMMON_KEYS``, ``TYPE_KEYS``, ``REQUIRED``; a test checks that they agree).
From these, this module
renders:

- the text of ``sdserve config --help-keys``;
- the help of every flag of ``sdserve run`` (meaning and default);
- the Markdown reference in README.md, between the markers below.

Regenerate the README's copy after changing a key::

    python -m sdserve.reference --update README.md
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import textwrap
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ENV_PREFIX, Config, Number

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
REGENERATE = "python -m sdserve.reference --update README.md"


@dataclass(frozen=True)
class Key:
    """One documented key."""

    #: as written in the file: ``backlog``, ``health.interval``; a check's key alone (``dsn``)
    name: str
    type: str
    #: rendered; "required" for a check key without a default
    default: str
    doc: str
    #: the command-line flag, "" when the key has none
    flag: str = ""
    #: the environment variable, "" when the key has none
    env: str = ""
    #: the default is a value (``25s``), not a description (``one per usable CPU``)
    literal: bool = True


# -- the config dataclasses --------------------------------------------------------------


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def has_flag(name: str, tp: Any) -> bool:
    """Whether a top-level key has a flag of its own name (``sdserve run --NAME``).

    ``app`` is the command's argument; sections and the check tables are for the file.
    """
    if name == "app" or _is_section(tp):
        return False
    origin = typing.get_origin(tp)
    return origin is None or origin in (tuple, typing.Literal)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_shown(name: str, tp: Any) -> str:
    if name == "app":
        return "argument"
    if not has_flag(name, tp):
        return ""
    flag = flag_name(name)
    if tp is bool:
        return f"{flag}, --no-{flag[2:]}"
    if typing.get_origin(tp) is tuple:
        return f"{flag} (repeatable)"
    return flag


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "boolean"
    if tp is int:
        return "integer"
    if tp is Number:
        return "number"
    if tp is float:
        return "duration"
    if tp is str:
        return "string"
    if origin is typing.Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    if origin is tuple:
        return "list of strings"
    raise TypeError(f"no name for the config type {tp!r}")


def render_value(value: Any, tp: Any = None) -> str:
    """A default as the reference shows it: ``25s``, ``true``, ``127.0.0.1:8080``, ``none``
    (``0.5`` for a key of type ``tp`` :data:`~sdserve.config.Number`)."""
    if tp is Number:
        return f"{value:g}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}s"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value or "none"
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) or "none"
    raise TypeError(f"no rendering for {value!r}")


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is dataclasses.MISSING:
        raise TypeError(f"config key {f.name} has no plain default")
    return f.default


def _doc(f: dataclasses.Field[Any], where: str) -> str:
    doc = f.metadata.get("doc")
    if not isinstance(doc, str) or not doc.strip():
        raise TypeError(f"config key {where} has no metadata['doc']")
    return doc


def _key(f: dataclasses.Field[Any], tp: Any, where: str, *, flag: str, env: str) -> Key:
    described = f.metadata.get("default")
    default = described if isinstance(described, str) else render_value(_field_default(f), tp)
    return Key(
        where,
        _type_name(tp),
        default,
        _doc(f, where),
        flag=flag,
        env=env,
        literal=described is None,
    )


@functools.cache
def config_keys() -> tuple[Key, ...]:
    """Every key of :class:`Config` and of its sections, top level first, in field order.

    The ``checks`` tables are not among them: see :func:`check_keys`. Computed once: every
    process that parses its command line (workers too) renders the flags' help.
    """
    top: list[Key] = []
    sections: list[Key] = []
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        tp = hints[f.name]
        if _is_section(tp):
            sub_hints = typing.get_type_hints(tp)
            for sub in dataclasses.fields(tp):
                env = f"{ENV_PREFIX}{f.name.upper()}__{sub.name.upper()}"
                where = f"{f.name}.{sub.name}"
                sections.append(_key(sub, sub_hints[sub.name], where, flag="", env=env))
        elif typing.get_origin(tp) in (None, tuple, typing.Literal):
            env = f"{ENV_PREFIX}{f.name.upper()}"
            top.append(_key(f, tp, f.name, flag=_flag_shown(f.name, tp), env=env))
    return (*top, *sections)


def section_docs() -> dict[str, str]:
    """The meaning of each table of :class:`Config`: ``health``, ``checks``."""
    hints = typing.get_type_hints(Config)
    return {
        f.name: _doc(f, f.name)
        for f in dataclasses.fields(Config)
        if typing.get_origin(hints[f.name]) not in (None, tuple, typing.Literal)
        or _is_section(hints[f.name])
    }


def _top_key(name: str) -> Key:
    return next(key for key in config_keys() if key.name == name)


def flag_help(name: str, *, default: bool = True) -> str:
    """The help of a top-level key's flag: its meaning and default (argparse-escaped)."""
    key = _top_key(name)
    text = _plain(key.doc)
    if default:
        text += f"; default {key.default}"
        if not key.literal:  # and the value it has on this machine
            text += f" (here {render_value(getattr(Config(), name))})"
    return text.replace("%", "%%")


# -- the [checks.NAME] tables ----------------------------------------------------------------

# builtin_checks imports aiohttp's client, which the command line does not need: it is
# imported when the check tables are rendered ({types} and {components} come from it).

#: type, default (None: see REQUIRED) and meaning of the keys every check table takes
_COMMON_DOCS: dict[str, tuple[str, str | None, str]] = {
    "type": ("string", None, "the kind of check: {types}"),
    "timeout": ("duration", "5s", "a run that takes longer has failed"),
    "critical": (
        "boolean",
        "true",
        "a critical check gates READY=1 and readiness; a failing optional one only warns",
    ),
    "continuous": (
        "boolean",
        "true",
        "re-run in the background after start; false: a start-up check only",
    ),
    "interval": ("duration", "health.interval", "how often it re-runs after start"),
    "component_type": (
        "string",
        "by type",
        "`componentType` in the health+json output; by default {components}",
    ),
}

_PASSWORD_DOCS: dict[str, tuple[str, str | None, str]] = {
    "password_env": (
        "string",
        "none",
        "the name of an environment variable that holds the password (never the config file)",
    ),
    "password_credential": (
        "string",
        "none",
        "a credential's name: the password is read from `$CREDENTIALS_DIRECTORY/NAME` "
        "(systemd's LoadCredential=); only one of the two",
    ),
}

#: the same for the keys of each type
_TYPE_DOCS: dict[str, dict[str, tuple[str, str | None, str]]] = {
    "postgres": {
        "dsn": (
            "string",
            None,
            "a `postgresql://` URI without a password; each run connects, runs `query` and closes",
        ),
        "query": ("string", "SELECT 1", "the statement each run executes"),
        **_PASSWORD_DOCS,
    },
    "redis": {
        "url": (
            "string",
            None,
            "a `redis://`, `rediss://` or `unix://` URL without a password; each run "
            "connects, sends PING and closes",
        ),
        **_PASSWORD_DOCS,
    },
    "tcp": {
        "host": ("string", None, "the host name or address to connect to"),
        "port": ("integer", None, "the port, 1 to 65535; a run opens a connection and closes it"),
    },
    "http": {
        "url": ("string", None, "an `http://` or `https://` URL to GET (redirects not followed)"),
        "status": (
            "integer or list",
            "200",
            "the status (or one of the statuses) the response must have",
        ),
        "body": (
            "regular expression",
            "none",
            "must be found in the first 64 KiB of the body",
        ),
    },
    "dns": {
        "name": ("string", None, "the name to resolve, with the system resolver"),
        "family": ("any | ipv4 | ipv6", "any", "the address family it must resolve to"),
    },
    "disk": {
        "path": ("string", None, "a path on the file system to watch"),
        "min_free": (
            "size",
            "0",
            "fail below this much space free for unprivileged users: bytes, or `512MB`, `2GiB`...",
        ),
        "min_free_percent": ("number", "0", "fail below this percentage free (0 to 100)"),
    },
    "file": {
        "path": ("string", None, "the path that must exist (a flag file, a mounted volume...)"),
    },
}


def _check_key(name: str, spec: tuple[str, str | None, str], required: bool, **fill: str) -> Key:
    tp, default, doc = spec
    if required != (default is None):
        raise TypeError(f"check key {name}: required is {required}, default {default!r}")
    return Key(name, tp, "required" if default is None else default, doc.format(**fill))


def check_keys() -> dict[str, list[Key]]:
    """The keys of every ``[checks.NAME]`` table (``""``), then those of each type."""
    from .builtin_checks import COMMON_KEYS, COMPONENT_TYPES, REQUIRED, TYPE_KEYS

    by_component: dict[str, list[str]] = {}
    for kind, component in COMPONENT_TYPES.items():
        by_component.setdefault(component, []).append(kind)
    fill = {
        "types": ", ".join(TYPE_KEYS),
        "components": "; ".join(f"{c} for {', '.join(k)}" for c, k in by_component.items()),
    }
    tables = {"": [_check_key(k, _COMMON_DOCS[k], k == "type", **fill) for k in COMMON_KEYS]}
    for kind, keys in TYPE_KEYS.items():
        docs = _TYPE_DOCS[kind]
        if set(docs) != set(keys):
            raise TypeError(f"{kind} check: documented {sorted(docs)}, declared {sorted(keys)}")
        tables[kind] = [_check_key(k, docs[k], k in REQUIRED[kind]) for k in keys]
    return tables


_CHECKS_ONLY_IN_FILE = (
    "read from the config file only (no flags, no environment variables); each type adds "
    "its own keys"
)


# -- text ------------------------------------------------------------------------------------


def _plain(text: str) -> str:
    return text.replace("`", "")


def _text_key(key: Key, label: str) -> Iterator[str]:
    default = "required" if key.default == "required" else f"default {key.default}"
    yield f"{label}  ({key.type}; {default})"
    where = [w for w in (key.flag, key.env) if w]
    if where:
        yield f"    {', '.join(where)}"
    yield from _wrap(key.doc, "    ")


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(_plain(text), width=88, initial_indent=indent, subsequent_indent=indent)


def render_text() -> str:
    """The reference as ``sdserve config --help-keys`` prints it."""
    lines = [
        "sdserve configuration keys. Layers, lowest first: these defaults, the TOML file",
        "(--config), SDSERVE_* environment variables, command-line flags. Durations are",
        "seconds or a number with a unit (250ms, 2s, 1min); lists in the environment are",
        "comma-separated; a repeated flag gives a list.",
    ]
    tables = section_docs()
    section = ""
    for key in config_keys():
        head, _, name = key.name.rpartition(".")
        if head != section:
            section = head
            lines += ["", f"[{section}]", *_wrap(tables[section], "  ")]
        lines.append("")
        lines.extend(_text_key(key, name))
    for kind, keys in check_keys().items():
        lines += ["", "[checks.NAME]" + (f'  type = "{kind}"' if kind else "  (every type)")]
        if not kind:
            lines += _wrap(f"{tables['checks']}; {_CHECKS_ONLY_IN_FILE}", "  ")
        for key in keys:
            lines.append("")
            lines.extend(_text_key(key, key.name))
    return "\n".join(lines) + "\n"


# -- Markdown ----------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


#: defaults that are words, not values
_WORDS = ("none", "required", "by type")


def _md_default(key: Key) -> str:
    return key.default if key.default in _WORDS or not key.literal else f"`{key.default}`"


def _md_flag(flag: str) -> str:
    if not flag or flag == "argument":
        return flag
    flags, paren, note = flag.partition(" (")
    return ", ".join(f"`{f}`" for f in flags.split(", ")) + (f" ({note}" if paren else "")


def render_markdown() -> str:
    """The reference as README.md holds it, between :data:`START` and :data:`END`."""
    keys = config_keys()
    tables = section_docs()
    out = [
        f"<!-- generated from the config dataclasses by `{REGENERATE}`: do not edit -->",
        "",
        "Every key: its type, default, flag, environment variable and meaning. A duration is",
        "seconds or a number with a unit (`250ms`, `2s`, `1min`); a number takes no unit;",
        "lists are comma-separated in the environment, and a repeated flag gives a list.",
        "",
    ]
    head = "| key | type | default | flag | environment | meaning |"
    rule = "|---|---|---|---|---|---|"
    section = None
    for key in keys:
        where, _, name = key.name.rpartition(".")
        if where != section:
            section = where
            title = f"`[{where}]`" if where else "Top level"
            if out[-1] != "":
                out.append("")
            out += [f"### {title}", ""]
            if where:
                out += [_sentence(tables[where]), ""]
            out += [head, rule]
        out.append(
            f"| `{name}` | {_cell(key.type)} | {_md_default(key)} | {_md_flag(key.flag)} "
            f"| `{key.env}` | {_cell(key.doc)} |"
        )
    for kind, check in check_keys().items():
        title = f'`[checks.NAME]`, `type = "{kind}"`' if kind else "`[checks.NAME]`, every type"
        out += ["", f"### {title}", ""]
        if not kind:
            out += [_sentence(f"{tables['checks']}; {_CHECKS_ONLY_IN_FILE}"), ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key in check:
            out.append(
                f"| `{key.name}` | {_cell(key.type)} | {_md_default(key)} | {_cell(key.doc)} |"
            )
    return "\n".join(out) + "\n"


def readme_section(text: str) -> str:
    """What a README holds between the markers; ValueError if it lacks them."""
    try:
        begin = text.index(START) + len(START) + 1
        end = text.index(END, begin)
    except ValueError:
        raise ValueError(f"no {START!r} ... {END!r} section") from None
    return text[begin:end]


def update_readme(path: Path) -> bool:
    """Write the current reference between the markers of ``path``; True if it changed."""
    text = path.read_text()
    old = readme_section(text)
    new = render_markdown()
    if old == new:
        return False
    begin = text.index(START) + len(START) + 1
    path.write_text(text[:begin] + new + text[begin + len(old) :])
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sdserve.reference", description="Print the configuration reference."
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--markdown", action="store_true", help="print it as Markdown")
    what.add_argument(
        "--update", type=Path, metavar="README", help="rewrite the section between the markers"
    )
    args = parser.parse_args(argv)
    if args.update is not None:
        try:
            changed = update_readme(args.update)
        except (OSError, ValueError) as exc:
            print(f"sdserve.reference: {args.update}: {exc}", file=sys.stderr)
            return 2
        print(f"{args.update}: {'updated' if changed else 'already up to date'}")
        return 0
    sys.stdout.write(render_markdown() if args.markdown else render_text())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
