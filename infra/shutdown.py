"""A process-wide stop request: SIGTERM / SIGINT (what Prefect, systemd and Kubernetes send)
ask the work to stop; loops check `requested()` between units of work and stop submitting,
long I/O loops check it between chunks. Committed work stands; nothing half-written is
visible (the store's writes are atomic), and temp folders are removed by their `with` blocks
as the stop unwinds."""

from __future__ import annotations

import os
import signal
import threading

_STOP = threading.Event()
_SIGNAL: list[int] = []  # the signal that asked, if one did


class ShutdownRequested(RuntimeError):
    """The process was asked to stop (SIGTERM/SIGINT) before this work finished."""


def request() -> None:
    _STOP.set()


def requested() -> bool:
    return _STOP.is_set()


def raise_if_requested(what: str = "stopped") -> None:
    if _STOP.is_set():
        raise ShutdownRequested(f"{what}: the process was asked to stop (SIGTERM/SIGINT)")


def wait(seconds: float) -> bool:
    """Sleep up to `seconds`, waking early on a stop request; True if one was made."""
    return _STOP.wait(max(seconds, 0.0))


def exit_code() -> int:
    """The shell's code for death by the signal that asked (143 SIGTERM, 130 SIGINT)."""
    return 128 + (_SIGNAL[0] if _SIGNAL else signal.SIGTERM)


def signal_name() -> str:
    return signal.Signals(_SIGNAL[0]).name if _SIGNAL else "stop requested"


def reset() -> None:
    """Forget a request (tests; a long-lived process that handled one)."""
    _STOP.clear()
    _SIGNAL.clear()


_INSTALLED: list[bool] = []
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def handle(signum: int, frame=None) -> None:
    """First SIGTERM/SIGINT: a stop request. A second: die by it at once (the default action),
    whatever the work is blocked in."""
    if _SIGNAL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _SIGNAL[:] = [signum]
    _STOP.set()


def install() -> None:
    """Turn SIGTERM and SIGINT into a stop request (first signal) and death by the signal (a
    second one). Call from the main thread."""
    _INSTALLED[:] = [True]
    for sig in _SIGNALS:
        signal.signal(sig, handle)


def rearm() -> None:
    """Put the handlers back where install() set them and a library has since replaced them.
    Prefect's flow engine swaps in its own SIGTERM handler for each flow run, which raises in
    the main thread and then waits for the running items (a download would run on to its
    deadline); a stage calls this as it starts. No-op without install() or off the main thread."""
    if _INSTALLED and threading.current_thread() is threading.main_thread():
        for sig in _SIGNALS:
            if signal.getsignal(sig) is not handle:
                signal.signal(sig, handle)
