"""``sdserve k8s``: render Kubernetes manifests (ConfigMap, Deployment, Service,
PodDisruptionBudget) for one application, as ``sdserve units`` renders systemd units.

Everything is rendered by functions of a :class:`K8sSpec` and the effective configuration
of its ``--config`` file, read when the manifests are rendered; :func:`run` only parses the
command line and writes the YAML. The file itself goes into the ConfigMap that the pod
mounts, so the deadlines below are sized for the very configuration the pod runs with, and
a hash of it on the pod template rolls the Deployment when the file changes. No setting is
put on the container's command line except the two addresses, which belong to the manifests
(they are the container ports).

There is no socket activation: the container runs ``sdserve run --config FILE --bind
0.0.0.0:PORT --admin-bind 0.0.0.0:ADMIN_PORT`` and binds its own sockets. The deadlines,
each checked by :func:`deadline_problems` and written once here:

- ``terminationGracePeriodSeconds`` >= sdserve's stop budget (``drain_delay`` +
  ``shutdown_timeout`` + ``cleanup_timeout``) + :data:`sdserve.units.STOP_MARGIN`, the same
  rule as systemd's ``TimeoutStopSec=`` (:func:`sdserve.units.timeout_stop_sec`): the kubelet
  sends SIGKILL when the grace period ends.
- readiness ``periodSeconds`` x ``failureThreshold`` <= ``drain_delay``: after SIGTERM sdserve
  keeps serving for ``drain_delay`` while ``/readyz`` answers 503, and a probe must see
  that before the drain closes the listener. ``drain_delay`` 0 is refused: Kubernetes
  removes a terminating pod from the Service's endpoints asynchronously (the endpoint
  slice controller, then every kube-proxy and ingress controller), while the kubelet
  already sends SIGTERM; a server that stops accepting at once refuses connections that
  are still routed to it. With ``drain_delay`` doing that job no ``preStop`` sleep is
  needed (and none is rendered): sdserve keeps serving during the delay itself, which the
  usual ``preStop: sleep`` only emulates for servers that stop on SIGTERM.
- startup ``periodSeconds`` x ``failureThreshold`` >= ``start_timeout`` +
  :data:`sdserve.units.START_MARGIN`, the rule of systemd's ``TimeoutStartSec=``
  (:func:`sdserve.units.timeout_start_sec`): the startup probe must not give up (and
  restart the container) while sdserve is still inside its own start deadline.
- liveness ``periodSeconds`` <= ``health.stall_hold``: a stalled event loop keeps
  ``/livez`` failing that long, so at least one probe sees it.
- ``progressDeadlineSeconds`` > the startup window: a slow but healthy start is not
  reported as a failed rollout.

The probes go to the admin port (``admin_bind``), never through the Service: the admin
socket answers health only, is not limited by ``max_connections`` and is not part of the
Service, so probes are not queued behind traffic and the details are not exposed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdserve.config import Config, ConfigError, load_config
from sdserve.units import START_MARGIN, STOP_MARGIN, timeout_start_sec, timeout_stop_sec

#: where the ConfigMap is mounted in the container, and the file's name there
CONFIG_DIR = "/etc/sdserve"
CONFIG_KEY = "sdserve.toml"
#: where a Secret of credentials is mounted ($CREDENTIALS_DIRECTORY)
CREDENTIALS_DIR = "/run/credentials/sdserve"
DEFAULT_PORT = 8080
DEFAULT_ADMIN_PORT = 8081
DEFAULT_SERVICE_PORT = 80
DEFAULT_REPLICAS = 2
#: the nonroot user of distroless images; any numeric uid of the image works
DEFAULT_UID = 65532
DEFAULT_READINESS_PERIOD = 2
DEFAULT_READINESS_FAILURES = 1
DEFAULT_STARTUP_PERIOD = 2
DEFAULT_LIVENESS_PERIOD = 10
DEFAULT_LIVENESS_FAILURES = 3
#: Kubernetes' own default progress deadline of a Deployment
PROGRESS_DEADLINE = 600
PROBE_TIMEOUT = 2
ANNOTATION = "sdserve.io/config-sha256"

_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
_SECRET = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class K8sError(ValueError):
    """The settings cannot make a consistent set of manifests."""


@dataclass(frozen=True)
class K8sSpec:
    """What the manifests of one application are made of; ``config`` is the sdserve config
    file (read now, shipped in the ConfigMap) and ``image`` the container image holding
    sdserve and the application. The ``*_period`` and ``*_failures`` are the probes'
    ``periodSeconds`` and ``failureThreshold``; the startup probe's threshold is derived."""

    name: str
    image: str
    config: str
    namespace: str | None = None
    replicas: int = DEFAULT_REPLICAS
    port: int = DEFAULT_PORT
    admin_port: int = DEFAULT_ADMIN_PORT
    service_port: int = DEFAULT_SERVICE_PORT
    executable: str = "sdserve"
    uid: int = DEFAULT_UID
    cpu_request: str | None = "250m"
    memory_request: str | None = "256Mi"
    cpu_limit: str | None = None
    memory_limit: str | None = None
    readiness_period: int = DEFAULT_READINESS_PERIOD
    readiness_failures: int = DEFAULT_READINESS_FAILURES
    startup_period: int = DEFAULT_STARTUP_PERIOD
    liveness_period: int = DEFAULT_LIVENESS_PERIOD
    liveness_failures: int = DEFAULT_LIVENESS_FAILURES
    #: the PDB: at most this many pods down by eviction, or (when set) at least min_available up
    max_unavailable: int = 1
    min_available: int | None = None
    #: a Secret whose keys are the credentials of the checks (password_credential)
    credentials_secret: str | None = None


