"""Pipeline: make lines -> parse -> score (ordered) -> batch, each stage in
its own worker processes, bounded memory end to end; then per-stage stats."""

from __future__ import annotations

import sys

import mpchan
from workers import textscore


def main(n: int = 2000) -> None:
    s = (
        mpchan.stream(range(n), chunksize=8)
        .map(textscore.make_line, workers=1, capacity=8)
        .map(textscore.parse, workers=2, capacity=8)
        .map(textscore.score, workers=3, capacity=8, ordered=True)
        .batch(100)
    )
    total = 0.0
    for batch in s:  # lists of up to 100 scores, in input order
        total += sum(batch)
    print(f"{n} lines, total score {total:.1f}")
    for st in s.stats():
        print(
            f"  {st['name']:<28} x{st['workers']} in={st['items_in']:<6} out={st['items_out']:<6}"
            f" busy={st['busy_s']:.2f}s wait-in={st['blocked_in_s']:.2f}s"
            f" wait-out={st['blocked_out_s']:.2f}s"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
