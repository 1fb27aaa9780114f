"""numpy arrays through channels: large buffers travel through shared
memory out of band (no pipe); a worker returns row sums of each matrix."""

from __future__ import annotations

import numpy as np

import mpchan


def row_sums(inp: mpchan.Channel, out: mpchan.Channel) -> None:
    for matrix in inp:
        out.send(matrix.sum(axis=1))
    out.close()


def main() -> None:
    inp, out = mpchan.Channel(2), mpchan.Channel(2)
    mpchan.go(row_sums, inp, out)
    total = 0.0
    for i in range(8):
        inp.send(np.full((512, 512), float(i)))  # 2 MiB each
        total += float(out.recv().sum())
    inp.close()
    expected = sum(512 * 512 * float(i) for i in range(8))
    print(f"sum of 8 matrices of 2 MiB: {total:.0f} (expected {expected:.0f})")


if __name__ == "__main__":
    main()