@dataclass(frozen=True)
class Deadlines:
    """The probe and grace settings of a pod, in seconds (Kubernetes wants integers)."""

    termination_grace: int
    readiness_period: int
    readiness_failures: int
    startup_period: int
    startup_failures: int
    liveness_period: int
    liveness_failures: int
    progress_deadline: int

    @property
    def readiness_window(self) -> int:
        """Longest time from /readyz turning 503 to the pod being seen as not ready."""
        return self.readiness_period * self.readiness_failures

    @property
    def startup_window(self) -> int:
        """How long the startup probe lets the container start before restarting it."""
        return self.startup_period * self.startup_failures


def deadlines(spec: K8sSpec, cfg: Config) -> Deadlines:
    """The deadlines of the manifests for ``cfg`` (see the module's docstring)."""
    startup_failures = math.ceil(timeout_start_sec(cfg) / spec.startup_period)
    startup_window = spec.startup_period * startup_failures
    return Deadlines(
        termination_grace=timeout_stop_sec(cfg),
        readiness_period=spec.readiness_period,
        readiness_failures=spec.readiness_failures,
        startup_period=spec.startup_period,
        startup_failures=startup_failures,
        liveness_period=spec.liveness_period,
        liveness_failures=spec.liveness_failures,
        progress_deadline=max(PROGRESS_DEADLINE, startup_window + 60),
    )


def deadline_problems(d: Deadlines, cfg: Config, where: str) -> list[str]:
    """Each rule of the module's docstring that ``d`` breaks for ``cfg``, as one line."""
    found = []
    if cfg.drain_delay <= 0:
        found.append(
            f"drain_delay is 0 in {where}: Kubernetes removes a stopping pod from the "
            "Service's endpoints asynchronously, so without a delay it refuses connections "
            f"still routed to it; set drain_delay to at least {d.readiness_window}s "
            "(the readiness window) plus the endpoints' propagation, e.g. "
            f'drain_delay = "{max(10, d.readiness_window + 5)}s"'
        )
    elif d.readiness_window > cfg.drain_delay:
        found.append(
            f"drain_delay = {cfg.drain_delay:g}s in {where} is shorter than the readiness "
            f"window, --readiness-period {d.readiness_period} x --readiness-failures "
            f"{d.readiness_failures} = {d.readiness_window}s: raise drain_delay or shorten "
            "the readiness probe"
        )
    if d.termination_grace < cfg.stop_budget + STOP_MARGIN:
        found.append(
            f"terminationGracePeriodSeconds {d.termination_grace} is below the stop budget "
            f"{cfg.stop_budget:g}s + {STOP_MARGIN:g}s"
        )
    if d.startup_window < cfg.start_timeout + START_MARGIN:
        found.append(
            f"the startup window {d.startup_window}s is below start_timeout "
            f"{cfg.start_timeout:g}s + {START_MARGIN:g}s"
        )
    if d.liveness_period > cfg.health.stall_hold:
        found.append(
            f"--liveness-period {d.liveness_period} is longer than health.stall_hold = "
            f"{cfg.health.stall_hold:g}s in {where}: a stall would be missed by the probes"
        )
    if d.progress_deadline <= d.startup_window:
        found.append(
            f"progressDeadlineSeconds {d.progress_deadline} is not above the startup window "
            f"{d.startup_window}s"
        )
    return found


