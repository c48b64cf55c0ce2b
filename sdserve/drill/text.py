"""The text summary of a drill."""

from __future__ import annotations

from typing import Any

from sdserve.drill.outcome import CLASSES
from sdserve.drill.schema import DrillJson, PhaseJson

_PHASES = ("overall", "steady", "during", "after")


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _codes(phase: PhaseJson) -> str:
    parts = [f"{k}: {v}" for k, v in sorted(phase["status_5xx"].items())]
    parts += [f"{k}: {v}" for k, v in sorted(phase["status_other"].items())]
    return ", ".join(parts)


def describe_load(doc: DrillJson) -> str:
    spec = doc["spec"]
    if spec["mode"] == "open":
        load = f"open loop at {spec['rate']:g} req/s"
    else:
        load = f"closed loop, {spec['concurrency']} clients"
    ka = f"keep-alive {spec['keepalive'] * 100:.0f}%"
    ws = f", {spec['ws_clients']} WebSocket clients" if spec["ws_clients"] else ""
    return f"{load}, {ka}{ws}, {spec['processes']} processes"


def render_text(doc: DrillJson) -> str:
    """A plain-text summary of a drill's JSON document."""
    phases: dict[str, Any] = dict(doc["phases"])
    overall = doc["phases"]["overall"]
    n = overall["requests"]
    dur = doc["duration_s"]
    rate = n / dur if dur > 0 else 0.0
    lines = [
        f"sdserve drill: {n:,} requests in {dur:.1f} s ({rate:,.0f} req/s); {describe_load(doc)}",
        f"result: {'PASS' if doc['passed'] else 'FAIL'} "
        f"({overall['failures']:,} failures, limit {doc['max_failures']:,})",
        "",
        f"{'class':<16}" + "".join(f"{p:>12}" for p in _PHASES),
    ]
    for cls in CLASSES:
        row = "".join(f"{phases[p]['classes'][cls]:>12,}" for p in _PHASES)
        lines.append(f"{cls:<16}{row}")
    if _codes(overall):
        lines.append(f"{'  by status':<16}{_codes(overall)}")
    lines += ["", f"{'latency ms':<16}" + "".join(f"{p:>12}" for p in _PHASES)]
    for key in ("p50", "p90", "p99", "p99.9", "max"):
        row = ""
        for p in _PHASES:
            row += f"{_ms(phases[p]['latency_ms'][key]):>12}"
        lines.append(f"{key:<16}{row}")
    lines.append(
        f"{'responses':<16}" + "".join(f"{phases[p]['latency_ms']['count']:>12,}" for p in _PHASES)
    )

    if doc["actions"]:
        lines += ["", "actions:"]
        by_name: dict[str, list[float]] = {}
        failed: list[str] = []
        for a in doc["actions"]:
            by_name.setdefault(a["name"], []).append(a["end_s"] - a["start_s"])
            if not a["ok"]:
                failed.append(
                    f"  FAILED {a['name']} #{a['number']} at {a['start_s']:.1f} s: {a['detail']}"
                )
        for name, times in by_name.items():
            during = doc["by_action"].get(name)
            extra = ""
            if during is not None:
                extra = (
                    f"; meanwhile {during['requests']:,} requests, "
                    f"{during['failures']:,} failed, p99 {_ms(during['latency_ms']['p99'])} ms"
                )
            lines.append(
                f"  {name:<14} x{len(times):<4} took {min(times):.2f}-{max(times):.2f} s{extra}"
            )
        lines += failed

    lines += ["", "targets:"]
    for t in doc["targets"]:
        lines.append(
            f"  {t['url']:<44} {t['requests']:>9,} requests {t['failures']:>7,} failures"
            f"  p99 {_ms(t['latency_ms']['p99'])} ms"
        )
    conns = doc["connections"]
    lines.append(
        f"  connections: {conns['new']['requests']:,} requests on new ones "
        f"({conns['new']['failures']:,} failed), {conns['reused']['requests']:,} on reused "
        f"keep-alive connections or WebSocket sessions ({conns['reused']['failures']:,} failed)"
    )
    if conns["keepalive_opened"]:
        lines.append(
            f"  keep-alive connections: {conns['keepalive_opened']:,} opened, "
            f"{conns['keepalive_closed_by_server']:,} closed by the server"
        )
    ws = doc["websocket"]
    if ws["sessions"]:
        lines.append(
            f"  websocket sessions {ws['sessions']}, closed cleanly by the server "
            f"{ws['clean_closes']}, dropped {ws['abnormal_closes']}"
        )
    res = [r for r in doc["resources"] if r["pid"] is not None]
    if res:
        fds = [r["fds"] for r in res]
        rss = [r["rss_bytes"] / 2**20 for r in res]
        procs = [r["processes"] for r in res]
        pids = sorted({r["pid"] for r in res if r["pid"] is not None})
        lines += [
            "",
            f"target: {len(pids)} main PID(s); fds {min(fds)}-{max(fds)}, "
            f"RSS {min(rss):.0f}-{max(rss):.0f} MiB, processes {min(procs)}-{max(procs)}",
        ]
    host = doc["host"]
    lines.append(
        f"host: {host['cpus']} CPUs, load average {host['load_average_start']:.1f} -> "
        f"{host['load_average_end']:.1f}; the load processes were busy "
        f"{host['drill_busy'] * 100:.0f}% of the time"
    )
    if host["drill_busy"] > 0.9:
        lines.append("WARNING: the drill itself was near saturation: add --processes")
    if doc["not_sent"]:
        lines.append(
            f"WARNING: {doc['not_sent']:,} requests were not sent: the drill was at its "
            "in-flight limit (a drill limit, not counted as failures)"
        )
    lines += [f"ERROR: {e}" for e in doc["errors"]]
    return "\n".join(lines) + "\n"
