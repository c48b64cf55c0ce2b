"""Built-in dependency checks, from code or from ``[checks.NAME]`` tables of the config file.

Each factory returns an async callable for :func:`sdserve.checks.add_check`;
:func:`add_builtin` registers one by type with the same keys as the config file,
and records its secrets so that they are redacted everywhere.

Keys of every ``[checks.NAME]`` table:

- ``type`` (required): ``postgres``, ``redis``, ``tcp``, ``http``, ``dns``, ``disk``, ``file``;
- ``timeout`` (duration, default 5s), ``critical`` (default true), ``continuous``
  (default true: re-run after start), ``interval`` (duration, default
  ``health.interval``), ``component_type`` (health+json ``componentType``).

Keys of each type:

- ``postgres``: ``dsn`` (required, a ``postgresql://`` URI without a password),
  ``query`` (default ``SELECT 1``), ``password_env`` or ``password_credential``;
- ``redis``: ``url`` (required: ``redis://``, ``rediss://`` or ``unix://``, no
  password), ``password_env`` or ``password_credential``;
- ``tcp``: ``host``, ``port`` (both required);
- ``http``: ``url`` (required), ``status`` (a code or a list, default 200),
  ``body`` (a regular expression searched in the first 64 KiB of the body);
- ``dns``: ``name`` (required), ``family`` (``any``, ``ipv4``, ``ipv6``);
- ``disk``: ``path`` (required), ``min_free`` (bytes, or ``512MB``, ``2GiB``...),
  ``min_free_percent``;
- ``file``: ``path`` (required).

Secrets never come from the config file: ``password_env = "PGPASSWORD"`` reads an
environment variable, ``password_credential = "pg"`` reads
``$CREDENTIALS_DIRECTORY/pg`` (systemd's ``LoadCredential=``). A DSN or URL with a
password in it is rejected there. From code, ``password=`` may be given directly.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checks import Check, CheckFailed, CheckFunc, CheckRegistry, CheckThread, registry
from .config import ConfigError

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "COMPONENT_TYPES",
    "add_builtin",
    "disk",
    "dns",
    "file_exists",
    "http",
    "postgres",
    "postgres_pool",
    "redis",
    "redis_client",
    "register_tables",
    "tcp",
    "url_secrets",
]

#: health+json ``componentType`` of each built-in type
COMPONENT_TYPES = {
    "postgres": "datastore",
    "redis": "datastore",
    "tcp": "component",
    "http": "component",
    "dns": "system",
    "disk": "system",
    "file": "system",
}

BODY_LIMIT = 64 * 1024


# -- the checks ------------------------------------------------------------------------


def postgres(
    dsn: str,
    *,
    password: str | None = None,
    query: str = "SELECT 1",
    application_name: str = "sdserve-check",
) -> CheckFunc:
    """Connect with asyncpg, run ``query``, close. One connection per run, none kept."""

    async def check() -> str:
        import asyncpg

        conn: Any = await asyncpg.connect(
            dsn, password=password, server_settings={"application_name": application_name}
        )
        try:
            await conn.fetchval(query)
        except BaseException:
            conn.terminate()
            raise
        version = conn.get_server_version()
        await conn.close()
        return f"PostgreSQL {version.major}"

    return check


def postgres_pool(pool: Any, query: str = "SELECT 1") -> CheckFunc:
    """Run ``query`` on a connection of the application's own asyncpg pool."""

    async def check() -> str:
        async with pool.acquire() as conn:
            await conn.fetchval(query)
        return f"pool of {pool.get_size()}"

    return check


def redis(
    url: str, *, password: str | None = None, client_name: str = "sdserve-check"
) -> CheckFunc:
    """Connect with redis-py's asyncio client, PING, close. No retries: one attempt per run."""

    async def check() -> str:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        client = Redis.from_url(
            url, password=password, client_name=client_name, retry=Retry(NoBackoff(), 0)
        )
        try:
            await client.ping()
        finally:
            await client.aclose()
        return "PONG"

    return check