def load(spec: K8sSpec) -> tuple[Config, str]:
    """The effective configuration of ``spec.config`` and the file's text."""
    path = Path(spec.config)
    try:
        text = path.read_text()
    except OSError as exc:
        raise K8sError(f"--config {spec.config}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise K8sError(f"--config {spec.config}: not UTF-8 text ({exc.reason})") from exc
    try:
        cfg = load_config(toml_path=path, environ={})
    except ConfigError as exc:
        raise K8sError("; ".join(exc.problems)) from exc
    if not cfg.app:
        raise K8sError(f'{spec.config} sets no app: add app = "MODULE:FACTORY"')
    if not cfg.health.enabled:
        raise K8sError(
            f"{spec.config}: health.enabled = false, but the probes need sdserve's endpoints"
        )
    if cfg.health.placement == "main":
        raise K8sError(
            f'{spec.config}: health.placement = "main", but the probes go to the admin port: '
            'set it to "admin" or "both"'
        )
    for check, table in sorted(cfg.checks.items()):
        wanted = table.get("password_credential") if isinstance(table, Mapping) else None
        if isinstance(wanted, str) and spec.credentials_secret is None:
            raise K8sError(
                f"{spec.config}: [checks.{check}] password_credential = {wanted!r}, but no "
                f"--credentials-secret SECRET (with a key {wanted!r}) provides it"
            )
    return cfg, text


def _validate(spec: K8sSpec) -> None:
    if not _NAME.match(spec.name) or len(spec.name) > 63:
        raise K8sError(
            f"--name {spec.name!r}: lower-case letters, digits and '-', starting with a "
            "letter, at most 63 characters (a DNS label)"
        )
    if not spec.image.strip() or any(c.isspace() for c in spec.image):
        raise K8sError(f"--image {spec.image!r}: not an image reference")
    if spec.namespace is not None and (not _NAME.match(spec.namespace) or len(spec.namespace) > 63):
        raise K8sError(f"--namespace {spec.namespace!r}: not a DNS label")
    for flag, port in (
        ("--port", spec.port),
        ("--admin-port", spec.admin_port),
        ("--service-port", spec.service_port),
    ):
        if not 0 < port < 65536:
            raise K8sError(f"{flag} {port}: not a port (1-65535)")
    if spec.port == spec.admin_port:
        raise K8sError(f"--port and --admin-port are both {spec.port}")
    if spec.replicas < 1:
        raise K8sError(f"--replicas {spec.replicas}: at least 1")
    if spec.uid < 1:
        raise K8sError(f"--uid {spec.uid}: the pod runs as non-root, so at least 1")
    for flag, value in (
        ("--readiness-period", spec.readiness_period),
        ("--readiness-failures", spec.readiness_failures),
        ("--startup-period", spec.startup_period),
        ("--liveness-period", spec.liveness_period),
        ("--liveness-failures", spec.liveness_failures),
    ):
        if value < 1:
            raise K8sError(f"{flag} {value}: at least 1")
    if spec.min_available is not None:
        if not 0 <= spec.min_available < spec.replicas:
            raise K8sError(
                f"--pdb-min-available {spec.min_available}: from 0 to --replicas - 1 "
                f"({spec.replicas - 1}), else no pod can ever be evicted (a node drain hangs)"
            )
    elif spec.max_unavailable < 1:
        raise K8sError(
            f"--pdb-max-unavailable {spec.max_unavailable}: at least 1, else no pod can ever "
            "be evicted (a node drain hangs)"
        )
    for flag, quantity in (
        ("--cpu-request", spec.cpu_request),
        ("--memory-request", spec.memory_request),
        ("--cpu-limit", spec.cpu_limit),
        ("--memory-limit", spec.memory_limit),
    ):
        if quantity is not None and not _QUANTITY.match(quantity):
            raise K8sError(f"{flag} {quantity!r}: not a Kubernetes quantity (e.g. 500m, 256Mi)")
    if spec.credentials_secret is not None and not _SECRET.match(spec.credentials_secret):
        raise K8sError(f"--credentials-secret {spec.credentials_secret!r}: not a Secret name")


def _metadata(spec: K8sSpec, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if spec.namespace is not None:
        meta["namespace"] = spec.namespace
    meta["labels"] = {**_selector(spec), "app.kubernetes.io/managed-by": "sdserve"}
    return meta


def _selector(spec: K8sSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": spec.name}


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "admin"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "successThreshold": 1,
        "timeoutSeconds": PROBE_TIMEOUT,
    }


def _resources(spec: K8sSpec) -> dict[str, Any]:
    requests = {"cpu": spec.cpu_request, "memory": spec.memory_request}
    limits = {"cpu": spec.cpu_limit, "memory": spec.memory_limit}
    out: dict[str, Any] = {}
    for key, values in (("requests", requests), ("limits", limits)):
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            out[key] = given
    return out


def container_command(spec: K8sSpec) -> list[str]:
    return [
        spec.executable,
        "run",
        "--config",
        f"{CONFIG_DIR}/{CONFIG_KEY}",
        "--bind",
        f"0.0.0.0:{spec.port}",
        "--admin-bind",
        f"0.0.0.0:{spec.admin_port}",
    ]


def render_deployment(spec: K8sSpec, cfg: Config, text: str, d: Deadlines) -> dict[str, Any]:
    env = [{"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}]  # the root is read-only
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": f"{spec.name}-config"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if spec.credentials_secret is not None:
        env.append({"name": "CREDENTIALS_DIRECTORY", "value": CREDENTIALS_DIR})
        mounts.append({"name": "credentials", "mountPath": CREDENTIALS_DIR, "readOnly": True})
        volumes.append(
            {
                "name": "credentials",
                # group-readable: the kubelet gives the files the pod's fsGroup
                "secret": {"secretName": spec.credentials_secret, "defaultMode": 0o440},
            }
        )
    container: dict[str, Any] = {
        "name": "sdserve",
        "image": spec.image,
        "command": container_command(spec),
        "env": env,
        "ports": [
            {"name": "http", "containerPort": spec.port, "protocol": "TCP"},
            {"name": "admin", "containerPort": spec.admin_port, "protocol": "TCP"},
        ],
        "startupProbe": _probe(cfg.health.startupz_path, d.startup_period, d.startup_failures),
        "readinessProbe": _probe(cfg.health.readyz_path, d.readiness_period, d.readiness_failures),
        "livenessProbe": _probe(cfg.health.livez_path, d.liveness_period, d.liveness_failures),
        "resources": _resources(spec),
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }
    digest = hashlib.sha256(text.encode()).hexdigest()
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(spec, spec.name),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": _selector(spec)},
            "progressDeadlineSeconds": d.progress_deadline,
            # a new pod is ready before an old one stops: the capacity never drops
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {
                    "labels": {**_selector(spec), "app.kubernetes.io/managed-by": "sdserve"},
                    "annotations": {ANNOTATION: digest},
                },
                "spec": {
                    "terminationGracePeriodSeconds": d.termination_grace,
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": spec.uid,
                        "runAsGroup": spec.uid,
                        "fsGroup": spec.uid,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def render_manifests(spec: K8sSpec) -> list[dict[str, Any]]:
    """The ConfigMap, Deployment, Service and PodDisruptionBudget of ``spec``, in the order
    ``kubectl apply`` should create them."""
    _validate(spec)
    cfg, text = load(spec)
    d = deadlines(spec, cfg)
    problems = deadline_problems(d, cfg, spec.config)
    if problems:
        raise K8sError("; ".join(problems))
    pdb: dict[str, Any] = (
        {"minAvailable": spec.min_available}
        if spec.min_available is not None
        else {"maxUnavailable": spec.max_unavailable}
    )
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(spec, f"{spec.name}-config"),
            "data": {CONFIG_KEY: text},
        },
        render_deployment(spec, cfg, text, d),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(spec, spec.name),
            "spec": {
                "type": "ClusterIP",
                "selector": _selector(spec),
                "ports": [
                    {
                        "name": "http",
                        "port": spec.service_port,
                        "targetPort": "http",
                        "protocol": "TCP",
                    }
                ],
            },
        },
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _metadata(spec, spec.name),
            "spec": {"selector": {"matchLabels": _selector(spec)}, **pdb},
        },
    ]


# -- YAML ------------------------------------------------------------------------------

_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./-]*$")
#: plain scalars that YAML 1.1 or 1.2 would read as something other than a string
_SPECIAL = re.compile(r"^(y|n|yes|no|on|off|true|false|null|~)$", re.IGNORECASE)


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if _PLAIN.match(value) and not _SPECIAL.match(value):
            return value
        return json.dumps(value)  # a JSON string is a YAML double-quoted scalar
    raise TypeError(f"no YAML for {value!r}")


