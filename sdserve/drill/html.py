"""The self-contained HTML report: tables plus matplotlib plots embedded as PNG."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any, cast

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from sdserve.drill.outcome import CLASSES, FAILURE_CLASSES
from sdserve.drill.schema import ActionJson, DrillJson
from sdserve.drill.text import describe_load, render_text

_CLASS_COLOURS = {
    "refused": "#d62728",
    "reset": "#9467bd",
    "eof": "#8c564b",
    "timeout": "#e377c2",
    "5xx": "#ff7f0e",
    "other_status": "#bcbd22",
    "other_error": "#7f7f7f",
}
_ACTION_COLOURS = ["#1f77b4", "#2ca02c", "#17becf", "#ff9896", "#c5b0d5", "#c49c94"]


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _span(doc: DrillJson) -> float:
    return max(doc["duration_s"], float(len(doc["timeline"])))


def _mark_actions(ax: Axes, actions: Sequence[ActionJson], legend: bool) -> None:
    names = list(dict.fromkeys(a["name"] for a in actions))
    seen: set[str] = set()
    for a in actions:
        colour = _ACTION_COLOURS[names.index(a["name"]) % len(_ACTION_COLOURS)]
        label = a["name"] if legend and a["name"] not in seen else None
        seen.add(a["name"])
        ax.axvspan(
            a["start_s"],
            max(a["end_s"], a["start_s"] + 0.05),
            color=colour,
            alpha=0.2,
            label=label,
            linewidth=0,
        )
        if not a["ok"]:
            ax.axvline(a["start_s"], color="red", linestyle=":", linewidth=1)


def plot_throughput(doc: DrillJson) -> Figure:
    tl = doc["timeline"]
    t = [s["t"] + 0.5 for s in tl]
    fig, (ax, ax_err) = plt.subplots(2, 1, figsize=(11, 5.5), sharex=True, height_ratios=(3, 2))
    ax.plot(t, [s["classes"]["success"] for s in tl], color="#2ca02c", label="success")
    ax.plot(
        t,
        [s["requests"] for s in tl],
        color="#333333",
        linewidth=0.8,
        linestyle="--",
        label="all requests",
    )
    _mark_actions(ax, doc["actions"], legend=True)
    ax.set_xlim(0, _span(doc))
    ax.set_ylabel("requests / s")
    ax.set_title("Throughput (by the second a request ended), actions shaded")
    ax.legend(loc="lower left", fontsize=8, ncol=4)
    ax.grid(alpha=0.3)
    bottom = [0] * len(tl)
    for cls in FAILURE_CLASSES:
        vals = [s["classes"][cls] for s in tl]
        if any(vals):
            ax_err.bar(t, vals, width=0.9, bottom=bottom, color=_CLASS_COLOURS[cls], label=cls)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    _mark_actions(ax_err, doc["actions"], legend=False)
    ax_err.set_ylabel("failures / s")
    ax_err.set_xlabel("seconds since start")
    if any(bottom):
        ax_err.legend(loc="upper left", fontsize=8, ncol=4)
    else:
        ax_err.text(
            0.5,
            0.5,
            "no failed requests",
            transform=ax_err.transAxes,
            ha="center",
            va="center",
            color="#2ca02c",
        )
    ax_err.grid(alpha=0.3)
    return fig


def plot_latency(doc: DrillJson) -> Figure:
    tl = doc["timeline"]
    fig, ax = plt.subplots(figsize=(11, 4))
    styles: list[tuple[str, str]] = [
        ("p50", "#1f77b4"),
        ("p90", "#2ca02c"),
        ("p99", "#ff7f0e"),
        ("max", "#d62728"),
    ]
    for key, colour in styles:
        pts = [(s["t"] + 0.5, cast(dict[str, Any], s["latency_ms"])[key]) for s in tl]
        xs = [p[0] for p in pts if p[1] is not None]
        ys = [p[1] for p in pts if p[1] is not None]
        ax.plot(xs, ys, color=colour, label=key, marker="." if len(xs) < 60 else None)
    _mark_actions(ax, doc["actions"], legend=False)
    ax.set_xlim(0, _span(doc))
    ax.set_yscale("log")
    ax.set_ylabel("latency ms (log)")
    ax.set_xlabel("seconds since start")
    ax.set_title("Latency percentiles per second (from the intended send time)")
    ax.legend(loc="upper left", fontsize=8, ncol=4)
    ax.grid(alpha=0.3, which="both")
    return fig


def plot_phases(doc: DrillJson) -> Figure:
    fig, ax = plt.subplots(figsize=(11, 3.2))
    keys = ["p50", "p90", "p99", "p99.9", "max"]
    phases = ["steady", "during", "after"]
    width = 0.25
    by_phase: dict[str, Any] = dict(doc["phases"])
    for i, ph in enumerate(phases):
        pct: dict[str, Any] = by_phase[ph]["latency_ms"]
        vals = [pct[k] or 0.0 for k in keys]
        ax.bar([k + (i - 1) * width for k in range(len(keys))], vals, width=width, label=ph)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_yscale("symlog", linthresh=1.0)
    top = max((by_phase[ph]["latency_ms"]["max"] or 0.0) for ph in phases)
    ax.set_ylim(0, max(top, 1.0) * 3)
    ax.set_ylabel("latency ms")
    ax.set_title("Latency by phase: steady, during an action, after it")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig


def plot_resources(doc: DrillJson) -> Figure | None:
    res = doc["resources"]
    if not res:
        return None
    t = [r["t_s"] for r in res]
    fig, axes = plt.subplots(3, 1, figsize=(11, 5), sharex=True)
    series = [
        ("open fds", [r["fds"] for r in res]),
        ("RSS MiB", [r["rss_bytes"] / 2**20 for r in res]),
        ("processes", [r["processes"] for r in res]),
    ]
    for ax, (label, ys) in zip(axes, series, strict=True):
        ax.step(t, ys, where="post", color="#1f77b4")
        _mark_actions(ax, doc["actions"], legend=False)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_xlim(0, _span(doc))
    axes[0].set_title("Target process tree (from /proc)")
    axes[-1].set_xlabel("seconds since start")
    return fig


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left}
.pass{color:#fff;background:#2ca02c;padding:.15em .6em;border-radius:4px}
.fail{color:#fff;background:#d62728;padding:.15em .6em;border-radius:4px}
img.plot{max-width:100%;display:block;margin:.5em 0}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.8em}
"""


