"""``sdserve k8s`` (issue 17, part 4): the manifests pass kubernetes-validate (strict) for the
last three Kubernetes versions it knows, their deadlines hold for the config they are
rendered from, bad input is one line and exit status 2, and the container's command is a
real sdserve whose probes answer on the admin port and whose /readyz fails at SIGTERM while
the main port keeps serving for ``drain_delay``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from sdserve import k8s
from sdserve.config import load_config
from sdserve.k8s import K8sSpec, render_manifests, to_yaml
from sdserve.units import START_MARGIN, STOP_MARGIN
from tests.conftest import ROOT


def _last_versions(n: int) -> list[str]:
    minors = sorted({".".join(v.split(".")[:2]) for v in all_versions()}, key=_key)
    assert len(minors) >= n, minors
    return minors[-n:]


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


VERSIONS = _last_versions(3)

#: configs of different deadlines: (drain_delay, shutdown_timeout, cleanup_timeout,
#: start_timeout, stall_hold)
CONFIGS = [
    (2, 25, 5, 60, 30),
    (10, 25, 5, 60, 30),
    (5.5, 0.5, 0.25, 1, 10),
    (30, 120, 30, 600, 60),
    (3, 7.3, 1.1, 17.7, 11),
]


def _config(path: Path, drain: float = 10, **keys: object) -> str:
    keys = {"workers": 2, **keys}
    lines = ['app = "myapp:create_app"', f"drain_delay = {drain}"]
    lines += [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _spec(config: str, **changes: Any) -> K8sSpec:
    return K8sSpec(
        **{"name": "web", "image": "registry.example/web:1", "config": config, **changes}
    )


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in docs}


def _pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = _by_kind(docs)["Deployment"]["spec"]["template"]["spec"]
    return spec


def test_the_last_three_versions_are_recent() -> None:
    assert len(VERSIONS) == 3
    assert _key(VERSIONS[0]) >= (1, 35), VERSIONS


@pytest.mark.parametrize("version", VERSIONS)
def test_the_manifests_pass_strict_validation(tmp_path: Path, version: str) -> None:
    config = _config(tmp_path / "web.toml", drain=10)
    secret_config = tmp_path / "pg.toml"
    secret_config.write_text(
        'app = "myapp:create_app"\ndrain_delay = "4s"\n\n[checks.db]\ntype = "postgres"\n'
        'dsn = "postgresql://app@db/app"\npassword_credential = "pg"\n'
    )
    specs = [
        _spec(config),
        _spec(
            str(secret_config),
            namespace="shop",
            replicas=5,
            cpu_limit="2",
            memory_limit="1Gi",
            min_available=3,
            credentials_secret="web-credentials",
            port=9000,
            admin_port=9001,
            service_port=8080,
        ),
    ]
    for spec in specs:
        text = to_yaml(render_manifests(spec))
        docs = list(yaml.safe_load_all(text))
        assert [d["kind"] for d in docs] == [
            "ConfigMap",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
        ]
        for doc in docs:
            assert kubernetes_validate.validate(doc, version, strict=True) == version


@pytest.mark.parametrize("version", VERSIONS)
def test_validation_is_not_vacuous(tmp_path: Path, version: str) -> None:
    """The strict schema refuses what Kubernetes would: an unknown field, a wrong type."""
    docs = render_manifests(_spec(_config(tmp_path / "web.toml")))
    deployment = _by_kind(docs)["Deployment"]
    _pod(docs)["containers"][0]["readinesProbe"] = {"periodSeconds": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, version, strict=True)
    docs = render_manifests(_spec(_config(tmp_path / "web.toml")))
    _pod(docs)["terminationGracePeriodSeconds"] = "45"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_by_kind(docs)["Deployment"], version, strict=True)


@pytest.mark.parametrize("case", CONFIGS)
@pytest.mark.parametrize(("period", "failures"), [(1, 1), (2, 1), (1, 2)])
def test_the_deadlines_hold_for_the_config(
    tmp_path: Path, case: tuple[float, float, float, float, float], period: int, failures: int
) -> None:
    drain, shutdown, cleanup, start, stall = case
    path = tmp_path / "web.toml"
    path.write_text(
        f'app = "myapp:create_app"\ndrain_delay = {drain}\nshutdown_timeout = {shutdown}\n'
        f"cleanup_timeout = {cleanup}\nstart_timeout = {start}\nidle_grace = 0.1\n"
        f"[health]\nstall_hold = {stall}\n"
    )
    cfg = load_config(toml_path=path, environ={})
    spec = _spec(
        str(path), readiness_period=period, readiness_failures=failures, liveness_period=10
    )
    docs = list(yaml.safe_load_all(to_yaml(render_manifests(spec))))
    pod = _pod(docs)
    container = pod["containers"][0]
    # SIGKILL comes after sdserve's whole stop budget, with the margin
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= drain + shutdown + cleanup + STOP_MARGIN
    assert grace < drain + shutdown + cleanup + STOP_MARGIN + 1
    # the pod is seen not ready within the drain delay
    ready = container["readinessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] <= drain
    # the startup probe waits out sdserve's own start deadline
    startup = container["startupProbe"]
    window = startup["periodSeconds"] * startup["failureThreshold"]
    assert window >= start + START_MARGIN
    assert window < start + START_MARGIN + startup["periodSeconds"]
    assert container["livenessProbe"]["periodSeconds"] <= stall
    assert _by_kind(docs)["Deployment"]["spec"]["progressDeadlineSeconds"] > window
    # all three probes go to the admin port, at the config's paths
    assert {container[p]["httpGet"]["port"] for p in ("startupProbe", "readinessProbe")} == {
        "admin"
    }
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "admin"}
    admin = next(p for p in container["ports"] if p["name"] == "admin")
    assert admin["containerPort"] == spec.admin_port
    assert f"0.0.0.0:{spec.admin_port}" in container["command"]
    # no preStop: drain_delay keeps serving after SIGTERM
    assert "lifecycle" not in container
    # the pod runs the very file the deadlines were sized for
    assert _by_kind(docs)["ConfigMap"]["data"]["sdserve.toml"] == path.read_text()
    assert cfg.stop_budget == drain + shutdown + cleanup


def test_health_paths_and_ports_come_from_the_config(tmp_path: Path) -> None:
    path = tmp_path / "web.toml"
    path.write_text(
        'app = "m:f"\ndrain_delay = 5\n[health]\nplacement = "admin"\n'
        'livez_path = "/-/live"\nreadyz_path = "/-/ready"\nstartupz_path = "/-/started"\n'
    )
    docs = render_manifests(_spec(str(path), port=9000, admin_port=9100, service_port=8000))
    container = _pod(docs)["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/-/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/-/started"
    assert container["command"][-4:] == ["--bind", "0.0.0.0:9000", "--admin-bind", "0.0.0.0:9100"]
    service = _by_kind(docs)["Service"]["spec"]
    assert service["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]
    # the admin port is not part of the Service
    assert all(p["targetPort"] != "admin" for p in service["ports"])


def test_the_pod_is_hardened_and_rolls_without_losing_capacity(tmp_path: Path) -> None:
    docs = render_manifests(_spec(_config(tmp_path / "web.toml")))
    pod = _pod(docs)
    sc = pod["containers"][0]["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    strategy = _by_kind(docs)["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert strategy == {"maxUnavailable": 0, "maxSurge": 1}
    assert _by_kind(docs)["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


def test_a_changed_config_changes_the_pod_template(tmp_path: Path) -> None:
    """The hash of the file on the template: `kubectl apply` then rolls the pods."""
    path = tmp_path / "web.toml"
    _config(path, drain=10)
    first = _pod(render_manifests(_spec(str(path))))
    before = _by_kind(render_manifests(_spec(str(path))))["Deployment"]
    _config(path, drain=12)
    after = _by_kind(render_manifests(_spec(str(path))))["Deployment"]
    key = k8s.ANNOTATION
    annotations = [d["spec"]["template"]["metadata"]["annotations"][key] for d in (before, after)]
    assert annotations[0] != annotations[1]
    assert first["terminationGracePeriodSeconds"] == 10 + 25 + 5 + 5
    assert _pod([after])["terminationGracePeriodSeconds"] == 12 + 25 + 5 + 5


@pytest.mark.parametrize(
    "text",
    [
        'a = "x"\nb = 1\n',
        "line 1\n  indented line\n\n# comment: with colon\n",
        "no final newline\n  x",
        "two final newlines\n\n",
        "\nleading empty line\n",
        'quotes " and \\ and \t tab\n',
        "---\n...\n",
        "non-ascii: été ✓\n",
        "ctrl \x07 char\n",
        "\n",
    ],
)
def test_the_yaml_reads_back_as_the_documents(text: str) -> None:
    docs = [
        {
            "data": {"file": text, "one": "1", "yes": "yes", "colon": "a: b", "empty": ""},
            "list": [{"a": [1, 2]}, [True, False], {}, [], "-x", "#x", "/path"],
            "n": 0,
        }
    ]
    assert list(yaml.safe_load_all(to_yaml(docs))) == docs


def _fails(tmp_path: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "sdserve", "k8s", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 or "usage:" in lines[0], proc.stderr
    return lines[-1]


def test_bad_input_is_one_line_and_exit_status_2(tmp_path: Path) -> None:
    config = _config(tmp_path / "web.toml", drain=3)
    image = ("--image", "registry.example/web:1")
    assert "arguments are required: --image" in _fails(tmp_path, "--config", config)
    assert "arguments are required: --config" in _fails(tmp_path, *image)
    line = _fails(tmp_path, *image, "--config", config, "--readiness-period", "2",
                  "--readiness-failures", "2")  # fmt: skip
    assert line == (
        f"sdserve k8s: drain_delay = 3s in {config} is shorter than the readiness window, "
        "--readiness-period 2 x --readiness-failures 2 = 4s: raise drain_delay or shorten "
        "the readiness probe"
    )
    zero = _config(tmp_path / "zero.toml", drain=0)
    line = _fails(tmp_path, *image, "--config", zero)
    assert line.startswith(f"sdserve k8s: drain_delay is 0 in {zero}: Kubernetes removes"), line
    assert 'drain_delay = "10s"' in line
    line = _fails(tmp_path, *image, "--config", config, "--liveness-period", "31")
    assert "--liveness-period 31 is longer than health.stall_hold = 30s" in line
    line = _fails(tmp_path, *image, "--config", str(tmp_path / "missing.toml"))
    assert line == f"sdserve k8s: --config {tmp_path / 'missing.toml'}: No such file or directory"
    line = _fails(tmp_path, *image, "--config", config, "--name", "Web_1")
    assert line.startswith("sdserve k8s: --name 'Web_1': lower-case letters")
    line = _fails(tmp_path, *image, "--config", config, "--pdb-min-available", "2")
    assert "--pdb-min-available 2: from 0 to --replicas - 1 (1)" in line
    line = _fails(tmp_path, *image, "--config", config, "--memory-limit", "1GB")
    assert line == "sdserve k8s: --memory-limit '1GB': not a Kubernetes quantity (e.g. 500m, 256Mi)"
    main_only = tmp_path / "main.toml"
    main_only.write_text('app = "m:f"\ndrain_delay = 5\n[health]\nplacement = "main"\n')
    line = _fails(tmp_path, *image, "--config", str(main_only))
    assert 'health.placement = "main", but the probes go to the admin port' in line
    pg = tmp_path / "pg.toml"
    pg.write_text(
        'app = "m:f"\ndrain_delay = 5\n[checks.db]\ntype = "postgres"\n'
        'dsn = "postgresql://app@db/app"\npassword_credential = "pg"\n'
    )
    line = _fails(tmp_path, *image, "--config", str(pg))
    assert "[checks.db] password_credential = 'pg', but no --credentials-secret" in line
    bad_key = tmp_path / "bad.toml"
    bad_key.write_text('app = "m:f"\ndrain_dely = 5\n')
    assert "drain_dely" in _fails(tmp_path, *image, "--config", str(bad_key))


def test_the_cli_writes_the_file_and_notes_what_to_know(tmp_path: Path) -> None:
    path = tmp_path / "web.toml"
    path.write_text('app = "myapp:create_app"\ndrain_delay = "6s"\n')
    out = tmp_path / "web.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "sdserve", "k8s", "--name", "web", "--image", "r.example/w:2",
         "--config", str(path), "--replicas", "1", "--out", str(out)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )  # fmt: skip
    assert proc.stdout == f"{out}\n"
    notes = proc.stderr.splitlines()
    assert notes[0].startswith("sdserve k8s: note: --replicas 1: a node drain evicts")
    assert notes[1].startswith(f"sdserve k8s: note: {path} sets no workers and there is no")
    assert len(notes) == 2
    docs = list(yaml.safe_load_all(out.read_text()))
    assert docs == render_manifests(_spec(str(path), replicas=1, image="r.example/w:2"))
    for doc in docs:
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)
    stdout = subprocess.run(
        [sys.executable, "-m", "sdserve", "k8s", "--name", "web", "--image", "r.example/w:2",
         "--config", str(path), "--replicas", "1", "--cpu-limit", "2"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )  # fmt: skip
    assert stdout.stderr.count("note:") == 1
    assert list(yaml.safe_load_all(stdout.stdout))[1]["spec"]["replicas"] == 1


# -- the container's command, run for real -------------------------------------------------

APP = """\
from aiohttp import web


