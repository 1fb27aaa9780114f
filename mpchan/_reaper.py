"""The program's reaper: removes shared memory nobody holds any more (layer 1).

Started once per program by the root process (``python -m mpchan._reaper
TOKEN ROOT_PID``) in its own session, so a terminal Ctrl-C does not reach
it. It watches the root with a pidfd (polling where there is none):

    while the root lives:   every 2 s, unlink channel segments of the
                            session whose holders are all dead
    once the root is gone:  every 50 ms, unlink segments whose holders are
                            all dead (workers exit within 1 s of the root);
                            after 2 s unlink everything of the session left

Invariants:
    - it only ever touches files named ``mpchan-<TOKEN>-*``.
    - it never kills a process: workers watch their supervisor themselves.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

from . import _core
from ._compat import SHM_DIR

_SCAN_ALIVE = 2.0
_SCAN_AFTER = 0.05
_FORCE_AFTER = 2.0


def _channel_files(prefix: str) -> list[str]:
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return [e for e in entries if e.startswith(prefix)]


def _live_holders(path: str) -> int | None:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        chan = _core.Chan(fd, size)
    except (ValueError, OSError):
        return None  # not initialised yet, or not ours
    finally:
        os.close(fd)
    try:
        return int(chan.live_holders())
    finally:
        chan.unmap()


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def gc_pass(token: str, force: bool = False) -> int:
    """Unlink dead channels (all when ``force``); return how many files remain."""
    prefix = f"mpchan-{token}-"
    files = _channel_files(prefix)
    channels = {f for f in files if "-" not in f[len(prefix) :]}
    for name in channels:
        path = os.path.join(SHM_DIR, name)
        if force or _live_holders(path) == 0:
            _unlink(path)
    left = set(_channel_files(prefix))
    for name in list(left):
        # payload files whose channel is gone go with it
        chan_name = name[: name.find("-", len(prefix))] if "-" in name[len(prefix) :] else name
        if force or (chan_name != name and chan_name not in left):
            _unlink(os.path.join(SHM_DIR, name))
            left.discard(name)
    return len(left)


def _wait_root(root: int, timeout: float, pidfd: int | None) -> bool:
    """Wait up to ``timeout`` for the root to exit; True once it has."""
    if pidfd is not None:
        r, _, _ = select.select([pidfd], [], [], timeout)
        return bool(r)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(root, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        time.sleep(0.1)
    return False


def main(argv: list[str]) -> int:
    token, root = argv[0], int(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = False

    def _on_term(_signo: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _on_term)
    pidfd: int | None
    try:
        pidfd = os.pidfd_open(root)
    except (AttributeError, OSError):
        pidfd = None
    while not stop and not _wait_root(root, _SCAN_ALIVE, pidfd):
        gc_pass(token)
    # the root is gone (or asked us to finish): wait briefly for holders to die
    try:
        end = time.monotonic() + _FORCE_AFTER
        while time.monotonic() < end:
            if gc_pass(token) == 0:
                return 0
            time.sleep(_SCAN_AFTER)
        gc_pass(token, force=True)
        return 0
    finally:
        _unlink(os.path.join(SHM_DIR, f".mpchan-{token}-reaper"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
