"""The supervisor's state machine (sdserve.lifecycle), driven without processes.

Each test names the case of issue 10 it guards where there is one. The randomized test at the
end throws seeded random events at the core and checks the invariants of the docstring after
every step; the process-level interleaving test (test_interleaving.py) does the same with real
processes.
"""

from __future__ import annotations

import random
import signal

import pytest

from sdserve import lifecycle as lc
from sdserve.appload import StartFailure
from sdserve.exitcodes import ExitCode
from tests.lifecycle_driver import Driver, config

TERM, USR2, QUIT, KILL = signal.SIGTERM, signal.SIGUSR2, signal.SIGQUIT, signal.SIGKILL


def started(**overrides: object) -> Driver:
    d = Driver(config(**overrides))
    d.start()
    assert d.phase() is lc.Phase.RUNNING
    return d


def test_ready_only_once_every_worker_of_generation_1_is_ready() -> None:
    d = Driver(config(workers=3))
    d.feed(lc.Start())
    assert d.workers(lc.WState.STARTING) == [1, 2, 3]
    d.feed(lc.Ready(1))
    d.feed(lc.Ready(2))
    assert "ready" not in d.kinds()
    d.feed(lc.Ready(3))
    assert d.kinds() == ["ready"]
    assert d.notes[-1].text == "generation 1: 3/3 workers ready"


def test_every_event_is_handled_in_every_phase() -> None:
    """No phase lacks a handler for an event: each is fed to a core in each phase."""
    events: list[lc.Event] = [
        lc.StopAsked("SIGTERM"),
        lc.ForceAsked("SIGQUIT"),
        lc.ReloadAsked(7, "test"),
        lc.ConfigLoaded(config()),
        lc.ConfigRejected("bad"),
        lc.Ready(1),
        lc.Status(1, "x"),
        lc.Extend(1, 5),
        lc.Ping(1),
        lc.RecycleAsked(1),
        lc.StartFailedReport(1, StartFailure("boom")),
        lc.Exited(1, 3),
        lc.TimerFired(("start", 1)),
        lc.TimerFired(("kill", 1)),
        lc.TimerFired(("watchdog", 1)),
        lc.TimerFired(("abort", 1)),
        lc.TimerFired(("proven", 1)),
        lc.TimerFired(("respawn", 1, 0)),
        lc.Spawned(99, 1),
        lc.SpawnFailed(99, "no"),
    ]
    reached = set()
    for setup in PHASE_SETUPS:
        for event in events:
            d = setup()
            reached.add(d.phase())
            d.feed(event)  # must not raise
    assert reached == set(lc.Phase) - {lc.Phase.DONE}


def _warming() -> Driver:
    d = started()
    d.feed(lc.ReloadAsked(None, "SIGHUP"))
    return d


def _switching() -> Driver:
    d = _warming()
    d.ready_all(2)
    return d


def _aborting() -> Driver:
    d = started(warmup_parallel=0)
    d.feed(lc.ReloadAsked(None, "SIGHUP"))
    d.feed(lc.Ready(3))
    d.feed(lc.Exited(4, ExitCode.STARTUP))
    return d


def _stopping() -> Driver:
    d = started()
    d.feed(lc.StopAsked("SIGTERM"))
    return d


def _forcing() -> Driver:
    d = _stopping()
    d.feed(lc.StopAsked("SIGTERM"))
    return d


def _starting() -> Driver:
    d = Driver(config())
    d.feed(lc.Start())
    return d


PHASE_SETUPS = [
    _starting,
    started,
    _warming,
    _switching,
    _aborting,
    _stopping,
    _forcing,
]


# -- case 1: SIGTERM during a reload ----------------------------------------------------------


def test_stop_during_switch_drains_what_drains_and_signals_nothing_twice() -> None:
    d = _switching()
    assert d.phase() is lc.Phase.SWITCHING
    assert d.signalled(1) == [USR2]
    assert d.signalled(2) == [USR2]
    d.feed(lc.StopAsked("SIGTERM"))
    assert d.phase() is lc.Phase.STOPPING
    # the old workers already drain: a second SIGTERM would make them exit at once
    assert d.signalled(1) == [USR2]
    assert d.signalled(2) == [USR2]
    assert d.signalled(3) == [TERM]
    assert d.signalled(4) == [TERM]
    assert d.kinds()[-1] == "stopping"
    d.exit_all(0)
    assert d.exit_code == 0