def _table(head: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1) -> str:
    def cell(tag: str, i: int, v: object) -> str:
        cls = ' class="l"' if i < left else ""
        text = f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)
        return f"<{tag}{cls}>{html.escape(text)}</{tag}>"

    out = ["<table><tr>" + "".join(cell("th", i, h) for i, h in enumerate(head)) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def render_html(doc: DrillJson) -> str:
    """The report for one drill, with every plot embedded (opens offline)."""
    phases: dict[str, Any] = dict(doc["phases"])
    overall = doc["phases"]["overall"]
    names = ("overall", "steady", "during", "after")
    class_rows = [[c, *(phases[p]["classes"][c] for p in names)] for c in CLASSES]
    for code, _n in sorted({**overall["status_5xx"], **overall["status_other"]}.items()):
        class_rows.append(
            [
                f"  status {code}",
                *(
                    phases[p]["status_5xx"].get(code, phases[p]["status_other"].get(code, 0))
                    for p in names
                ),
            ]
        )
    lat_rows = [
        [k, *(_fmt(phases[p]["latency_ms"][k]) for p in names)]
        for k in ("p50", "p90", "p99", "p99.9", "max")
    ]
    lat_rows.append(["responses", *(phases[p]["latency_ms"]["count"] for p in names)])
    action_rows = [
        [
            a["name"],
            a["number"],
            f"{a['start_s']:.2f}",
            f"{a['end_s'] - a['start_s']:.2f}",
            "ok" if a["ok"] else "FAILED",
            a["detail"][:120],
        ]
        for a in doc["actions"]
    ]
    target_rows = [
        [
            t["url"],
            t["requests"],
            t["failures"],
            _fmt(t["latency_ms"]["p50"]),
            _fmt(t["latency_ms"]["p99"]),
            _fmt(t["latency_ms"]["max"]),
        ]
        for t in doc["targets"]
    ]
    plots = [
        ("throughput", plot_throughput(doc)),
        ("latency", plot_latency(doc)),
        ("phases", plot_phases(doc)),
    ]
    res = plot_resources(doc)
    if res is not None:
        plots.append(("resources", res))
    imgs = "".join(
        f'<img class="plot" id="plot-{name}" alt="{name} plot" '
        f'src="data:image/png;base64,{_png(fig)}">'
        for name, fig in plots
    )
    verdict = (
        '<span class="pass">PASS</span>' if doc["passed"] else '<span class="fail">FAIL</span>'
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>sdserve drill {html.escape(doc['started_at'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>sdserve drill report</h1>",
        f"<p>{verdict} {overall['failures']:,} failed of {overall['requests']:,} requests "
        f"(limit {doc['max_failures']:,}) in {doc['duration_s']:.1f} s &middot; "
        f"{html.escape(describe_load(doc))} &middot; started {html.escape(doc['started_at'])}"
        f" &middot; schema {html.escape(doc['schema'])}</p>",
        imgs,
        "<p>Phases: <b>during</b> = the request overlapped an action; <b>after</b> = it "
        f"started within {doc['spec']['after_window_s']:g} s after an action ended; "
        "<b>steady</b> = the rest. Latency counts from the moment a request was due "
        "(open loop), over requests that got a response.</p>",
        "<h2>Requests by class and phase</h2>",
        _table(["class", *names], class_rows),
        "<h2>Latency (ms) by phase</h2>",
        _table(["", *names], lat_rows),
        "<h2>Targets</h2>",
        _table(["URL", "requests", "failures", "p50 ms", "p99 ms", "max ms"], target_rows),
    ]
    if doc["by_action"]:
        rows = [
            [name, ph["requests"], ph["failures"], _fmt(ph["latency_ms"]["p50"]),
             _fmt(ph["latency_ms"]["p99"]), _fmt(ph["latency_ms"]["max"])]
            for name, ph in doc["by_action"].items()
        ]  # fmt: skip
        steady = doc["phases"]["steady"]
        rows.append(
            ["(steady)", steady["requests"], steady["failures"],
             _fmt(steady["latency_ms"]["p50"]), _fmt(steady["latency_ms"]["p99"]),
             _fmt(steady["latency_ms"]["max"])]
        )  # fmt: skip
        parts += [
            "<h2>Requests that overlapped each kind of action</h2>",
            _table(["action", "requests", "failures", "p50 ms", "p99 ms", "max ms"], rows),
        ]
    if action_rows:
        parts += [
            "<h2>Actions</h2>",
            _table(["action", "#", "start s", "took s", "result", "detail"], action_rows, left=1),
        ]
    parts += [
        "<h2>Text summary</h2>",
        f"<pre>{html.escape(render_text(doc))}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts)