def redis_client(client: Any) -> CheckFunc:
    """PING through the application's own redis-py asyncio client."""

    async def check() -> str:
        await client.ping()
        return "PONG"

    return check


def tcp(host: str, port: int) -> CheckFunc:
    """Open a TCP connection and close it."""

    async def check() -> str:
        _reader, writer = await asyncio.open_connection(host, port)
        writer.close()
        await writer.wait_closed()
        return f"connected to {_hostport(host, port)}"

    return check


def http(
    url: str, *, status: tuple[int, ...] = (200,), body: str | re.Pattern[str] | None = None
) -> CheckFunc:
    """GET ``url`` (no redirects followed): the status must be one of ``status``,
    and ``body`` (a regular expression) must match the start of the body when given.
    """
    pattern = re.compile(body) if isinstance(body, str) else body

    async def check() -> str:
        import aiohttp  # here: validating the config tables must not import aiohttp

        connector = aiohttp.TCPConnector(force_close=True, limit=1)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout()) as session,
            session.get(url, allow_redirects=False) as resp,
        ):
            if resp.status not in status:
                want = " or ".join(map(str, status))
                raise CheckFailed(f"HTTP {resp.status}, expected {want}")
            if pattern is not None:
                text = (await resp.content.read(BODY_LIMIT)).decode("utf-8", "replace")
                if pattern.search(text) is None:
                    raise CheckFailed(
                        f"HTTP {resp.status}, body does not match {pattern.pattern!r}"
                    )
            return f"HTTP {resp.status}"

    return check


_FAMILIES = {"any": socket.AF_UNSPEC, "ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}


def dns(name: str, *, family: str = "any") -> CheckFunc:
    """Resolve ``name`` (the system resolver, as the application would), in the check's own
    thread: a resolver that hangs cannot take the loop's own lookups with it."""
    fam = _FAMILIES[family]
    thread = CheckThread(f"resolving {name}")

    async def check() -> str:
        infos = await thread.call(socket.getaddrinfo, name, None, fam, socket.SOCK_STREAM)
        addresses = sorted({str(info[4][0]) for info in infos})
        if not addresses:
            raise CheckFailed(f"{name} resolved to no address")
        more = f" (+{len(addresses) - 3})" if len(addresses) > 3 else ""
        return ", ".join(addresses[:3]) + more

    return check


def disk(path: str, *, min_free: int = 0, min_free_percent: float = 0.0) -> CheckFunc:
    """Free space for unprivileged users on the filesystem of ``path``."""
    thread = CheckThread(f"statvfs({path})")

    async def check() -> str:
        st = await thread.call(os.statvfs, path)
        free = st.f_bavail * st.f_frsize
        total = st.f_blocks * st.f_frsize
        percent = 100.0 * free / total if total else 0.0
        text = f"{_size(free)} free ({percent:.1f}%) on {path}"
        if free < min_free:
            raise CheckFailed(f"{text}, below {_size(min_free)}")
        if percent < min_free_percent:
            raise CheckFailed(f"{text}, below {min_free_percent:g}%")
        return text

    return check


def file_exists(path: str) -> CheckFunc:
    """``path`` must exist (a flag file, a mounted volume, a certificate...)."""
    thread = CheckThread(f"stat({path})")

    async def check() -> str:
        try:
            await thread.call(os.stat, path)
        except FileNotFoundError:
            raise CheckFailed(f"{path} does not exist") from None
        return f"{path} exists"

    return check


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


# -- secrets ---------------------------------------------------------------------------


def url_secrets(url: str) -> set[str]:
    """The passwords inside a DSN or URL (userinfo or ``password=`` query), plain and quoted."""
    found: set[str] = set()
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password:
            found.add(urllib.parse.unquote(parts.password))
        for key, value in urllib.parse.parse_qsl(parts.query):
            if key.lower() in ("password", "pass", "passwd"):
                found.add(value)
    except ValueError:
        pass  # not a URL: only the keyword form below can hold a password
    for match in re.finditer(r"password\s*=\s*(?:'([^']*)'|(\S+))", url, re.IGNORECASE):
        found.add(match.group(1) or match.group(2) or "")
    found.discard("")
    return found | {urllib.parse.quote(s, safe="") for s in found}


def _with_secret(reg: CheckRegistry, secret: str | None) -> str | None:
    if secret:
        reg.secrets.add(secret)
        reg.secrets.add(urllib.parse.quote(secret, safe=""))
    return secret


# -- tables: config file and add_builtin -----------------------------------------------

COMMON_KEYS = ("type", "timeout", "critical", "continuous", "interval", "component_type")
SECRET_KEYS = ("password_env", "password_credential")
TYPE_KEYS: dict[str, tuple[str, ...]] = {
    "postgres": ("dsn", "query", *SECRET_KEYS),
    "redis": ("url", *SECRET_KEYS),
    "tcp": ("host", "port"),
    "http": ("url", "status", "body"),
    "dns": ("name", "family"),
    "disk": ("path", "min_free", "min_free_percent"),
    "file": ("path",),
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "postgres": ("dsn",),
    "redis": ("url",),
    "tcp": ("host", "port"),
    "http": ("url",),
    "dns": ("name",),
    "disk": ("path",),
    "file": ("path",),
}

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|sec|min|m|h)?\s*$")
_DURATION_UNITS = {
    None: 1.0,
    "s": 1.0,
    "sec": 1.0,
    "ms": 0.001,
    "min": 60.0,
    "m": 60.0,
    "h": 3600.0,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1024, "mi": 1024**2}