def _lines(node: object, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, dict | list) and value:
                out.append(f"{pad}{_scalar(key)}:")
                out += _lines(value, indent + 2)
            elif isinstance(value, str) and _literal(value):
                # a literal block keeps a file readable; the indent is explicit for the
                # lines that start with spaces, the chomping keeps the final newlines
                chomp = "" if value.endswith("\n") else "-"
                if value.endswith("\n\n"):
                    chomp = "+"
                out.append(f"{pad}{_scalar(key)}: |2{chomp}")
                lines = value.split("\n")
                if value.endswith("\n"):
                    lines.pop()
                out += [f"{pad}  {line}" if line else "" for line in lines]
            else:
                out.append(f"{pad}{_scalar(key)}: {_flow(value)}")
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, dict | list) and item:
                sub = _lines(item, indent + 2)
                sub[0] = f"{pad}- {sub[0][indent + 2 :]}"
                out += sub
            else:
                out.append(f"{pad}- {_flow(item)}")
    return out


def _literal(value: str) -> bool:
    """Whether ``value`` is written as a literal block: several lines, all printable."""
    return (
        "\n" in value
        and bool(value.strip("\n"))
        and all(c.isprintable() or c in "\t\n" for c in value)
    )


def _flow(value: object) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


def to_yaml(documents: Sequence[Mapping[str, Any]]) -> str:
    """A multi-document YAML stream of ``documents`` (dicts, lists, str, int, bool)."""
    return "".join("---\n" + "\n".join(_lines(dict(doc), 0)) + "\n" for doc in documents)


