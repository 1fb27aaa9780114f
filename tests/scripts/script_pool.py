"""A user's script: its own functions run in a Pool (run as ``python script_pool.py METHOD``).

Prints one ``key value`` line per check; the test reads them.
"""

import os
import sys
import time

import mpchan

BIG = bytes(64 << 20)  # a module-level global: must not travel with each task
STATE: dict[str, str] = {}


def init(value: str) -> None:
    STATE["value"] = value


def read_state(_: object) -> str | None:
    return STATE.get("value")


def big_len(i: int) -> int:
    return len(BIG) + i


def fails(x: int) -> int:
    raise ValueError(f"bad input {x}")  # the line the remote traceback shows


class Scaler:
    def __init__(self, k: int) -> None:
        self.k = k

    def scale(self, x: int) -> int:
        return self.k * x

    @staticmethod
    def double(x: int) -> int:
        return 2 * x

    @classmethod
    def name(cls, _: object) -> str:
        return cls.__qualname__


def main(method: str) -> None:
    with mpchan.Pool(2, start_method=method, initializer=init, initargs=("ready",)) as pool:
        print("state", pool.submit(read_state, 0).result(timeout=60))
        print("map_state", sorted(set(pool.map(read_state, range(8)))))
        assert pool.submit(big_len, 0).result(timeout=60) == len(BIG)
        start = time.perf_counter()
        futs = [pool.submit(big_len, i) for i in range(40)]
        ok = [f.result(timeout=60) for f in futs] == [len(BIG) + i for i in range(40)]
        print("big_ok", ok)
        print("big_seconds", f"{time.perf_counter() - start:.3f}")
        try:
            pool.submit(fails, 3).result(timeout=60)
        except ValueError as e:
            print("traceback", repr(str(e.__cause__)))
        s = Scaler(3)
        print(
            "methods",
            pool.submit(s.scale, 2).result(),
            pool.submit(Scaler.double, 4).result(),
            pool.submit(Scaler.name, 0).result(),
        )

        def local(x: int) -> int:  # defined under the guard: no worker has it by name
            return x + 100

        print("local", pool.submit(local, 1).result(timeout=60), list(pool.map(local, [1, 2])))
        print("lambda", pool.submit(lambda x: x - 1, 1).result(timeout=60))
        print("pid_differs", pool.submit(os.getpid).result(timeout=60) != os.getpid())


if __name__ == "__main__":
    main(sys.argv[1])
