"""A rendezvous over a unix socket, for tests and the kill-test scripts.

Goroutines check in (connect and send their pid), then block until the gate
opens (the test closes their connection) or spin. The test waits for the
check-ins with a timeout instead of sleeping.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import tempfile
import time

_PID_FORMAT = "!q"  # a format string, not a Struct: pickled by value into workers
_PID_SIZE = struct.calcsize(_PID_FORMAT)


class Gate:
    """The test's side: a listening unix socket at ``self.path``."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="mpchan-gate-")
        self.path = os.path.join(self._dir, "gate.sock")
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(128)
        self._conns: list[socket.socket] = []

    def wait_checkins(self, n: int, timeout: float) -> list[int]:
        """Accept ``n`` check-ins within ``timeout`` seconds; return their pids."""
        deadline = time.monotonic() + timeout
        pids = []
        for _ in range(n):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"only {len(pids)} of {n} checked in within {timeout} s")
            self._server.settimeout(left)
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                raise TimeoutError(
                    f"only {len(pids)} of {n} checked in within {timeout} s"
                ) from None
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            data = b""
            while len(data) < _PID_SIZE:
                chunk = conn.recv(_PID_SIZE - len(data))
                if not chunk:
                    break
                data += chunk
            conn.settimeout(None)
            self._conns.append(conn)
            pids.append(struct.unpack(_PID_FORMAT, data)[0])
        return pids

    def open(self) -> None:
        """Release every goroutine blocked in :func:`check_in_and_wait`."""
        for conn in self._conns:
            conn.close()
        self._conns.clear()

    def close(self) -> None:
        """Open the gate, stop listening and remove the socket file."""
        self.open()
        self._server.close()
        self.unlink()

    def unlink(self) -> None:
        """Remove the socket file (connections already made stay open)."""
        remove_socket(self.path)


def remove_socket(path: str) -> None:
    """Remove a gate's socket file and its directory, if still there."""
    for remove, target in ((os.unlink, path), (os.rmdir, os.path.dirname(path))):
        with contextlib.suppress(OSError):
            remove(target)


def _check_in(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(struct.pack(_PID_FORMAT, os.getpid()))
    return sock


def check_in_and_wait(path: str) -> int:
    """Check in at the gate, block until it opens, return this pid."""
    sock = _check_in(path)
    try:
        while sock.recv(1):
            pass
    finally:
        sock.close()
    return os.getpid()


def check_in_and_spin(path: str) -> None:
    """Check in at the gate, then burn CPU forever."""
    _check_in(path)
    n = 0
    while True:
        n += 1
