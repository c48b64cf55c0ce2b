"""``sdserve drill``: the command line.

Exit status: 0 when failures <= ``--max-failures``; 1 when there were more; 2 for bad
arguments, or without the ``drill`` extra (``pip install 'sdserve[drill]'``; said by
``sdserve.cli``, since this package does not import without it); 3 when an action failed
or the drill itself could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from pathlib import Path

from sdserve.drill.actions import (
    Action,
    PidSource,
    Schedule,
    command,
    const_pid,
    kill_worker,
    parse_signal,
    pid_from_command,
    pid_from_file,
    send_signal,
)
from sdserve.drill.client import TargetError
from sdserve.drill.result import DrillResult
from sdserve.drill.runner import DrillError, run_drill
from sdserve.drill.schema import DrillJson
from sdserve.drill.spec import DrillSpec, Target, default_processes
from sdserve.drill.text import render_text

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_DRILL = 3

ACTION_HELP = """\
An action is KIND followed by key=value words (quote the whole thing):
  restart                  the --restart-cmd template (default: systemctl restart {unit})
  reload                   the --reload-cmd template (default: systemctl reload {unit})
  command cmd='...'        any command template
  signal signal=HUP        a signal to the target PID (--pid / --pidfile / --pid-cmd)
  kill-worker [signal=KILL] a signal to the oldest child of the target PID
  outage cmd='...' end_cmd='...' hold=S   start a dependency outage, end it S s later
Schedule keys for every kind: times=N (1), every=T (5), at=S (first run, 1 s in),
gap=G (a run starts at least G s after the previous one ended; 0).
Actions with the same group=NAME never overlap (a run waits for the one in progress);
restart and reload are in group "unit" unless told otherwise.
Templates may use {unit} and {pid}.  Example:
  sdserve drill http://127.0.0.1:8080/ --rate 2000 -d 60 --unit demo \\
      --action 'restart times=10 every=5 at=3'"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the drill's options to ``parser`` (the ``drill`` subcommand)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ACTION_HELP
    parser.add_argument(
        "targets",
        nargs="*",
        metavar="[WEIGHT=]URL",
        help="http:// URLs on 127.0.0.1 or ::1, with an optional relative weight",
    )
    load = parser.add_argument_group("load")
    load.add_argument("-d", "--duration", type=float, default=10.0, help="seconds (10)")
    load.add_argument("-r", "--rate", type=float, help="open loop: requests per second in total")
    load.add_argument("-c", "--concurrency", type=int, default=16, help="closed loop: clients (16)")
    load.add_argument(
        "--keepalive",
        type=float,
        default=1.0,
        help="fraction of requests (open loop) or clients (closed loop) on keep-alive "
        "connections; the rest open a new connection per request (1.0)",
    )
    load.add_argument("--timeout", type=float, default=5.0, help="per request, seconds (5)")
    load.add_argument(
        "--max-idle",
        type=int,
        default=32,
        help="idle keep-alive connections each process keeps per URL (32)",
    )
    load.add_argument(
        "-p",
        "--processes",
        type=int,
        default=default_processes(),
        help=f"load processes ({default_processes()})",
    )
    load.add_argument("--ws-url", help="ws:// URL of a WebSocket echo endpoint")
    load.add_argument("--ws-clients", type=int, default=0, help="long-lived WebSocket clients")
    load.add_argument("--ws-interval", type=float, default=0.5, help="seconds between echoes")
    load.add_argument(
        "--after-window", type=float, default=2.0, help="length of the 'after' phase (2 s)"
    )
    act = parser.add_argument_group("actions and target")
    act.add_argument("-a", "--action", action="append", default=[], help="see below")
    act.add_argument("--unit", default="", help="systemd unit, for {unit} in templates")
    act.add_argument("--restart-cmd", default="systemctl restart {unit}")
    act.add_argument("--reload-cmd", default="systemctl reload {unit}")
    pid = act.add_mutually_exclusive_group()
    pid.add_argument("--pid", type=int, help="the target's main PID")
    pid.add_argument("--pidfile", type=Path, help="a file holding the target's main PID")
    pid.add_argument(
        "--pid-cmd",
        help="a command printing the main PID (default with --unit: "
        "systemctl show -p MainPID --value {unit})",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--json", type=Path, help="write the result as JSON (schema sdserve.drill/1)")
    out.add_argument("--html", type=Path, help="write the HTML report")
    out.add_argument("--max-failures", type=int, default=0, help="exit 1 above this (0)")
    out.add_argument("-q", "--quiet", action="store_true", help="no live progress")


def parse_targets(values: list[str]) -> tuple[Target, ...]:
    out: list[Target] = []
    for v in values:
        weight, url = 1.0, v
        head, sep, rest = v.partition("=")
        if sep and "://" not in head:
            try:
                weight = float(head)
            except ValueError:
                raise ValueError(f"{v!r}: expected [WEIGHT=]URL") from None
            url = rest
        out.append(Target(url, weight))
    return tuple(out)


def pid_source_from(args: argparse.Namespace) -> PidSource | None:
    if args.pid is not None:
        return const_pid(args.pid)
    if args.pidfile is not None:
        return pid_from_file(args.pidfile)
    template = args.pid_cmd or ("systemctl show -p MainPID --value {unit}" if args.unit else None)
    if template:
        return pid_from_command(template, {"unit": args.unit})
    return None


def parse_action(text: str, args: argparse.Namespace, pid: PidSource | None) -> Action:
    """One ``--action`` value."""
    words = shlex.split(text)
    if not words:
        raise ValueError("empty --action")
    kind, opts = words[0], {}
    for w in words[1:]:
        key, sep, value = w.partition("=")
        if not sep:
            raise ValueError(f"--action {text!r}: expected key=value, got {w!r}")
        opts[key.replace("-", "_")] = value
    schedule = Schedule(
        times=int(opts.pop("times", "1")),
        every=float(opts.pop("every", "5")),
        start=float(opts.pop("at", "1")),
        min_gap=float(opts.pop("gap", "0")),
    )
    fields = {"unit": args.unit, "pid": args.pid if args.pid is not None else ""}
    hold = 0.0
    end = None
    name = kind
    if kind in ("restart", "reload"):
        template = opts.pop("cmd", args.restart_cmd if kind == "restart" else args.reload_cmd)
        if "{unit}" in template and not args.unit:
            raise ValueError(f"--action {kind} needs --unit (or cmd=...)")
        run = command(template, fields)
    elif kind == "command":
        run = command(opts.pop("cmd"), fields)
        name = opts.pop("name", "command")
    elif kind in ("signal", "kill-worker"):
        if pid is None:
            raise ValueError(f"--action {kind} needs --pid, --pidfile, --pid-cmd or --unit")
        default = "HUP" if kind == "signal" else "KILL"
        sig = parse_signal(opts.pop("signal", default))
        run = send_signal(sig, pid) if kind == "signal" else kill_worker(pid, sig)
        name = f"{kind} {sig.name}"
    elif kind == "outage":
        run = command(opts.pop("cmd"), fields)
        end = command(opts.pop("end_cmd"), fields)
        hold = float(opts.pop("hold", "1"))
    else:
        raise ValueError(f"unknown action kind {kind!r}")
    group = opts.pop("group", "unit" if kind in ("restart", "reload") else None)
    if opts:
        raise ValueError(f"--action {text!r}: unknown keys {sorted(opts)}")
    return Action(name, run, schedule, end=end, hold=hold, group=group)


def spec_from(args: argparse.Namespace) -> DrillSpec:
    spec = DrillSpec(
        targets=parse_targets(args.targets),
        duration=args.duration,
        rate=args.rate,
        concurrency=args.concurrency,
        keepalive=args.keepalive,
        timeout=args.timeout,
        max_idle=args.max_idle,
        processes=args.processes,
        ws_url=args.ws_url,
        ws_clients=args.ws_clients,
        ws_interval=args.ws_interval,
        after_window=args.after_window,
    )
    spec.validate()
    return spec


def write_outputs(doc: DrillJson, json_path: Path | None, html_path: Path | None) -> list[str]:
    written = []
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(doc, indent=1) + "\n")
        written.append(f"JSON: {json_path}")
    if html_path is not None:
        from sdserve.drill.html import render_html  # matplotlib: only when asked for

        html_path.parent.mkdir(parents=True, exist_ok=True)
        html_path.write_text(render_html(doc))
        written.append(f"HTML report: {html_path} ({html_path.stat().st_size:,} bytes)")
    return written


