"""The job watchdog in a child process: soft limit, cancel, and the hard stop."""

from __future__ import annotations

import multiprocessing as mp
import signal
import time

from maas_worker.worker.watchdog import EXIT_CODE, JobInterrupted, Watchdog

CTX = mp.get_context("fork")


def _soft(conn) -> None:  # type: ignore[no-untyped-def]
    dog = Watchdog()
    t0 = time.monotonic()
    try:
        with dog.running(
            "j",
            soft_limit_s=0.3,
            hard_limit_s=10,
            is_cancelled=lambda: False,
            on_hard=lambda r: None,
        ):
            time.sleep(30)
        conn.send(("finished", 0.0))
    except JobInterrupted as exc:
        conn.send((exc.reason, time.monotonic() - t0))


def _cancel(conn) -> None:  # type: ignore[no-untyped-def]
    dog = Watchdog()
    asked = time.monotonic() + 0.5
    try:
        with dog.running(
            "j",
            soft_limit_s=30,
            hard_limit_s=60,
            is_cancelled=lambda: time.monotonic() > asked,
            on_hard=lambda r: None,
        ):
            time.sleep(30)
        conn.send("finished")
    except JobInterrupted as exc:
        conn.send(exc.reason)


def _stubborn(conn) -> None:  # type: ignore[no-untyped-def]
    dog = Watchdog()
    # A job that cannot be interrupted (signal blocked, like a long C call).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    with dog.running(
        "j", soft_limit_s=0.2, hard_limit_s=0.6, is_cancelled=lambda: False, on_hard=conn.send
    ):
        time.sleep(30)
    conn.send("finished")


def _run(target) -> tuple[mp.Process, object]:  # type: ignore[no-untyped-def]
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=target, args=(child,))
    proc.start()
    assert parent.poll(20), "no answer from the child"
    answer = parent.recv()
    proc.join(20)
    return proc, answer


def test_soft_limit_interrupts_a_sleeping_job() -> None:
    proc, (reason, elapsed) = _run(_soft)
    assert reason == "timeout"
    assert elapsed < 5
    assert proc.exitcode == 0


def test_cancel_interrupts_the_job() -> None:
    proc, answer = _run(_cancel)
    assert answer == "cancelled"
    assert proc.exitcode == 0


def test_a_job_that_ignores_the_interrupt_ends_its_process_at_the_hard_limit() -> None:
    proc, answer = _run(_stubborn)
    assert answer == "timeout"  # the result was stored (on_hard) before the exit
    assert proc.exitcode == EXIT_CODE


def test_watchdog_made_outside_the_main_thread_cannot_interrupt() -> None:
    import threading

    made: list[Watchdog] = []
    t = threading.Thread(target=lambda: made.append(Watchdog()))
    t.start()
    t.join()
    assert made and not made[0].interruptible


def _threaded_hard(conn) -> None:  # type: ignore[no-untyped-def]
    import threading

    dog = Watchdog()

    def job() -> None:
        with dog.running(
            "j", soft_limit_s=0.2, hard_limit_s=0.6, is_cancelled=lambda: False, on_hard=conn.send
        ):
            time.sleep(30)  # a worker thread: no signal reaches it

    threading.Thread(target=job, daemon=True).start()
    time.sleep(30)


def test_hard_limit_applies_to_jobs_in_worker_threads() -> None:
    proc, answer = _run(_threaded_hard)
    assert answer == "timeout"
    assert proc.exitcode == EXIT_CODE
