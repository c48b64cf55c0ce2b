"""Build sdserve's deb and rpm packages (``make deb``, ``make rpm``).

Steps, each cached under ``<cache>/packaging`` (``$SDS_PKG_CACHE``, default ``.cache/packaging``):

1. ``buildroot``: a Debian 12 (bookworm) chroot made with ``debootstrap``, holding the
   target's own ``/usr/bin/python3`` (3.11.2), ``libsystemd-dev`` and a C compiler. Built once.
2. ``venv``: inside that chroot, ``python3 -m venv /opt/sdserve`` and ``pip install`` of this
   checkout with its ``postgres``, ``redis`` and ``uvloop`` extras (sdserve, aiohttp, asyncpg,
   redis-py, uvloop, systemd-python compiled against bookworm's libsystemd), so that every
   built-in check works from the package and it serves on uvloop. The result is copied out
   and keyed by a hash of the sources, so it is rebuilt only when they change.
3. ``deb``: ``dpkg-buildpackage`` on a build tree made of ``packaging/debian`` + the venv +
   the units of ``units/``, then ``lintian``. ``rpm``: ``rpmbuild -bb`` of
   ``packaging/rpm/sdserve.spec`` on the same venv, then ``rpmlint``.

Standard library only; runs as a script (``python3 packaging/build.py deb|rpm|venv``).
"""

from __future__ import annotations

import argparse
import email.utils
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
from collections.abc import Iterable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent
CACHE_ENV = "SDS_PKG_CACHE"
SOURCE_ENV = "SDS_TEST_SOURCE"
PREFIX = "/opt/sdserve"
SUITE = "bookworm"
# Bump to rebuild the build root after changing how it is made.
BUILDROOT_VERSION = 1
# Bump to rebuild the venv after changing how it is made.
VENV_VERSION = 6
# The extras of pyproject.toml that the packages install: the built-in checks of type
# postgres (asyncpg) and redis (redis-py) must work from the package, and it serves on
# uvloop (loop = "auto").
EXTRAS = ("postgres", "redis", "uvloop")
# What the venv must import, or the build fails (a missing extra would otherwise surface as
# ModuleNotFoundError in the operator's first check).
IMPORTS = (
    "sdserve",
    "aiohttp",
    "systemd.daemon",
    "asyncpg",
    "redis.asyncio",
    "prometheus_client",
    "aiohttp_remotes",
    "uvloop",
)
BUILDROOT_PACKAGES = (
    "python3",
    "python3-venv",
    "python3-dev",
    "gcc",
    "libc6-dev",
    "libsystemd-dev",
    "pkg-config",
    "ca-certificates",
)
STAMP = ".sds-buildroot.json"
# The units the packages ship, from units/ (the same for every systemd version).
UNITS = (
    "sdserve.socket",
    "sdserve-admin.socket",
    "sdserve.service",
    "sdserve@.socket",
    "sdserve@.service",
)


def log(msg: str) -> None:
    print(f"[packaging] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).resolve() if env else CHECKOUT / ".cache" / "packaging"


def run(cmd: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(list(cmd), check=True, cwd=cwd, env=env, stdin=subprocess.DEVNULL)


def upstream_version() -> str:
    with (source_root() / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def debian_mirror() -> str:
    """The Debian mirror that the host's apt sources use."""
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.is_file():
        for m in re.finditer(r"^URIs:\s*(\S+)", deb822.read_text(), re.MULTILINE):
            if "security" not in m.group(1):
                return m.group(1)
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]:
        if path.is_file():
            for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", path.read_text(), re.MULTILINE):
                if "security" not in m.group(1):
                    return m.group(1)
    return "http://deb.debian.org/debian"


def chroot_env() -> dict[str, str]:
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_CACHE_DIR": "1",
        "PIP_CONFIG_FILE": "/dev/null",
        "PIP_DEFAULT_TIMEOUT": os.environ.get("PIP_DEFAULT_TIMEOUT", "120"),
        "SOURCE_DATE_EPOCH": str(source_date_epoch()),
    }
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def in_chroot(root: Path, script: str) -> None:
    """Run ``script`` in ``root`` with /proc, /sys, /dev mounted in a private mount namespace
    (nothing stays mounted afterwards, even on failure)."""
    wrapper = (
        'set -e; r="$1"; '
        'mount -t proc proc "$r/proc"; mount -t sysfs sysfs "$r/sys"; '
        'mount --rbind /dev "$r/dev"; '
        'exec chroot "$r" /bin/sh -ec "$2"'
    )
    run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            wrapper,
            "sh",
            str(root),
            script,
        ],
        env=chroot_env(),
    )


