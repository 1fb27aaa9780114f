"""Mandelbrot rows: ``row(y)`` renders one row of a ``WIDTH`` x ``HEIGHT`` image.

Returns the row as a string of characters (one per pixel, darker = more
iterations), so ``mpchan run workers.mandelbrot:row --range 0:40`` prints
the picture in order.
"""

from __future__ import annotations

WIDTH = 100
HEIGHT = 40
MAX_ITER = 200
SHADES = " .:-=+*#%@"


def escape_time(c: complex, max_iter: int = MAX_ITER) -> int:
    """Iterations before ``z -> z*z + c`` leaves the radius-2 disc (``max_iter`` if never)."""
    z = 0j
    for i in range(max_iter):
        z = z * z + c
        if z.real * z.real + z.imag * z.imag > 4.0:
            return i
    return max_iter


def row_counts(y: int | str, width: int = WIDTH, height: int = HEIGHT) -> list[int]:
    """Escape times of row ``y``."""
    yi = int(y)
    im = 1.2 - 2.4 * yi / max(height - 1, 1)
    return [escape_time(complex(-2.1 + 3.0 * x / max(width - 1, 1), im)) for x in range(width)]


def row(y: int | str) -> str:
    """Row ``y`` as text."""
    last = len(SHADES) - 1
    return "".join(SHADES[min(last, c * last // MAX_ITER * 4)] for c in row_counts(y))
