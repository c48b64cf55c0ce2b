"""``sdserve check MODULE:FACTORY``: run every dependency check once, print a table.

Operators run it before a deploy, with the same config file as the service:
``sdserve check myapp:create_app --config /etc/myapp/sdserve.toml``. It builds
the application, registers the ``[checks.NAME]`` tables of the config file,
runs the application's start-up hooks (``on_startup``: many checks use a pool
or client the app opens there; ``--no-startup`` skips them, and checks that need
them then fail), runs every check once, concurrently, each bounded by its
timeout, then the app's shutdown and cleanup hooks. Warm-up steps are not run.

Exit status: 0 when every critical check passed (optional ones may fail: shown as
``warn``), 1 when a critical check failed, 2 for a configuration error, 3 when
the application cannot be loaded or its start-up hooks fail. Outputs are
redacted of secrets like everywhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TextIO

from aiohttp import web

from .appload import AppLoadError, build_app, format_app_traceback
from .checks import (
    CheckRegistry,
    CheckResult,
    checks_from_config,
    registry,
    run_bounded,
    run_check,
    table_problems,
)
from .config import Config, ConfigError, load_config

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_STARTUP = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Run every dependency check of an application once and print a table."
    parser.epilog = (
        "exit status: 0 when every critical check passed, 1 when one failed, "
        "2 for a configuration error, 3 when the application does not load or its "
        "start-up hooks fail"
    )
    parser.add_argument("app", nargs="?", help="the application, MODULE:FACTORY")
    parser.add_argument("-c", "--config", type=Path, help="TOML configuration file")
    parser.add_argument(
        "--no-startup",
        action="store_true",
        help="do not run the application's on_startup hooks before the checks",
    )
    parser.add_argument(
        "--format", choices=("table", "json"), default="table", help="output format"
    )


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _verdict(result: CheckResult) -> str:
    if result.ok:
        return "pass"
    return "FAIL" if result.critical else "warn"


def report(reg: CheckRegistry, results: list[CheckResult], out: TextIO, fmt: str) -> None:
    if fmt == "json":
        items = [
            {
                "name": r.name,
                "componentType": reg.checks[r.name].component_type,
                "critical": r.critical,
                "status": _verdict(r).lower(),
                "observedValue": round(r.duration * 1000, 3),
                "observedUnit": "ms",
                "output": r.output,
            }
            for r in results
        ]
        out.write(json.dumps({"checks": items}, indent=2) + "\n")
        return
    rows = [["CHECK", "TYPE", "CRITICAL", "RESULT", "TIME", "OUTPUT"]]
    for r in results:
        rows.append(
            [
                r.name,
                reg.checks[r.name].component_type,
                "yes" if r.critical else "no",
                _verdict(r),
                f"{r.duration * 1000:.1f} ms",
                r.output,
            ]
        )
    out.write(_table(rows))
    failed = sum(1 for r in results if not r.ok and r.critical)
    warned = sum(1 for r in results if not r.ok and not r.critical)
    out.write(
        f"\n{len(results)} check(s): {len(results) - failed - warned} passed, "
        f"{failed} critical failed, {warned} optional failed\n"
    )


async def check_app(
    cfg: Config, *, startup: bool, out: TextIO, err: TextIO, fmt: str = "table"
) -> int:
    """Build the app, run its checks once, print the report; returns the exit status."""
    try:
        app = await build_app(cfg.app)
    except AppLoadError as exc:
        err.write(f"sdserve check: {exc}\n")
        if exc.__cause__ is not None:  # the application's own error: its traceback
            err.write(format_app_traceback(exc.__cause__) + "\n")
        return EXIT_STARTUP
    reg = registry(app)
    checks_from_config(reg, cfg.checks)
    runner: web.AppRunner | None = None
    if startup:
        runner = web.AppRunner(app, handle_signals=False)
        try:
            async with asyncio.timeout(cfg.start_timeout):
                await runner.setup()
        except Exception as exc:
            err.write(f"sdserve check: the application's start-up hooks failed: {exc!r}\n")
            return EXIT_STARTUP
    try:
        if not reg.checks:
            err.write(f"sdserve check: {cfg.app} registers no checks\n")
            return EXIT_OK
        results = list(await asyncio.gather(*(run_check(c, reg) for c in reg.checks.values())))
        report(reg, results, out, fmt)
        return EXIT_CHECK_FAILED if any(not r.ok and r.critical for r in results) else EXIT_OK
    finally:
        if runner is not None:
            try:
                async with asyncio.timeout(cfg.cleanup_timeout):
                    await runner.cleanup()
            except TimeoutError:
                err.write(
                    "sdserve check: the application's shutdown/cleanup hooks did not finish "
                    f"in {cfg.cleanup_timeout:g}s\n"
                )


def run(args: argparse.Namespace) -> int:
    overrides = {"app": args.app} if args.app else {}
    cfg = load_config(toml_path=args.config, overrides=overrides, check_tables=table_problems)
    if not cfg.app:
        raise ConfigError(["app: no application given (sdserve check MODULE:FACTORY)"])
    # Not asyncio.run(): it would wait forever for a check run that ignores cancellation.
    return run_bounded(
        check_app(
            cfg, startup=not args.no_startup, out=sys.stdout, err=sys.stderr, fmt=args.format
        ),
        grace=1.0,
    )
