"""Process-lifetime hooks, run in one declared order (layer 0).

A module that must act when the program exits, or in the child of a
``fork``, registers a named hook here on first use (when it first makes
what the hook cleans up) -- not at import. This module installs one
``atexit`` handler and one ``os.register_at_fork`` child hook, the first
time a hook of that kind is registered, and runs the hooks in the order the
tables below declare, whatever the order the modules were imported or first
used in::

    at exit:          pool -> stream -> supervisor -> shm
                      (pools finish or cancel their tasks while workers
                      still run; the supervisor then stops every process;
                      segments are unlinked last, when nobody maps them)
                      -> multiprocessing's own exit hook
                      (it joins every non-daemon child: run before the
                      supervisor, it would wait forever for idle workers)
    in a fork child:  wake -> shm -> supervisor -> metrics
                      (the parent's sockets, segments, processes and server
                      belong to the parent: forget them, lowest layer first;
                      no hook depends on another having run)

Where each hook is registered (on first use unless said otherwise):

    exit  pool        the first Pool (_pool)
          stream      declared for pipelines (_stream)
          supervisor  the first Supervisor (_supervisor)
          shm         the first session token or segment of this process (_shm)
    fork  wake        at import: its thread-local waiters exist from then (_wake)
          shm         with shm's exit hook
          supervisor  at import: the program-supervisor lock and
                      multiprocessing's forkserver state exist from then
          metrics     the first use of the metrics registry or server (_metrics)

Invariants:
    - every hook name is declared in a table below (an undeclared name is a
      programming error, raised at registration);
    - each hook runs at most once per exit and once per fork, and one that
      raises does not stop the others (the error is written to stderr, as
      ``atexit`` does);
    - registering the same name again replaces its function (a module that
      is re-imported in a test does not run twice);
    - the ``atexit`` handler is registered after multiprocessing's own exit
      hook (``on_exit`` imports ``multiprocessing.util`` first), so it runs
      before it (``atexit`` is last in, first out).

Ownership: the tables and the two installed handlers belong to this module;
a hook's function belongs to its module.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import traceback
from collections.abc import Callable

__all__ = ["EXIT_ORDER", "FORK_ORDER", "on_exit", "on_fork_child"]

EXIT_ORDER: tuple[str, ...] = ("pool", "stream", "supervisor", "shm")
"""At-exit hooks, in the order they run."""

FORK_ORDER: tuple[str, ...] = ("wake", "shm", "supervisor", "metrics")
"""Hooks run in the child after ``fork``, in the order they run."""

_exit_hooks: dict[str, Callable[[], None]] = {}
_fork_hooks: dict[str, Callable[[], None]] = {}
_lock = threading.Lock()
_exit_installed = False
_fork_installed = False


def on_exit(name: str, fn: Callable[[], None]) -> None:
    """Run ``fn`` when the program exits, at ``name``'s place in :data:`EXIT_ORDER`.

    Never blocks (but for a lock held only while registering).
    Process safety: any thread; hooks registered in a parent are inherited
    by a forked child, as ``atexit`` handlers are.
    """
    global _exit_installed
    if name not in EXIT_ORDER:
        raise ValueError(f"undeclared exit hook {name!r} (declare it in EXIT_ORDER)")
    if not _exit_installed:
        # Registers multiprocessing's exit hook (if nothing did yet) before
        # ours, so that ours runs first: see the Invariants.
        import multiprocessing.util  # noqa: F401
    with _lock:
        _exit_hooks[name] = fn
        if not _exit_installed:
            atexit.register(_run_exit)
            _exit_installed = True


def on_fork_child(name: str, fn: Callable[[], None]) -> None:
    """Run ``fn`` in the child after every ``fork``, at ``name``'s place in
    :data:`FORK_ORDER`.

    Never blocks (but for a lock held only while registering).
    Process safety: any thread.
    """
    global _fork_installed
    if name not in FORK_ORDER:
        raise ValueError(f"undeclared fork hook {name!r} (declare it in FORK_ORDER)")
    with _lock:
        _fork_hooks[name] = fn
        if not _fork_installed:
            os.register_at_fork(after_in_child=_run_fork)
            _fork_installed = True


def _run(order: tuple[str, ...], hooks: dict[str, Callable[[], None]]) -> None:
    for name in order:
        fn = hooks.get(name)
        if fn is None:
            continue
        try:
            fn()
        except BaseException:  # as atexit does: report, and run the rest
            traceback.print_exc(file=sys.stderr)


def _run_exit() -> None:
    _run(EXIT_ORDER, _exit_hooks)


def _run_fork() -> None:
    global _lock
    _lock = threading.Lock()  # a thread of the parent may have held it
    _run(FORK_ORDER, _fork_hooks)
