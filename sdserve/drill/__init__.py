"""``sdserve drill``: load a service through restarts, reloads and faults; count every failure.

Programmatic use::

    from sdserve.drill import Action, DrillSpec, Schedule, Target, command, run_drill

    spec = DrillSpec(targets=(Target("http://127.0.0.1:8080/"),), duration=30, rate=2000)
    restart = Action("restart", command("systemctl restart {unit}", {"unit": "demo"}),
                     Schedule(times=5, every=5, start=2))
    result = await run_drill(spec, [restart])
    print(render_text(result))

On the command line (inside a systemd test bed, run it where the service's loopback
is, e.g. through ``nsenter``)::

    sdserve drill 9=http://127.0.0.1:8080/ 1=http://127.0.0.1:8080/slow?ms=50 \
        --rate 1000 --keepalive 0.5 --ws-url ws://127.0.0.1:8080/ws --ws-clients 8 \
        --duration 60 --unit demo.service \
        --action 'reload times=10 every=2 at=4' --action 'restart times=10 every=3 at=26' \
        --json drill.json --html drill.html

The load runs in ``--processes`` child processes (:mod:`sdserve.drill.loadgen`, with
uvloop); the parent performs the actions, samples the target's process tree from
/proc (``--unit`` reads MainPID through ``systemctl show``) and collects every request.

An action is any async callable (see :mod:`sdserve.drill.actions`).  Every request
ends in exactly one class (:mod:`sdserve.drill.outcome`); the JSON output follows
the versioned schema in :mod:`sdserve.drill.schema`.
"""

from __future__ import annotations

from sdserve.drill.actions import (
    Action,
    ActionError,
    ActionRecord,
    Schedule,
    command,
    const_pid,
    kill_worker,
    pid_from_command,
    pid_from_file,
    send_signal,
)
from sdserve.drill.result import DrillResult
from sdserve.drill.runner import DrillError, Progress, run_drill
from sdserve.drill.spec import DrillSpec, Target

__all__ = [
    "Action",
    "ActionError",
    "ActionRecord",
    "DrillError",
    "DrillResult",
    "DrillSpec",
    "Progress",
    "Schedule",
    "Target",
    "command",
    "const_pid",
    "kill_worker",
    "pid_from_command",
    "pid_from_file",
    "run_drill",
    "send_signal",
]
