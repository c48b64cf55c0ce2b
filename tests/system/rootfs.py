"""Build and cache the Debian 12 root filesystems that the system tests boot.

Two flavours, both built once and kept under the cache folder:

* ``252``: ``debootstrap`` of bookworm (systemd 252), with a venv in ``/opt/venv`` that holds
  sdserve's runtime dependencies;
* ``254``: a copy of ``252`` whose systemd is upgraded from bookworm-backports.

sdserve itself is *not* installed into the rootfs: ``/opt/venv`` finds it in
``/opt/sdserve-src`` (a ``.pth`` file), where the test bed bind-mounts the checkout's
``sdserve/`` package read-only at boot, so the code under test is always the checkout's.

A flavour is rebuilt when its key (``ROOTFS_VERSION`` and the runtime dependencies of
``pyproject.toml``) changes. Builds hold an exclusive ``flock`` on ``<cache>/lock``; booted
boxes hold a shared one, so a build never replaces a tree that a box is running from.

This file uses the standard library only, and runs as a script:
``python tests/system/rootfs.py [--cache DIR] [FLAVOUR ...]``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

# Bump to force a rebuild of every flavour after changing how they are built.
ROOTFS_VERSION = 7

FLAVOURS = ("252", "254")
SUITE = "bookworm"
CHECKOUT = Path(__file__).resolve().parents[2]
CACHE_ENV = "SDS_TEST_CACHE"

# python3-systemd is Debian's build of systemd-python: the venv sees it through
# --system-site-packages, so pip never has to compile it inside the rootfs.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "python3-pip",
    "python3-systemd",
    "curl",
    "procps",
    "iproute2",
    "ca-certificates",
)

# Units that slow down or clutter a boot and have no use in a test box.
MASKED_UNITS = (
    "console-getty.service",
    "getty@tty1.service",
    "getty.target",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
    "systemd-networkd-wait-online.service",
)

VENV = "/opt/venv"
SRC_MOUNT = "/opt/sdserve-src"
STAMP = ".sds-testbed.json"


def cache_root() -> Path:
    """The folder that holds the rootfs trees: ``$SDS_TEST_CACHE`` or ``.cache/testbed``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).resolve() if env else CHECKOUT / ".cache" / "testbed"


def log(msg: str) -> None:
    print(f"[testbed] {msg}", file=sys.stderr, flush=True)


def debian_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror that the host's own apt sources use."""
    deb822 = sources_dir / "sources.list.d" / "debian.sources"
    if deb822.is_file():
        for line in deb822.read_text().splitlines():
            m = re.match(r"URIs:\s*(\S+)", line)
            if m and "security" not in m.group(1):
                return m.group(1)
    candidates = [sources_dir / "sources.list", *sorted(sources_dir.glob("sources.list.d/*.list"))]
    for path in candidates:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            m = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", line)
            if m and "security" not in m.group(1):
                return m.group(1)
    return "http://deb.debian.org/debian"