_SIZE_UNITS |= {"gi": 1024**3, "ti": 1024**4, "b": 1, "": 1}

_MISSING = object()


@dataclass
class _Table:
    """One ``[checks.NAME]`` table being read; problems name ``checks.NAME.key``."""

    name: str
    raw: Mapping[str, Any]
    problems: list[str]

    def where(self, key: str | None = None) -> str:
        return f"checks.{self.name}" + (f".{key}" if key else "")

    def problem(self, key: str | None, message: str) -> None:
        self.problems.append(f"{self.where(key)}: {message}")

    def value(self, key: str, convert: Callable[[Any], Any], what: str, default: Any) -> Any:
        if key not in self.raw:
            return default
        raw = self.raw[key]
        try:
            return convert(raw)
        except (TypeError, ValueError, re.error) as exc:
            detail = f" ({exc})" if str(exc) else ""
            shown = repr(raw)
            if isinstance(raw, str):  # never echo a password back, even of a bad URL
                for secret in url_secrets(raw):
                    shown = shown.replace(secret, "***")
            self.problem(key, f"expected {what}, got {shown}{detail}")
            return _MISSING

    def string(self, key: str, default: Any = None) -> Any:
        return self.value(key, _string, "a string", default)


def _string(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise TypeError
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError
    return v


def _duration(v: Any) -> float:
    if isinstance(v, int | float) and not isinstance(v, bool):
        seconds = float(v)
    elif isinstance(v, str) and (m := _DURATION.match(v)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise TypeError
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError("must be greater than 0")
    return seconds


def _port(v: Any) -> int:
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError
    if not 0 < v < 65536:
        raise ValueError("must be 1 to 65535")
    return v


def _statuses(v: Any) -> tuple[int, ...]:
    items = v if isinstance(v, list | tuple) else [v]
    if not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise TypeError
    if not all(100 <= i <= 599 for i in items):
        raise ValueError("HTTP status codes are 100 to 599")
    return tuple(items)


def _size_value(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        n = float(v)
    elif isinstance(v, str) and (m := _SIZE.match(v)):
        unit = (m.group(2) or "").lower().removesuffix("b") if m.group(2) != "b" else "b"
        n = float(m.group(1)) * _SIZE_UNITS[unit]
    else:
        raise TypeError
    if n < 0:
        raise ValueError("must not be negative")
    return int(n)


def _percent(v: Any) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise TypeError
    if not 0 <= v <= 100:
        raise ValueError("must be 0 to 100")
    return float(v)


def _family(v: Any) -> str:
    if v not in _FAMILIES:
        raise ValueError("one of any, ipv4, ipv6")
    return str(v)


def _regex(v: Any) -> re.Pattern[str]:
    return re.compile(_string(v))


def _url(schemes: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(v: Any) -> str:
        text = _string(v)
        scheme = urllib.parse.urlsplit(text).scheme
        if scheme not in schemes:
            raise ValueError(f"a URL with scheme {' or '.join(schemes)}")
        return text

    return convert


def _secret(table: _Table, environ: Mapping[str, str], given: str | None) -> str | None:
    """The password: given directly (code only), from the environment, or a credential."""
    env_name = table.string("password_env")
    cred_name = table.string("password_credential")
    sources = [s for s in (given, env_name, cred_name) if s not in (None, _MISSING)]
    if len(sources) > 1:
        table.problem(None, "give only one of password_env and password_credential")
        return None
    if isinstance(env_name, str):
        value = environ.get(env_name)
        if not value:
            table.problem("password_env", f"environment variable {env_name} is not set")
        return value
    if isinstance(cred_name, str):
        directory = environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            table.problem(
                "password_credential",
                "CREDENTIALS_DIRECTORY is not set (LoadCredential= in the unit provides it)",
            )
            return None
        if "/" in cred_name or cred_name in (".", ".."):
            table.problem("password_credential", f"not a credential name: {cred_name!r}")
            return None
        try:
            return (Path(directory) / cred_name).read_text().rstrip("\r\n")
        except OSError as exc:
            table.problem(
                "password_credential", f"cannot read credential {cred_name!r}: {exc.strerror}"
            )
            return None
    return given


def _build(
    reg: CheckRegistry,
    name: str,
    raw: Mapping[str, Any],
    problems: list[str],
    environ: Mapping[str, str],
    *,
    from_file: bool,
    password: str | None = None,
) -> Check | None:
    table = _Table(name, raw, problems)
    start = len(problems)
    kind = raw.get("type")
    if kind not in TYPE_KEYS:
        table.problem("type", f"expected one of {', '.join(TYPE_KEYS)}, got {kind!r}")
        return None
    allowed = (*COMMON_KEYS, *TYPE_KEYS[kind])
    for key in raw:
        if key in allowed:
            continue
        if key == "password" or key.endswith(("_password", "_secret")):
            table.problem(
                key,
                "secrets are never read from the config file: "
                "use password_env or password_credential",
            )
        else:
            table.problem(key, f"unknown key for a {kind} check (known: {', '.join(allowed)})")
    for key in REQUIRED[kind]:
        if key not in raw:
            table.problem(key, f"required for a {kind} check")
    timeout = table.value("timeout", _duration, "a duration greater than 0", 5.0)
    critical = table.value("critical", _bool, "true or false", True)
    continuous = table.value("continuous", _bool, "true or false", True)
    interval = table.value("interval", _duration, "a duration greater than 0", None)
    component_type = table.string("component_type", COMPONENT_TYPES[kind])
    func: CheckFunc | None = None
    if kind == "postgres":
        dsn = table.value("dsn", _url(("postgres", "postgresql")), "a postgresql:// URI", None)
        query = table.string("query", "SELECT 1")
        secret = _secret(table, environ, password)
        if isinstance(dsn, str):
            if from_file and url_secrets(dsn):
                table.problem(
                    "dsn", "must not contain a password: use password_env or password_credential"
                )
            reg.secrets |= url_secrets(dsn)
            func = postgres(
                dsn,
                password=_with_secret(reg, secret),
                query=query,
                application_name=f"sdserve-check:{name}",
            )
    elif kind == "redis":
        url = table.value("url", _url(("redis", "rediss", "unix")), "a redis:// URL", None)
        secret = _secret(table, environ, password)
        if isinstance(url, str):
            if from_file and url_secrets(url):
                table.problem(
                    "url", "must not contain a password: use password_env or password_credential"
                )
            reg.secrets |= url_secrets(url)
            func = redis(
                url, password=_with_secret(reg, secret), client_name=f"sdserve-check-{name}"
            )
    elif kind == "tcp":
        host = table.string("host")
        port = table.value("port", _port, "a port number", None)
        if isinstance(host, str) and isinstance(port, int):
            func = tcp(host, port)
    elif kind == "http":
        url = table.value("url", _url(("http", "https")), "an http:// or https:// URL", None)
        status = table.value("status", _statuses, "an HTTP status or a list of them", (200,))
        body = table.value("body", _regex, "a regular expression", None)
        if isinstance(url, str):
            if from_file and url_secrets(url):
                table.problem("url", "must not contain a password")
            reg.secrets |= url_secrets(url)
            func = http(url, status=status, body=body)
    elif kind == "dns":
        dns_name = table.string("name")
        family = table.value("family", _family, "any, ipv4 or ipv6", "any")
        if isinstance(dns_name, str) and isinstance(family, str):
            func = dns(dns_name, family=family)
    elif kind == "disk":
        path = table.string("path")
        min_free = table.value("min_free", _size_value, "a size (bytes, 512MB, 2GiB...)", 0)
        min_pct = table.value("min_free_percent", _percent, "a percentage", 0.0)
        if isinstance(path, str):
            func = disk(path, min_free=min_free, min_free_percent=min_pct)
    elif kind == "file":
        path = table.string("path")
        if isinstance(path, str):
            func = file_exists(path)
    if len(problems) > start or func is None:
        return None
    return Check(name, func, timeout, critical, continuous, component_type, interval)


def register_tables(
    reg: CheckRegistry,
    tables: Mapping[str, Mapping[str, Any]],
    environ: Mapping[str, str] | None = None,
) -> list[Check]:
    """Register ``[checks.NAME]`` tables; all problems at once in one ConfigError.

    Nothing is registered unless every table is valid.
    """
    env = os.environ if environ is None else environ
    problems: list[str] = []
    built: list[Check] = []
    for name, raw in tables.items():
        if not isinstance(raw, Mapping):
            problems.append(f"checks.{name}: expected a table")
            continue
        if name in reg.checks:
            problems.append(
                f"checks.{name}: the application already registers a check of that name"
            )
        check = _build(reg, name, raw, problems, env, from_file=True)
        if check is not None:
            built.append(check)
    if problems:
        raise ConfigError(problems)
    for check in built:
        reg.add(check)
    return built


def add_builtin(
    app: web.Application | CheckRegistry,
    name: str,
    kind: str,
    *,
    password: str | None = None,
    environ: Mapping[str, str] | None = None,
    **keys: Any,
) -> Check:
    """Register a built-in check from code, with the keys of a ``[checks.NAME]`` table.

    Unlike the config file, code may pass ``password=`` (or a DSN with a password in
    it); either way the secret is added to the registry and redacted everywhere.
    Raises :class:`ConfigError` naming every bad key.
    """
    reg = app if isinstance(app, CheckRegistry) else registry(app)
    problems: list[str] = []
    check = _build(
        reg,
        name,
        {"type": kind, **keys},
        problems,
        os.environ if environ is None else environ,
        from_file=False,
        password=password,
    )
    if problems or check is None:
        raise ConfigError(problems or [f"checks.{name}: invalid"])
    return reg.add(check)