def test_stop_during_warm_up_stops_the_new_workers_and_loses_nothing() -> None:
    d = _warming()
    assert d.workers(lc.WState.STARTING) == [3]
    d.feed(lc.StopAsked("SIGTERM"))
    assert d.signalled(3) == [TERM]
    assert d.signalled(1) == [TERM]
    assert "ready" not in d.kinds()[1:]  # RELOADING=1 is answered by STOPPING=1, not READY=1
    d.exit_all(0)
    assert d.exit_code == 0


def test_exit_status_says_a_drain_of_the_stop_lost_requests() -> None:
    d = _switching()
    d.feed(lc.StopAsked("SIGTERM"))
    d.feed(lc.Exited(1, ExitCode.DRAIN_TIMEOUT))  # a retiring one cancelled requests
    for wid in (2, 3, 4):
        d.feed(lc.Exited(wid, 0))
    assert d.exit_code == ExitCode.DRAIN_TIMEOUT


def test_a_worker_killed_at_the_kill_deadline_makes_the_exit_status_4() -> None:
    d = started()
    d.feed(lc.StopAsked("SIGTERM"))
    d.advance(d.cfg.stop_budget + lc.KILL_MARGIN + 0.1)
    assert d.signalled(1)[-1] == KILL
    d.kill(1)
    d.feed(lc.Exited(2, 0))
    assert d.exit_code == ExitCode.DRAIN_TIMEOUT


def test_second_stop_signal_forces_and_exits_5() -> None:
    d = _stopping()
    d.feed(lc.StopAsked("SIGINT"))
    assert d.signalled(1) == [TERM, QUIT]
    d.exit_all(ExitCode.FORCED)
    assert d.exit_code == ExitCode.FORCED


def test_stop_during_start_up_stops_promptly() -> None:
    d = Driver(config())
    d.feed(lc.Start())
    d.feed(lc.StopAsked("SIGTERM"))
    assert d.signalled(1) == [TERM]
    assert d.signalled(2) == [TERM]
    assert "ready" not in d.kinds()
    d.exit_all(0)
    assert d.exit_code == 0


def test_reload_during_reload_is_queued_once_and_both_waiters_get_the_next_one() -> None:
    d = _warming()
    d.feed(lc.ReloadAsked(1, "sdserve reload"))
    d.feed(lc.ReloadAsked(2, "sdserve reload"))
    d.ready_all(2)
    for wid in (1, 2):  # the old generation drains and exits
        d.feed(lc.Exited(wid, 0))
    # the first reload is done; the queued one begins at once
    assert d.kinds() == ["ready", "reloading", "ready", "reloading"]
    assert d.replies == []
    d.ready_all(3)
    for wid in d.workers(generation=2):
        d.feed(lc.Exited(wid, 0))
    assert [(r.waiter, r.verdict) for r in d.replies] == [(1, "ok"), (2, "ok")]
    assert d.kinds() == ["ready", "reloading", "ready", "reloading", "ready"]


def test_reload_while_starting_runs_once_started() -> None:
    d = Driver(config())
    d.feed(lc.Start())
    d.feed(lc.ReloadAsked(None, "SIGHUP"))
    d.ready_all(1)
    assert d.kinds() == ["ready", "reloading"]


def test_reload_while_stopping_is_refused() -> None:
    d = _stopping()
    d.feed(lc.ReloadAsked(5, "sdserve reload"))
    assert d.replies == [lc.Reply(5, "refused", "the service is stopping")]
    assert "reloading" not in d.kinds()


# -- case 3, 4, 5: crashes ----------------------------------------------------------------


