"""A program that is made to die with busy and blocked goroutines running.

Usage: python kill_target.py START_METHOD MODE

It starts two CPU-bound and two blocked goroutines, waits until all four are
running, prints one JSON line ``{"pids": [...]}`` and then, by MODE:

- ``wait``: blocks, to be killed from outside (SIGKILL, SIGTERM) or
  interrupted (SIGINT to its process group);
- ``raise``: dies of an unhandled exception;
- ``exit``: calls ``sys.exit(3)``.

The test then checks that none of the printed pids outlives it.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import cloudpickle
import gate

from mpchan import _go, _supervisor

cloudpickle.register_pickle_by_value(gate)


def main() -> None:
    method, mode = sys.argv[1], sys.argv[2]
    _supervisor.set_supervisor(_supervisor.Supervisor(method))
    g = gate.Gate()
    atexit.register(g.unlink)
    handles = [_go.go(gate.check_in_and_spin, g.path) for _ in range(2)]
    handles += [_go.go(gate.check_in_and_wait, g.path) for _ in range(2)]
    g.wait_checkins(len(handles), timeout=30)
    print(json.dumps({"pids": [h.pid for h in handles], "gate": g.path}), flush=True)
    if mode == "raise":
        raise RuntimeError("the program dies of an unhandled exception")
    if mode == "exit":
        sys.exit(3)
    threading.Event().wait()


if __name__ == "__main__":
    main()