# -- command line ----------------------------------------------------------------------


def notes(spec: K8sSpec) -> list[str]:
    """What the operator should know about manifests that render fine."""
    found = []
    if spec.replicas == 1:
        found.append(
            "--replicas 1: a node drain evicts the only pod, and requests fail until its "
            "replacement is ready elsewhere; run 2 or more for no downtime"
        )
    try:
        raw = tomllib.loads(Path(spec.config).read_text())
    except (OSError, tomllib.TOMLDecodeError):  # load() read it before
        raw = {}
    if "workers" not in raw and spec.cpu_limit is None:
        found.append(
            f"{spec.config} sets no workers and there is no --cpu-limit: sdserve starts one "
            "worker per CPU of the node; set workers in the file or give --cpu-limit"
        )
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Render Kubernetes manifests (ConfigMap, Deployment, Service, PodDisruptionBudget) "
        "for an application, sized for its config file. See units/KUBERNETES.md."
    )
    parser.add_argument(
        "--name", default="sdserve", help="name of every object (default: %(default)s)"
    )
    parser.add_argument(
        "--image", required=True, help="container image holding sdserve and the application"
    )
    parser.add_argument(
        "--config",
        required=True,
        metavar="PATH",
        help="sdserve's config file: read now to size the deadlines, and shipped in the "
        f"ConfigMap (mounted at {CONFIG_DIR}/{CONFIG_KEY})",
    )
    parser.add_argument("--namespace", help="metadata.namespace (default: kubectl's)")
    parser.add_argument(
        "--replicas", type=int, default=DEFAULT_REPLICAS, help="pods (default: %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="container port of HTTP, named http (default: %(default)s)",
    )
    parser.add_argument(
        "--admin-port",
        type=int,
        default=DEFAULT_ADMIN_PORT,
        help="container port of the admin socket, where the probes go (default: %(default)s)",
    )
    parser.add_argument(
        "--service-port",
        type=int,
        default=DEFAULT_SERVICE_PORT,
        help="the Service's port, to the pods' http (default: %(default)s)",
    )
    parser.add_argument(
        "--executable",
        default="sdserve",
        metavar="PATH",
        help="the sdserve command in the image (default: %(default)s, on its PATH)",
    )
    parser.add_argument(
        "--uid",
        type=int,
        default=DEFAULT_UID,
        help="runAsUser and runAsGroup (default: %(default)s)",
    )
    parser.add_argument("--cpu-request", default="250m", help="(default: %(default)s)")
    parser.add_argument("--memory-request", default="256Mi", help="(default: %(default)s)")
    parser.add_argument("--cpu-limit", help="also sizes sdserve's default workers (default: none)")
    parser.add_argument("--memory-limit", help="(default: none)")
    probes = parser.add_argument_group("probes (all on the admin port)")
    probes.add_argument(
        "--readiness-period",
        type=int,
        default=DEFAULT_READINESS_PERIOD,
        metavar="SECONDS",
        help="x --readiness-failures must fit in drain_delay (default: %(default)s)",
    )
    probes.add_argument(
        "--readiness-failures",
        type=int,
        default=DEFAULT_READINESS_FAILURES,
        metavar="N",
        help="failureThreshold; sdserve's /readyz already has its own hysteresis "
        "(health.fail_threshold) (default: %(default)s)",
    )
    probes.add_argument(
        "--startup-period",
        type=int,
        default=DEFAULT_STARTUP_PERIOD,
        metavar="SECONDS",
        help="the failureThreshold is derived from start_timeout (default: %(default)s)",
    )
    probes.add_argument(
        "--liveness-period",
        type=int,
        default=DEFAULT_LIVENESS_PERIOD,
        metavar="SECONDS",
        help="at most health.stall_hold (default: %(default)s)",
    )
    probes.add_argument(
        "--liveness-failures",
        type=int,
        default=DEFAULT_LIVENESS_FAILURES,
        metavar="N",
        help="(default: %(default)s)",
    )
    pdb = parser.add_mutually_exclusive_group()
    pdb.add_argument(
        "--pdb-max-unavailable",
        type=int,
        default=1,
        metavar="N",
        help="pods a voluntary disruption may take down at once (default: %(default)s)",
    )
    pdb.add_argument(
        "--pdb-min-available", type=int, metavar="N", help="instead: pods that must stay up"
    )
    parser.add_argument(
        "--credentials-secret",
        metavar="SECRET",
        help="a Secret mounted as $CREDENTIALS_DIRECTORY: its keys are the checks' "
        "password_credential names (default: none)",
    )
    parser.add_argument(
        "--out", type=Path, metavar="FILE", help="write the YAML here (default: stdout)"
    )


def spec_from_args(args: argparse.Namespace) -> K8sSpec:
    return K8sSpec(
        name=args.name,
        image=args.image,
        config=args.config,
        namespace=args.namespace,
        replicas=args.replicas,
        port=args.port,
        admin_port=args.admin_port,
        service_port=args.service_port,
        executable=args.executable,
        uid=args.uid,
        cpu_request=args.cpu_request or None,
        memory_request=args.memory_request or None,
        cpu_limit=args.cpu_limit,
        memory_limit=args.memory_limit,
        readiness_period=args.readiness_period,
        readiness_failures=args.readiness_failures,
        startup_period=args.startup_period,
        liveness_period=args.liveness_period,
        liveness_failures=args.liveness_failures,
        max_unavailable=args.pdb_max_unavailable,
        min_available=args.pdb_min_available,
        credentials_secret=args.credentials_secret,
    )


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    try:
        text = to_yaml(render_manifests(spec))
    except K8sError as exc:
        print(f"sdserve k8s: {exc}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(text)
    else:
        try:
            args.out.write_text(text)
        except OSError as exc:
            print(f"sdserve k8s: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
            return 2
        print(args.out)
    for note in notes(spec):
        print(f"sdserve k8s: note: {note}", file=sys.stderr)
    return 0