def verdict(result: DrillResult, doc: DrillJson) -> int:
    if result.errors or any(not a.ok for a in result.actions):
        return EXIT_DRILL
    return EXIT_OK if doc["passed"] else EXIT_FAILURES


def run(args: argparse.Namespace) -> int:
    """Run the drill the arguments describe; the exit status (see the module docstring)."""
    try:
        spec = spec_from(args)
        pid = pid_source_from(args)
        actions = [parse_action(a, args, pid) for a in args.action]
    except (ValueError, TargetError, KeyError) as exc:
        print(f"sdserve drill: {exc}", file=sys.stderr)
        return EXIT_USAGE
    show = not args.quiet and sys.stderr.isatty()
    try:
        if show:
            from sdserve.drill.live import LiveProgress

            with LiveProgress() as live:
                result = asyncio.run(
                    run_drill(spec, actions, pid_source=pid, on_progress=live.update)
                )
        else:
            result = asyncio.run(run_drill(spec, actions, pid_source=pid))
    except (DrillError, ValueError, TargetError) as exc:
        print(f"sdserve drill: {exc}", file=sys.stderr)
        return EXIT_DRILL
    doc = result.to_json(args.max_failures)
    sys.stdout.write(render_text(doc))
    for line in write_outputs(doc, args.json, args.html):
        print(line)
    return verdict(result, doc)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m sdserve.drill``)."""
    parser = argparse.ArgumentParser(prog="sdserve drill", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
