"""The worker's signal table (sdserve.worker.SIGNAL_TABLE): every signal in every stage."""

from __future__ import annotations

import signal

from sdserve.worker import OS_SIGNALS, SIGNAL_TABLE, Do, Sig, Stage


def test_every_signal_has_a_reaction_in_every_stage() -> None:
    assert set(SIGNAL_TABLE) == {(stage, sig) for stage in Stage for sig in Sig}


def test_a_second_stop_always_exits_at_once_and_a_retire_never_does() -> None:
    for stage in Stage:
        if stage is not Stage.DONE:
            assert SIGNAL_TABLE[stage, Sig.STOP_AGAIN] is Do.FORCE
            assert SIGNAL_TABLE[stage, Sig.FORCE] is Do.FORCE
        assert SIGNAL_TABLE[stage, Sig.RETIRE] is not Do.FORCE


def test_a_stop_after_a_retire_only_turns_readiness_off() -> None:
    """Issue 10, case 1: a draining worker told to stop must finish its requests."""
    assert SIGNAL_TABLE[Stage.DRAINING, Sig.STOP] is Do.NOT_READY
    assert SIGNAL_TABLE[Stage.CLEANING, Sig.STOP] is Do.NOT_READY


def test_start_up_and_serving() -> None:
    assert SIGNAL_TABLE[Stage.STARTING, Sig.STOP] is Do.CANCEL_START
    assert SIGNAL_TABLE[Stage.STARTING, Sig.RETIRE] is Do.CANCEL_START
    assert SIGNAL_TABLE[Stage.SERVING, Sig.STOP] is Do.STOP
    assert SIGNAL_TABLE[Stage.SERVING, Sig.RETIRE] is Do.RETIRE
    assert SIGNAL_TABLE[Stage.DELAYING, Sig.RETIRE] is Do.END_DELAY


def test_sighup_never_stops_a_worker() -> None:
    """Issue 10, case 2: SIGHUP killed a single-process sdserve."""
    assert OS_SIGNALS[signal.SIGHUP] is Sig.RELOAD
    for stage in Stage:
        assert SIGNAL_TABLE[stage, Sig.RELOAD] in (Do.REFUSE_RELOAD, Do.IGNORE)


def test_the_os_signals() -> None:
    assert OS_SIGNALS == {
        signal.SIGTERM: Sig.STOP,
        signal.SIGINT: Sig.STOP,
        signal.SIGUSR2: Sig.RETIRE,
        signal.SIGQUIT: Sig.FORCE,
        signal.SIGHUP: Sig.RELOAD,
        signal.SIGUSR1: Sig.RESTART_HINT,  # from `sdserve stopping` (ExecStop=)
    }
    for stage in Stage:
        expected = Do.IGNORE if stage is Stage.DONE else Do.NOTE_RESTART
        assert SIGNAL_TABLE[stage, Sig.RESTART_HINT] is expected
