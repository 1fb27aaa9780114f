"""``mpchan.main``: run a program's main function with two-stage signals (layer 8).

    signal 1 (SIGINT or SIGTERM)   ctx.request_drain(): every stream (and
                                   pool) bound to ctx stops reading input,
                                   finishes what is in flight, delivers it
    signal 2, or grace expiry      cancel(ctx): every blocking call under ctx
                                   raises Cancelled; streams kill what is left

Exit status: 0 when ``fn`` returned, 1 when it raised, 128 + signal number
(130 SIGINT, 143 SIGTERM) once a signal arrived, however ``fn`` ended.
Worker processes ignore SIGINT, so one Ctrl-C in a terminal (which reaches
the whole process group) is handled here alone: no traceback from workers.
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from ._context import background, with_cancel
from ._errors import Cancelled

__all__ = ["main"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def main(fn: Callable[..., Any], *args: Any, grace: float | None = None) -> int:
    """Run ``fn(ctx, *args)`` as the program's main; return its exit status.

    The first SIGINT or SIGTERM requests a graceful drain on ``ctx``
    (``ctx.draining`` becomes True); a second one -- or ``grace`` seconds
    after the first -- cancels ``ctx``. An exception from ``fn`` is printed
    (traceback on stderr) and gives status 1, except ``Cancelled`` after a
    signal.

    Blocks: until ``fn`` returns. Cancellation: by signals, as above.
    Process safety: call from the main thread (signal handlers are installed
    there and restored on return).
    """
    if grace is not None and grace < 0:
        raise ValueError(f"grace must be >= 0, got {grace}")
    ctx, cancel = with_cancel(background())
    received: list[int] = []
    timer: list[threading.Timer] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        if len(received) == 1:
            ctx.request_drain()
            if grace is not None:
                t = threading.Timer(grace, cancel, args=(("grace",),))
                t.daemon = True
                timer.append(t)
                t.start()
        else:
            cancel(("signal", signum))

    in_main = threading.current_thread() is threading.main_thread()
    old: dict[signal.Signals, Any] = {}
    if in_main:
        for sig in _SIGNALS:
            old[sig] = signal.signal(sig, on_signal)
    status = 0
    try:
        fn(ctx, *args)
    except Cancelled:
        status = 1 if not received else 0
        if not received:
            traceback.print_exc()
    except KeyboardInterrupt:
        received.append(int(signal.SIGINT))
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        status = 1
    finally:
        for t in timer:
            t.cancel()
            t.join()
        cancel(None)
        for signum, handler in old.items():
            signal.signal(signum, handler)
    if received:
        return 128 + int(received[0])
    return status
