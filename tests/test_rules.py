"""The alert rules and the dashboard under packaging/: valid for Prometheus's own tools,
each alert shown firing and not firing (promtool test rules), and every metric they
name is one sdserve exports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.prom import PROMTOOL

RULES = ROOT / "packaging" / "prometheus" / "sdserve-rules.yml"
RULE_TESTS = ROOT / "packaging" / "prometheus" / "sdserve-rules.test.yml"
DASHBOARD = ROOT / "packaging" / "grafana" / "sdserve-dashboard.json"
ALERTS = {
    "SdserveHigh5xxRatio",
    "SdserveHighP99Latency",
    "SdserveReloadFailed",
    "SdserveWorkerCrashLoop",
    "SdserveNotReady",
    "SdserveDrainDeadlineExceeded",
    "SdserveLogLinesDropped",
}
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian's prometheus)")

#: every metric family sdserve exports, from a directory that its classes wrote to
EXPORTED = """
import os, sys
from pathlib import Path
from sdserve import metrics
path = metrics.setup_directory()
from aiohttp import web
service, sup = metrics.ServiceMetrics(), metrics.SupervisorMetrics()
service.sample(1, 1, {"overload": 1}, 1, {"db": (True, 0.01)})
service.drained(0.1, 1, 0)
sup.workers.set(1)
sup.logged({"SDSERVE_PHASE": "reloaded", "SDSERVE_DURATION_MS": 5})
app = web.Application()
app.router.add_get("/", lambda r: web.Response())
metrics.RequestMetrics(path).known_routes(app)
sys.stdout.write(metrics.render(path).decode())
metrics.remove_directory(path)
"""


def _promtool(*args: str) -> str:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@needs_promtool
def test_the_rules_are_valid_and_their_unit_tests_pass() -> None:
    assert "SUCCESS: 7 rules found" in _promtool("check", "rules", str(RULES))
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == ALERTS == set(re.findall(r"- alert: (\w+)", RULES.read_text()))
    assert "SUCCESS" in _promtool("test", "rules", str(RULE_TESTS))


def _dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in board["panels"] for t in panel["targets"]]


@needs_promtool
def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    exprs = _dashboard_exprs()
    rules = tmp_path / "dashboard-as-rules.yml"
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(exprs):
        plain = expr.replace("$__rate_interval", "5m").replace("$job", ".*")
        plain = plain.replace("$instance", ".*")
        lines += [f"      - record: dashboard:query{i}", f"        expr: {json.dumps(plain)}"]
    rules.write_text("\n".join(lines) + "\n")
    assert f"SUCCESS: {len(exprs)} rules found" in _promtool("check", "rules", str(rules))


def test_every_metric_named_is_exported(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", EXPORTED],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)},
    )
    exported = set(re.findall(r"^(sdserve_\w+?)(?:\{| )", done.stdout, re.M))
    named = set(re.findall(r"\b(sdserve_\w+)", RULES.read_text() + "\n".join(_dashboard_exprs())))
    assert named, "no metric named"
    assert named <= exported, named - exported