async def index(request):
    return web.Response(text="ok")


def create_app():
    app = web.Application()
    app.router.add_get("/", index)
    return app
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_the_containers_command_serves_the_probes_and_drains(tmp_path: Path) -> None:
    """The rendered command, run as the kubelet would (the image's sdserve is this tree's):
    the three probes answer 200 on the admin port; after SIGTERM /readyz answers 503 within
    the readiness window while the main port still serves, and the process exits 0 within
    terminationGracePeriodSeconds."""
    (tmp_path / "myapp.py").write_text(APP)
    config = _config(tmp_path / "web.toml", drain=3, workers=0, shutdown_timeout=2)
    port, admin = _free_port(), _free_port()
    docs = render_manifests(_spec(config, port=port, admin_port=admin, readiness_period=1))
    container = _pod(docs)["containers"][0]
    probes = {p: container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe")}
    live = container["livenessProbe"]["httpGet"]["path"]
    grace = _pod(docs)["terminationGracePeriodSeconds"]
    argv = [sys.executable, "-m", "sdserve", *container["command"][1:]]
    argv[argv.index("--config") + 1] = config  # the ConfigMap's file
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{tmp_path}"}
    env.update({e["name"]: e["value"] for e in container["env"]})
    with subprocess.Popen(argv, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        try:
            for line in proc.stderr:  # bounded: sdserve logs "ready after" or exits
                if "ready after" in line:
                    break
            assert proc.poll() is None
            assert _status(admin, probes["startupProbe"]) == 200
            assert _status(admin, probes["readinessProbe"]) == 200
            assert _status(admin, live) == 200
            assert _status(port, "/") == 200
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            window = container["readinessProbe"]["periodSeconds"]
            seen = None
            for _ in range(10_000):  # bounded in count and by the window: probe after probe
                if _status(admin, probes["readinessProbe"]) == 503:
                    seen = time.monotonic() - sent
                    break
                if time.monotonic() - sent > window:
                    break
            assert seen is not None
            assert seen < window
            # still inside drain_delay: the main port serves while endpoints catch up, and
            # the pod is alive (a liveness failure now would not hasten anything)
            assert _status(port, "/") == 200
            assert _status(admin, live) == 200
            assert proc.wait(timeout=grace) == 0
            assert time.monotonic() - sent >= 3  # the drain delay was served out
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stderr.read()