def runtime_dependencies() -> list[str]:
    """sdserve's runtime requirements, as ``pyproject.toml`` lists them."""
    with (CHECKOUT / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    return [str(d) for d in project["dependencies"]]


def project_version() -> str:
    with (CHECKOUT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def flavour_key(flavour: str) -> str:
    blob = json.dumps(
        {"v": ROOTFS_VERSION, "flavour": flavour, "deps": runtime_dependencies()},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rootfs_path(flavour: str, cache: Path | None = None) -> Path:
    return (cache or cache_root()) / flavour


def is_current(flavour: str, cache: Path | None = None) -> bool:
    stamp = rootfs_path(flavour, cache) / STAMP
    try:
        return bool(json.loads(stamp.read_text()).get("key") == flavour_key(flavour))
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def locked(cache: Path, *, shared: bool) -> Iterator[None]:
    """Hold ``<cache>/lock``: exclusive while building, shared while a box runs."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / "lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run(cmd: Sequence[str], *, env: dict[str, str] | None = None) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(list(cmd), check=True, env=env, stdin=subprocess.DEVNULL)


def chroot_env() -> dict[str, str]:
    """A clean environment for commands in the chroot (no host pip config that points at
    host-only folders)."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_DEFAULT_TIMEOUT": os.environ.get("PIP_DEFAULT_TIMEOUT", "120"),
        "PIP_CONFIG_FILE": "/dev/null",
    }
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def in_chroot(root: Path, script: str) -> None:
    """Run a shell script in ``root`` with /proc, /sys and /dev mounted in a private mount
    namespace, so that nothing stays mounted when it exits, even after a failure."""
    wrapper = (
        "set -e; "
        f'r="{root}"; '
        'mount -t proc proc "$r/proc"; '
        'mount -t sysfs sysfs "$r/sys"; '
        'mount --rbind /dev "$r/dev"; '
        'exec chroot "$r" /bin/sh -ec "$1"'
    )
    run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", wrapper, "sh", script],
        env=chroot_env(),
    )


def write(root: Path, path: str, text: str, mode: int = 0o644) -> None:
    dest = root / path.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    dest.chmod(mode)


def configure_base(root: Path, mirror: str) -> None:
    for unit in MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    write(root, "/etc/apt/sources.list", f"deb {mirror} {SUITE} main\n")
    # pip reaches PyPI from the chroot through the host's network and its trusted CAs.
    shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
    extra_ca = Path("/usr/local/share/ca-certificates")
    dest_ca = root / "usr/local/share/ca-certificates"
    dest_ca.mkdir(parents=True, exist_ok=True)
    if extra_ca.is_dir():
        for cert in extra_ca.iterdir():
            if cert.is_file():
                shutil.copy2(cert, dest_ca / cert.name)
    # A short journal flush and no rate limit: tests read the journal of every run.
    write(
        root,
        "/etc/systemd/journald.conf.d/50-testbed.conf",
        "[Journal]\nRateLimitBurst=0\nStorage=volatile\n",
    )
    in_chroot(root, "update-ca-certificates >/dev/null")


def install_venv(root: Path) -> None:
    deps = " ".join(f"'{d}'" for d in runtime_dependencies())
    in_chroot(
        root,
        f"rm -rf {VENV}; python3 -m venv --system-site-packages {VENV}; "
        f"{VENV}/bin/pip install -q {deps}",
    )
    # sdserve comes from the checkout, bind-mounted read-only at SRC_MOUNT at boot: a .pth
    # puts it on the venv's path, and a minimal dist-info gives it a version and its script.
    site = next((root / VENV.lstrip("/") / "lib").glob("python3*/site-packages"))
    (site / "sdserve-checkout.pth").write_text(SRC_MOUNT + "\n")
    version = project_version()
    dist = site / f"sdserve-{version}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sdserve\nVersion: {version}\n")
    (dist / "entry_points.txt").write_text("[console_scripts]\nsdserve = sdserve.cli:main\n")
    (dist / "INSTALLER").write_text("sds-testbed\n")
    (dist / "RECORD").write_text("")
    write(
        root,
        f"{VENV}/bin/sdserve",
        f"#!{VENV}/bin/python3\nimport sys\n\nfrom sdserve.cli import main\n\nsys.exit(main())\n",
        0o755,
    )
    (root / SRC_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    # The shipped units run /usr/bin/sdserve, where a Debian package would put it.
    link = root / "usr/bin/sdserve"
    link.unlink(missing_ok=True)
    link.symlink_to(f"{VENV}/bin/sdserve")


def finish(root: Path, flavour: str) -> None:
    in_chroot(root, "apt-get clean; rm -rf /var/lib/apt/lists/*")
    version = subprocess.run(
        ["chroot", str(root), "systemctl", "--version"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[1]
    if version != flavour:
        raise RuntimeError(f"flavour {flavour}: rootfs has systemd {version}")
    stamp = {"key": flavour_key(flavour), "systemd": version, "built": time.time()}
    (root / STAMP).write_text(json.dumps(stamp) + "\n")


def build_252(dest: Path, mirror: str) -> None:
    run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=" + ",".join(PACKAGES),
            SUITE,
            str(dest),
            mirror,
        ]
    )
    configure_base(dest, mirror)
    install_venv(dest)
    finish(dest, "252")


def build_254(dest: Path, base: Path, mirror: str) -> None:
    run(["cp", "-a", "--reflink=auto", str(base), str(dest)])
    (dest / STAMP).unlink(missing_ok=True)
    write(
        dest,
        "/etc/apt/sources.list.d/backports.list",
        f"deb {mirror} {SUITE}-backports main\n",
    )
    in_chroot(
        dest,
        "apt-get update -q; "
        f"apt-get install -y -q -t {SUITE}-backports systemd systemd-sysv libsystemd0 >/dev/null",
    )
    finish(dest, "254")


def ensure(flavours: Sequence[str] = FLAVOURS, cache: Path | None = None) -> dict[str, Path]:
    """Build the missing or stale flavours; return their paths. Safe to call concurrently."""
    cache = cache or cache_root()
    for flavour in flavours:
        if flavour not in FLAVOURS:
            raise ValueError(f"unknown flavour {flavour!r}: choose from {FLAVOURS}")
    if all(is_current(f, cache) for f in flavours):
        return {f: rootfs_path(f, cache) for f in flavours}
    if os.geteuid() != 0:
        raise PermissionError("building the test rootfs needs root")
    with locked(cache, shared=False):
        mirror = debian_mirror()
        # 254 is built from 252, so 252 is always needed.
        for flavour in sorted({"252", *flavours}):
            if is_current(flavour, cache):
                continue
            started = time.monotonic()
            final = rootfs_path(flavour, cache)
            tmp = cache / f"{flavour}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            if flavour == "252":
                build_252(tmp, mirror)
            else:
                build_254(tmp, rootfs_path("252", cache), mirror)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            log(f"built {final} in {time.monotonic() - started:.0f} s")
    return {f: rootfs_path(f, cache) for f in flavours}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cache", type=Path, help=f"cache folder (default ${CACHE_ENV} or .cache)")
    parser.add_argument(
        "--if-possible",
        action="store_true",
        help="where the rootfs cannot be built (not root, no debootstrap), say why and exit 0",
    )
    parser.add_argument("flavours", nargs="*", default=list(FLAVOURS))
    args = parser.parse_args(argv)
    if args.if_possible:
        missing = [t for t in ("debootstrap", "chroot", "unshare") if shutil.which(t) is None]
        if os.geteuid() != 0 or missing:
            why = "not root" if os.geteuid() != 0 else f"missing {', '.join(missing)}"
            log(f"not building the system-test rootfs: {why}")
            return 0
    paths = ensure(args.flavours, args.cache.resolve() if args.cache else None)
    for flavour, path in paths.items():
        log(f"systemd {flavour}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