def test_failing_replacement_never_stops_a_service_that_serves() -> None:
    d = started(crash_limit=3)
    d.advance(d.cfg.crash_window + 1)  # both workers have served: proven
    d.kill(1)
    for _ in range(10):  # ten failed replacements in a row
        d.advance(lc.RESPAWN_BACKOFF_MAX)
        (new,) = d.workers(lc.WState.STARTING)
        d.feed(lc.Exited(new, ExitCode.STARTUP))
    assert d.exit_code is None
    assert d.phase() is lc.Phase.RUNNING
    assert "degraded: 10 failed start(s) in a row" in d.notes[-1].text
    # a replacement that starts brings the count back
    d.advance(lc.RESPAWN_BACKOFF_MAX)
    d.ready_all()
    assert d.notes[-1].text.startswith("generation 1: 2/2 workers ready")
    d.advance(d.cfg.crash_window + 1)
    assert d.core.generations[1].failed_starts == 0


def test_simultaneous_deaths_of_serving_workers_are_replaced_not_a_crash_loop() -> None:
    d = started(crash_limit=2, workers=4)
    d.advance(d.cfg.crash_window + 1)
    for _ in range(3):  # three rounds of all four at once (twelve deaths)
        for wid in d.workers():
            d.kill(wid)
        d.advance(lc.RESPAWN_BACKOFF)
        d.ready_all()
        d.advance(d.cfg.crash_window + 1)
    assert d.exit_code is None
    assert len(d.workers(lc.WState.READY)) == 4


def test_crash_loop_exits_6_once_no_worker_serves() -> None:
    d = started(workers=1, crash_limit=3)
    for _ in range(2):  # the worker, then each replacement, dies right after it is ready
        (wid,) = d.workers()
        d.kill(wid)
        d.advance(lc.RESPAWN_BACKOFF_MAX)
        d.ready_all()
    assert d.exit_code is None
    (wid,) = d.workers()
    d.kill(wid)
    assert d.phase() is lc.Phase.DONE
    assert d.exit_code == ExitCode.CRASH_LOOP
    assert "crash loop: 3 failed starts in a row" in d.notes[-1].text


def test_a_failed_start_in_generation_1_fails_the_start_with_status_3() -> None:
    d = Driver(config())
    d.feed(lc.Start())
    d.feed(lc.Ready(1))
    d.feed(lc.StartFailedReport(2, StartFailure("db down", "Traceback...", "app.py", 3)))
    d.feed(lc.Exited(2, ExitCode.STARTUP))
    assert d.signalled(1) == [TERM]
    d.feed(lc.Exited(1, 0))
    assert d.exit_code == ExitCode.STARTUP
    assert "ready" not in d.kinds()


def test_crashes_during_start_up_are_retried_then_fail_with_3() -> None:
    d = Driver(config(workers=1, crash_limit=2))
    d.feed(lc.Start())
    d.kill(1)  # a signal, not the worker's own verdict: retried
    assert d.exit_code is None
    d.advance(lc.RESPAWN_BACKOFF_MAX)
    (wid,) = d.workers()
    d.kill(wid)
    assert d.exit_code == ExitCode.STARTUP


def test_replacements_get_the_generations_config_not_a_new_one() -> None:
    d = started()
    d.reload_config = "the file is half written"  # what a re-read would find
    d.advance(d.cfg.crash_window + 1)
    d.kill(1)
    d.advance(lc.RESPAWN_BACKOFF)
    (spawn,) = [a for a in d.actions if isinstance(a, lc.Spawn) and a.worker == 3]
    assert spawn.config is d.cfg
    assert not any(isinstance(a, lc.LoadConfig) for a in d.actions)


def test_the_start_failure_traceback_is_logged_once_per_generation() -> None:
    d = Driver(config(workers=3))
    d.feed(lc.Start())
    for wid in (1, 2, 3):
        d.feed(lc.StartFailedReport(wid, StartFailure("boom", "Traceback (most recent...)")))
    full = [a for a in d.actions if isinstance(a, lc.Log) and "Traceback" in a.message]
    assert len(full) == 1


