"""Platform and version shims (layer 0).

Linux is first-class; other POSIX systems (macOS) get portable fallbacks.
Nothing here blocks or has side effects at import time beyond reading
``sys.platform``.
"""

from __future__ import annotations

import sys
import tempfile

__all__ = ["IS_LINUX", "IS_MACOS", "SHM_DIR", "default_start_method"]

IS_LINUX: bool = sys.platform.startswith("linux")
IS_MACOS: bool = sys.platform == "darwin"

# Where named shared-memory segments live as files. On Linux POSIX shared
# memory is a tmpfs at /dev/shm; elsewhere segments are file-backed in the
# temporary directory.
SHM_DIR: str = "/dev/shm" if IS_LINUX else tempfile.gettempdir()


def default_start_method() -> str:
    """Return the multiprocessing start method mpchan uses when none is given.

    ``"forkserver"`` on Linux (cheap starts without forking a threaded parent),
    ``"spawn"`` elsewhere. Never blocks.
    """
    return "forkserver" if IS_LINUX else "spawn"