# ---- 1. the build root ---------------------------------------------------------------------


def buildroot_key() -> str:
    blob = json.dumps({"v": BUILDROOT_VERSION, "suite": SUITE, "pkgs": BUILDROOT_PACKAGES})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_buildroot(cache: Path) -> Path:
    root = cache / "buildroot"
    stamp = root / STAMP
    try:
        if json.loads(stamp.read_text()).get("key") == buildroot_key():
            return root
    except (OSError, ValueError):
        pass
    if os.geteuid() != 0:
        raise PermissionError("building the Debian 12 build root needs root (debootstrap)")
    tmp = cache / "buildroot.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.monotonic()
    mirror = debian_mirror()
    run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=" + ",".join(BUILDROOT_PACKAGES),
            SUITE,
            str(tmp),
            mirror,
        ]
    )
    # pip reaches PyPI through the host's network and the CAs the host trusts.
    shutil.copy2("/etc/resolv.conf", tmp / "etc/resolv.conf")
    extra = Path("/usr/local/share/ca-certificates")
    if extra.is_dir():
        for cert in extra.iterdir():
            if cert.is_file():
                shutil.copy2(cert, tmp / "usr/local/share/ca-certificates" / cert.name)
    in_chroot(tmp, "update-ca-certificates >/dev/null; apt-get clean")
    python = subprocess.run(
        ["chroot", str(tmp), "python3", "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    (tmp / STAMP).write_text(json.dumps({"key": buildroot_key(), "python": python}) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    log(f"build root {root} (python {python}) in {time.monotonic() - started:.0f} s")
    return root


# ---- 2. the venv ---------------------------------------------------------------------------


def source_root() -> Path:
    """The folder whose sdserve/ and pyproject.toml are packaged: the checkout, or
    $SDS_TEST_SOURCE (as for the test bed: e.g. a clean export of a commit)."""
    base = Path(os.environ.get(SOURCE_ENV) or CHECKOUT).resolve()
    if not (base / "sdserve" / "__init__.py").is_file():
        raise RuntimeError(f"{base} holds no sdserve package (from ${SOURCE_ENV} or the checkout)")
    return base


def source_files() -> list[Path]:
    base = source_root()
    files = [base / "pyproject.toml"]
    for path in sorted((base / "sdserve").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files.append(path)
    return files


def source_date_epoch() -> int:
    """The time stamp of the build: $SOURCE_DATE_EPOCH, else the last commit's."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        return int(env)
    out = subprocess.run(
        ["git", "-C", str(CHECKOUT), "log", "-1", "--format=%ct"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return int(out) if out.isdigit() else int(time.time())


def venv_key(root: Path) -> str:
    h = hashlib.sha256()
    h.update((root / STAMP).read_bytes() + str(VENV_VERSION).encode())
    for path in source_files():
        h.update(str(path.relative_to(source_root())).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def ensure_venv(cache: Path) -> Path:
    """The venv of /opt/sdserve, built in the build root; returns its copy on the host."""
    root = ensure_buildroot(cache)
    key = venv_key(root)
    out = cache / f"venv-{key}"
    if (out / "bin" / "sdserve").is_file():
        return out
    started = time.monotonic()
    src = root / "build" / "src"
    shutil.rmtree(root / "build", ignore_errors=True)
    src.mkdir(parents=True)
    base = source_root()
    shutil.copy2(base / "pyproject.toml", src / "pyproject.toml")
    readme = base / "README.md"
    if readme.is_file():
        shutil.copy2(readme, src / "README.md")
    else:  # pyproject names a readme; the wheel needs some text there
        (src / "README.md").write_text("sdserve\n")
    shutil.copytree(
        base / "sdserve", src / "sdserve", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    in_chroot(
        root,
        f"rm -rf {PREFIX}; python3 -m venv {PREFIX}; "
        f"{PREFIX}/bin/pip install -q --use-pep517 '/build/src[{','.join(EXTRAS)}]'; "
        # the package ships a closed runtime: no installer, no activation scripts, no byte code
        # (byte code is compiled by the postinst script, against the installed files)
        f"{PREFIX}/bin/sdserve --help >/dev/null; "
        f"{PREFIX}/bin/python3 -c 'import {', '.join(IMPORTS)}'; "
        f"{PREFIX}/bin/pip uninstall -q -y pip setuptools; "
        f"rm -f {PREFIX}/bin/activate* {PREFIX}/bin/Activate.ps1; "
        # modules are imported, not run: some wheels (redis) install them executable, some
        # (prometheus-client) with a #! line; the line is blanked, so line numbers stay
        f"find {PREFIX}/lib -type f -name '*.py' -perm /111 -exec chmod a-x {{}} +; "
        f"find {PREFIX}/lib -type f -name '*.py' -exec sed -i '1s/^#!.*$//' {{}} +; "
        f"find {PREFIX} -name __pycache__ -type d -prune -exec rm -rf {{}} +",
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp = cache / f"venv-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    run(["cp", "-a", str(root / PREFIX.lstrip("/")), str(tmp)])
    shutil.rmtree(root / PREFIX.lstrip("/"))
    shutil.rmtree(root / "build")
    # Files from wheels carry the time they were built; give everything the build's time
    # stamp so that two builds of the same sources are alike.
    epoch = source_date_epoch()
    for path in [tmp, *tmp.rglob("*")]:
        os.utime(path, (epoch, epoch), follow_symlinks=False)
    tmp.rename(out)
    for old in cache.glob("venv-*"):
        if old != out and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    log(f"venv {out} in {time.monotonic() - started:.0f} s")
    return out


# ---- the common payload ----------------------------------------------------------------------


def copy_payload(dest: Path, venv: Path) -> None:
    """What both packages install, laid out for their build trees."""
    run(["cp", "-a", str(venv), str(dest / "venv")])
    (dest / "units").mkdir()
    for unit in UNITS:
        shutil.copy2(CHECKOUT / "units" / unit, dest / "units" / unit)
    for name in ("sdserve.toml", "sdserve.1", "sysusers.conf", "tmpfiles.conf", "LICENSE"):
        shutil.copy2(HERE / "files" / name, dest / name)
    shutil.copy2(HERE / "README.md", dest / "README.packaging.md")
    # 40-package.conf (both packages), 40-www-data.conf (the deb's sdserve@.socket)
    for dropin in sorted((HERE / "systemd").glob("*.conf")):
        shutil.copy2(dropin, dest / dropin.name)


# ---- 3a. the deb ---------------------------------------------------------------------------


def changelog_entry(version: str, text: str) -> str:
    when = email.utils.formatdate(source_date_epoch(), localtime=False)
    return (
        f"sdserve ({version}) unstable; urgency=medium\n\n  * {text}\n\n"
        f" -- sdserve maintainers <sdserve@localhost>  {when}\n\n"
    )


def inputs_key(venv: Path, *extra: str) -> str:
    """What a package is made of: the venv, packaging/ and units/ (a package whose key is
    unchanged is not built again)."""
    h = hashlib.sha256(venv.name.encode() + "\0".join(extra).encode())
    for base in (HERE, CHECKOUT / "units"):
        for path in sorted(base.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(CHECKOUT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def cached(out: Path, kind: str, key: str) -> tuple[Path, bool] | None:
    """The package built from inputs ``key`` if it is still there, and whether it was linted."""
    stamp = out / f".{kind}.key"
    try:
        name, old, linted = stamp.read_text().split()
    except (OSError, ValueError):
        return None
    return (out / name, linted == "1") if old == key and (out / name).is_file() else None


def build_deb(cache: Path, out: Path, revision: str | None, lint: bool) -> Path:
    venv = ensure_venv(cache)
    kind = f"deb-{revision or 'release'}"
    key = inputs_key(venv, kind)
    hit = cached(out, kind, key)
    if hit is not None:
        deb, linted = hit
        if lint and not linted:
            lintian(deb, out / "lintian.txt")
            (out / f".{kind}.key").write_text(f"{deb.name} {key} 1\n")
        log(f"{deb} is current")
        return deb
    work = cache / "deb"
    shutil.rmtree(work, ignore_errors=True)
    tree = work / "sdserve"
    tree.mkdir(parents=True)
    copy_payload(tree, venv)
    shutil.copytree(HERE / "debian", tree / "debian")
    # dh_installsysusers / dh_installtmpfiles read them from debian/
    shutil.copy2(HERE / "files" / "sysusers.conf", tree / "debian" / "sdserve.sysusers")
    shutil.copy2(HERE / "files" / "tmpfiles.conf", tree / "debian" / "sdserve.tmpfiles")
    changelog = tree / "debian" / "changelog"
    top = re.match(r"sdserve \(([^)]+)\)", changelog.read_text())
    assert top, "debian/changelog has no top entry"
    version = top.group(1)
    if revision is not None:
        # a newer build of the same sources (the upgrade test installs one over the other)
        version = f"{version}+b{revision}"
        changelog.write_text(
            changelog_entry(version, f"Rebuild {revision}.") + changelog.read_text()
        )
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(source_date_epoch()), LC_ALL="C.UTF-8")
    run(["dpkg-buildpackage", "-b", "-us", "-uc", "--no-sign"], cwd=tree, env=env)
    debs = sorted(work.glob(f"sdserve_{version}_*.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"dpkg-buildpackage made {debs}, expected one sdserve_{version}")
    out.mkdir(parents=True, exist_ok=True)
    deb = out / debs[0].name
    shutil.copy2(debs[0], deb)
    if lint:
        lintian(deb, out / "lintian.txt")
    (out / f".{kind}.key").write_text(f"{deb.name} {key} {int(lint)}\n")
    log(f"built {deb} ({deb.stat().st_size / 1e6:.1f} MB)")
    return deb


def lintian(deb: Path, report: Path) -> None:
    """lintian, failing the build on any error or warning that is not overridden (each override
    has its reason in debian/sdserve.lintian-overrides). The report also lists the info and
    pedantic tags and the overridden ones."""
    gate = subprocess.run(
        ["lintian", "--fail-on", "error,warning", str(deb)],
        capture_output=True,
        text=True,
        check=False,
    )
    full = subprocess.run(
        ["lintian", "--display-info", "--pedantic", "--show-overrides", str(deb)],
        capture_output=True,
        text=True,
        check=False,
    )
    report.write_text(full.stdout)
    log(f"lintian: {summarize(full.stdout.splitlines()) or 'no tags'} (report: {report})")
    if gate.returncode != 0:
        sys.stderr.write(gate.stdout + gate.stderr)
        raise RuntimeError(f"lintian found errors or warnings in {deb}")


def summarize(lines: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for line in lines:
        m = re.match(r"([EWIPXO]): ", line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    names = {"E": "errors", "W": "warnings", "I": "info", "P": "pedantic", "O": "overridden"}
    return ", ".join(f"{n} {names.get(k, k)}" for k, n in sorted(counts.items()))


def build_example(cache: Path, out: Path, lint: bool) -> Path:
    """The example of packaging/example: an application on top of sdserve (sdserve@hello)."""
    h = hashlib.sha256()
    for path in sorted((HERE / "example").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(HERE)).encode() + b"\0" + path.read_bytes())
    key = h.hexdigest()[:16]
    hit = cached(out, "example", key)
    if hit is not None:
        deb, linted = hit
        if lint and not linted:
            lintian(deb, out / "lintian-example.txt")
            (out / ".example.key").write_text(f"{deb.name} {key} 1\n")
        log(f"{deb} is current")
        return deb
    work = cache / "example"
    shutil.rmtree(work, ignore_errors=True)
    tree = work / "sdserve-hello"
    shutil.copytree(HERE / "example", tree, ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(source_date_epoch()), LC_ALL="C.UTF-8")
    run(["dpkg-buildpackage", "-b", "-us", "-uc", "--no-sign"], cwd=tree, env=env)
    debs = sorted(work.glob("sdserve-hello_*_all.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"dpkg-buildpackage made {debs}, expected one sdserve-hello")
    out.mkdir(parents=True, exist_ok=True)
    deb = out / debs[0].name
    shutil.copy2(debs[0], deb)
    if lint:
        lintian(deb, out / "lintian-example.txt")
    (out / ".example.key").write_text(f"{deb.name} {key} {int(lint)}\n")
    log(f"built {deb}")
    return deb


# ---- 3b. the rpm ---------------------------------------------------------------------------


def build_rpm(cache: Path, out: Path, lint: bool) -> Path:
    venv = ensure_venv(cache)
    kind = "rpm"
    key = inputs_key(venv, kind)
    hit = cached(out, kind, key)
    if hit is not None:
        rpm, linted = hit
        if lint and not linted:
            rpmlint(rpm, out / "rpmlint.txt")
            (out / f".{kind}.key").write_text(f"{rpm.name} {key} 1\n")
        log(f"{rpm} is current")
        return rpm
    top = cache / "rpm"
    shutil.rmtree(top, ignore_errors=True)
    sources = top / "SOURCES"
    sources.mkdir(parents=True)
    # rpmbuild takes the payload as a folder of sources (the spec copies from it)
    staged = top / "payload"
    staged.mkdir()
    copy_payload(staged, venv)
    shutil.copy2(HERE / "rpm" / "sdserve.preset", staged / "sdserve.preset")
    run(["tar", "-C", str(top), "-cf", str(sources / "sdserve-payload.tar"), "payload"])
    shutil.rmtree(staged)
    argv = [
        "rpmbuild",
        "-bb",
        "--define",
        f"_topdir {top}",
        "--define",
        f"sdserve_version {upstream_version()}",
        "--define",
        "source_date_epoch_from_changelog 0",
        "--define",
        "use_source_date_epoch_as_buildtime 1",
    ]
    probe = subprocess.run(
        ["rpm", "--eval", "%{?systemd_post:yes}"], capture_output=True, text=True, check=False
    )
    if probe.stdout.strip() != "yes":
        # Not an rpm-based host (Debian's rpm has no systemd macros, which Fedora's
        # systemd-rpm-macros provide): our own definitions, and no build dependencies to
        # check in an rpm database that holds nothing.
        argv += ["--load", str(HERE / "rpm" / "macros.sdserve-systemd"), "--nodeps"]
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(source_date_epoch()), LC_ALL="C.UTF-8")
    run([*argv, str(HERE / "rpm" / "sdserve.spec")], env=env)
    rpms = sorted((top / "RPMS").rglob("sdserve-*.rpm"))
    if len(rpms) != 1:
        raise RuntimeError(f"rpmbuild made {rpms}, expected one package")
    out.mkdir(parents=True, exist_ok=True)
    rpm = out / rpms[0].name
    shutil.copy2(rpms[0], rpm)
    if lint:
        rpmlint(rpm, out / "rpmlint.txt")
    (out / f".{kind}.key").write_text(f"{rpm.name} {key} {int(lint)}\n")
    log(f"built {rpm} ({rpm.stat().st_size / 1e6:.1f} MB)")
    return rpm


def rpmlint(rpm: Path, report: Path) -> None:
    """The rpmlint report (kept, not enforced: rpmlint checks Fedora/openSUSE policy, and a
    private venv under /opt breaks several of its rules by design; see packaging/README.md)."""
    res = subprocess.run(
        ["rpmlint", "-c", str(HERE / "rpm" / "rpmlint.toml"), str(rpm)],
        capture_output=True,
        text=True,
        check=False,
    )
    report.write_text(res.stdout + res.stderr)
    last = [line for line in res.stdout.splitlines() if "packages and" in line]
    log(f"rpmlint: {last[-1] if last else res.stdout[-200:]} (report: {report})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("what", choices=("buildroot", "venv", "deb", "rpm", "example"))
    parser.add_argument("--out", type=Path, default=CHECKOUT / "dist", help="output folder")
    parser.add_argument(
        "--rebuild", help="deb only: a newer build of the same sources (version +bN)"
    )
    parser.add_argument("--no-lint", action="store_true", help="skip lintian / rpmlint")
    args = parser.parse_args(argv)
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    # one build at a time: they share the build root's /opt/sdserve and the work folders
    lock = (cache / "lock").open("a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    if args.what == "buildroot":
        print(ensure_buildroot(cache))
    elif args.what == "venv":
        print(ensure_venv(cache))
    elif args.what == "deb":
        print(build_deb(cache, out, args.rebuild, not args.no_lint))
    elif args.what == "example":
        print(build_example(cache, out, not args.no_lint))
    else:
        print(build_rpm(cache, out, not args.no_lint))
    return 0


if __name__ == "__main__":
    sys.exit(main())
