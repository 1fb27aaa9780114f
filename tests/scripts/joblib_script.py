"""A user's script running joblib on the "mpchan" backend (``python joblib_script.py``).

Prints one JSON line: the results, the pids that ran them, the program's
session token and pids; the test checks that nothing of it is left after it ends.
"""

import json
import os

import joblib
import numpy as np

import mpchan
from mpchan import _joblib_hook

_joblib_hook.install()  # a no-op once mpchan's facade installs it itself


def square(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def total(a: np.ndarray, k: int) -> float:
    return float(a.sum()) * k


if __name__ == "__main__":
    from mpchan import _shm

    big = np.ones((512, 1024))  # 4 MiB: goes through shared memory
    with joblib.parallel_backend("mpchan", n_jobs=2):
        squares = joblib.Parallel()(joblib.delayed(square)(i) for i in range(20))
        sums = joblib.Parallel()(joblib.delayed(total)(big, k) for k in range(4))
    print(
        json.dumps(
            {
                "squares": [s for s, _ in squares],
                "pids": sorted({p for _, p in squares}),
                "sums": sums,
                "session": os.environ["MPCHAN_SESSION"].partition(":")[0],
                "reaper": _shm.reaper_pid(),
                "mpchan": mpchan.__name__,
            }
        ),
        flush=True,
    )