def test_a_worker_failing_as_the_first_did_says_so_after_the_first_has_exited() -> None:
    """The first failed worker's exit can come before the next one's report (the CI
    failure of test_probes' "reported once" test): the next still says "the same
    reason", and a different reason is given in full."""
    d = Driver(config(workers=3))
    d.feed(lc.Start())
    d.feed(lc.StartFailedReport(1, StartFailure("db down")))
    d.kill(1)
    d.feed(lc.StartFailedReport(2, StartFailure("db down")))
    d.feed(lc.StartFailedReport(3, StartFailure("cache down")))
    said = [a.message for a in d.actions if isinstance(a, lc.Log) and "to start" in a.message]
    assert said[0].endswith("failed to start: db down")
    assert said[1].endswith("failed to start too (the same reason)")
    assert said[2].endswith("failed to start too: cache down")


# -- case 6, 7, 8, 9, 10: reloads ----------------------------------------------------------


def test_new_worker_that_dies_after_ready_during_a_reload_is_replaced_in_its_generation() -> None:
    d = _warming()
    d.feed(lc.Ready(3))
    assert d.workers(lc.WState.STARTING, 2) == [4]
    d.kill(3)
    d.advance(lc.RESPAWN_BACKOFF * 2)
    assert d.workers(lc.WState.STARTING, 2) == [4, 5]
    d.ready_all(2)
    assert d.phase() is lc.Phase.SWITCHING
    assert len(d.workers(lc.WState.READY, 2)) == 2


def test_old_generation_crash_during_reload_is_replaced_in_the_old_generation() -> None:
    d = _warming()
    d.advance(d.cfg.crash_window + 1)
    d.kill(1)
    d.advance(lc.RESPAWN_BACKOFF)
    assert d.workers(lc.WState.STARTING, 1) == [4]


def test_watchdog_is_armed_only_once_a_worker_is_ready() -> None:
    d = Driver(config(), watchdog=2.0)
    d.feed(lc.Start())
    d.feed(lc.Ping(1))
    assert ("watchdog", 1) not in d.timers
    d.advance(10)  # a long import: no abort
    assert d.signalled(1) == []
    d.feed(lc.Ready(1))
    assert ("watchdog", 1) in d.timers
    d.feed(lc.Ready(2))
    d.advance(2.1)
    assert d.signalled(1) == [signal.SIGABRT]
    d.advance(lc.ABORT_GRACE)
    assert d.signalled(1) == [signal.SIGABRT, KILL]


def test_reload_timeout_bounds_each_new_worker_and_systemd_hears_of_progress() -> None:
    d = started(workers=4, reload_timeout=3.0, warmup_parallel=1)
    d.feed(lc.ReloadAsked(None, "SIGHUP"))
    for _ in range(4):  # four workers, 2.5 s each: 10 s in all, each within its 3 s
        d.advance(2.5)
        d.ready_all(2)
    assert d.phase() is lc.Phase.SWITCHING
    extends = [n for n in d.notes if n.kind == "extend"]
    assert len(extends) >= 4


def test_reload_timeout_message_names_the_timeout() -> None:
    d = started(reload_timeout=3.0)
    d.feed(lc.ReloadAsked(9, "sdserve reload"))
    d.advance(3.1)
    (w,) = d.workers(lc.WState.STARTING, 2)
    assert d.signalled(w) == [KILL]
    d.kill(w)
    assert d.phase() is lc.Phase.RUNNING
    (reply,) = d.replies
    assert reply.verdict == "failed"
    assert "was not ready within reload_timeout (3s)" in reply.text


def test_reload_retires_old_workers_without_the_drain_delay() -> None:
    d = started(drain_delay=5.0)
    d.feed(lc.ReloadAsked(None, "SIGHUP"))
    d.ready_all(2)
    assert d.signalled(1) == [USR2]
    assert d.signalled(2) == [USR2]


def test_failed_reload_answers_failed_and_returns_to_running() -> None:
    d = started(warmup_parallel=0)
    d.feed(lc.ReloadAsked(1, "sdserve reload"))
    d.feed(lc.Ready(3))
    d.feed(lc.StartFailedReport(4, StartFailure("syntax error in relapp.py")))
    d.feed(lc.Exited(4, ExitCode.STARTUP))
    assert d.phase() is lc.Phase.ABORTING
    assert d.signalled(3) == [USR2]  # it served: it drains
    assert d.signalled(1) == []  # the old generation never stopped
    assert d.replies == []
    d.feed(lc.Exited(3, 0))
    assert d.phase() is lc.Phase.RUNNING
    (reply,) = d.replies
    assert reply.verdict == "failed"
    assert "syntax error in relapp.py" in reply.text
    assert d.kinds() == ["ready", "reloading", "ready"]  # systemd back to running


