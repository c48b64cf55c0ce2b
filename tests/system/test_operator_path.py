"""What ``sdserve units`` promises beyond units/DEPLOY.md, under a real systemd (252 and 254):
an application in a home folder is imported and sees no other home, each instance of a
template listens on its own port as its own user, and a configuration error is not
restarted."""

from __future__ import annotations

import json

from .testbed import Box

UNITS = "/etc/systemd/system"

HOME_APP = """\
import os

from aiohttp import web


async def where(request: web.Request) -> web.Response:
    def readable(path: str) -> bool:
        try:
            with open(path) as f:
                f.read()
        except OSError:
            return False
        return True

    def writable(path: str) -> bool:
        try:
            with open(path, "w"):
                pass
        except OSError:
            return False
        return True

    return web.json_response(
        {
            "cwd": os.getcwd(),
            "homes": sorted(os.listdir("/home")),
            "other_home": readable("/home/alice/notes.txt"),
            "root_home": readable("/root/.profile"),
            "writes_code": writable(os.path.join(os.getcwd(), "new.py")),
        }
    )


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", where)
    return app
"""


def units(box: Box, *args: str) -> str:
    res = box.run(["sdserve", "units", *args, f"--out={UNITS}"])
    box.systemctl("daemon-reload")
    return res.stderr


def test_an_app_in_a_home_is_imported_and_sees_no_other_home(box: Box) -> None:
    box.write("/home/deploy/app/homeapp.py", HOME_APP)
    box.write("/home/alice/notes.txt", "alice's\n")
    units(
        box,
        "--name=homeapp",
        "--app=homeapp:create_app",
        "--workdir=/home/deploy/app",
        "--venv=/opt/venv",
        "--workers=1",
    )
    props = box.show("homeapp.service", "ProtectHome", "BindReadOnlyPaths")
    assert props["ProtectHome"] == "tmpfs"
    assert props["BindReadOnlyPaths"] == "/home/deploy/app:/home/deploy/app:rbind"
    box.systemctl("start", "homeapp.socket", "homeapp.service")
    res = box.run(["curl", "-sS", "--max-time", "30", "http://127.0.0.1:8080/"])
    assert json.loads(res.stdout) == {
        "cwd": "/home/deploy/app",
        "homes": ["deploy"],  # alice's home is not there at all
        "other_home": False,
        "root_home": False,
        "writes_code": False,  # read-only
    }


def test_each_instance_of_a_template_has_its_port_and_its_user(box: Box) -> None:
    units(box, "--name=web@", "--app=sdserve.demo:create_app", "--workers=1")
    instances = ("web@8081", "web@8082")
    box.systemctl("start", *(f"{i}.service" for i in instances))
    uids = set()
    for instance in instances:
        port = instance.split("@")[1]
        res = box.run(["curl", "-sS", "--max-time", "30", f"http://127.0.0.1:{port}/"])
        assert res.stdout.startswith("hello from sdserve demo"), res.stdout
        props = box.show(f"{instance}.service", "User", "MainPID", "SyslogIdentifier")
        assert props["User"] == f"web-{port}"
        assert props["SyslogIdentifier"] == f"web-{port}"
        uids.add(box.run(["ps", "-o", "uid=", "-p", props["MainPID"]]).stdout.strip())
    assert len(uids) == 2, uids  # two dynamic users
    listening = box.run(["ss", "-Hltn"]).stdout
    assert "127.0.0.1:8081" in listening
    assert "127.0.0.1:8082" in listening


def test_a_configuration_error_is_not_restarted(box: Box) -> None:
    box.write("/etc/web/web.toml", "workers = 1\n")
    assert "note" not in units(
        box, "--name=web", "--app=sdserve.demo:create_app", "--config=/etc/web/web.toml"
    )
    box.systemctl("start", "web.socket", "web.service")
    box.write("/etc/web/web.toml", "workers = 1\nshutdown_timout = 5\n")  # a typo
    assert box.systemctl("restart", "web.service", check=False).returncode != 0
    # at once failed: not `activating (auto-restart)`, which Restart=on-failure alone gives
    props = box.show("web.service", "ActiveState", "SubState", "ExecMainStatus", "NRestarts")
    assert props == {
        "ActiveState": "failed",
        "SubState": "failed",
        "ExecMainStatus": "2",
        "NRestarts": "0",
    }
    # the port stays open for when the file is fixed
    assert box.show("web.socket", "ActiveState")["ActiveState"] == "active"