def test_invalid_new_config_fails_the_reload() -> None:
    d = started()
    d.reload_config = "invalid configuration (1 problem(s))"
    d.feed(lc.ReloadAsked(1, "sdserve reload"))
    assert d.replies[0].verdict == "failed"
    assert "the new configuration is invalid" in d.replies[0].text
    assert d.workers() == [1, 2]


# -- recycling ---------------------------------------------------------------------------


def test_recycle_starts_a_successor_and_retires_the_old_once_it_is_ready() -> None:
    d = started()
    d.feed(lc.RecycleAsked(1))
    assert d.workers(lc.WState.STARTING) == [3]
    d.feed(lc.Ready(3))
    assert d.signalled(1) == [USR2]
    d.feed(lc.Exited(1, 0))
    assert len(d.workers(lc.WState.READY)) == 2


def test_failed_recycle_keeps_the_old_worker_and_tries_again() -> None:
    d = started()
    d.feed(lc.RecycleAsked(1))
    d.feed(lc.Exited(3, ExitCode.STARTUP))
    assert d.signalled(1) == []
    d.advance(lc.RESPAWN_BACKOFF_MAX)
    assert d.workers(lc.WState.STARTING) == [4]


# -- randomized: the invariants hold whatever comes, in any order ---------------------------


def _check_notify_order(notes: list[lc.Notify]) -> None:
    state = "starting"
    for note in notes:
        if state == "stopped":
            assert note.kind == "status", notes
        elif note.kind == "stopping":
            state = "stopped"
        elif note.kind == "ready":
            assert state in ("starting", "reloading"), notes
            state = "running"
        elif note.kind == "reloading":
            assert state == "running", notes
            state = "reloading"


@pytest.mark.parametrize("seed", range(300))
def test_random_event_sequences_keep_the_invariants(seed: int) -> None:
    rng = random.Random(seed)
    d = Driver(config(workers=rng.choice([1, 2, 3]), crash_limit=rng.choice([1, 3, 5])))
    d.reload_config = rng.choice([None, d.cfg.with_overrides(workers=2)])
    d.feed(lc.Start())
    stop_sent = False
    asked: list[int] = []
    for _ in range(60):
        live = d.workers()
        roll = rng.random()
        if roll < 0.25 and live:
            d.feed(lc.Ready(rng.choice(live)))
        elif roll < 0.40 and live:
            wid = rng.choice(live)
            d.feed(lc.Exited(wid, rng.choice([0, 3, 4, -9, 70])))
        elif roll < 0.50:
            asked.append(len(asked) + 1)
            d.feed(lc.ReloadAsked(asked[-1], "fuzz"))
        elif roll < 0.55 and live:
            d.feed(lc.RecycleAsked(rng.choice(live)))
        elif roll < 0.60:
            stop_sent = True
            d.feed(lc.StopAsked("SIGTERM"))
        else:
            d.advance(rng.choice([0.05, 0.5, 3.0, 12.0]))
        _check_notify_order(d.notes)
        # a worker is told to stop or retire once; only a force (QUIT) or a kill follows
        for wid in {w for w, _ in d.signals}:
            told = [s for s in d.signalled(wid) if s in (TERM, USR2)]
            assert len(told) <= 1, (wid, d.signalled(wid))
        if d.exit_code is not None:
            break
    if d.exit_code is None:
        if not stop_sent:
            d.feed(lc.StopAsked("SIGTERM"))
        for _ in range(20):
            d.exit_all(0)
            d.advance(lc.RESPAWN_BACKOFF_MAX)
            if d.exit_code is not None:
                break
    assert d.exit_code is not None
    assert d.phase() is lc.Phase.DONE
    assert d.core.workers == {}
    _check_notify_order(d.notes)
    # every reload request got exactly one verdict
    assert sorted(r.waiter for r in d.replies) == asked
