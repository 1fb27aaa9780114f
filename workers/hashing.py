"""Iterated hashing: ``digest(item)`` is SHA-256 applied ``ROUNDS`` times.

CPU-bound (hashlib releases the GIL only for large inputs; these are small).
"""

from __future__ import annotations

import hashlib

ROUNDS = 2000


def digest(item: object, rounds: int = ROUNDS) -> str:
    """Hex digest of ``str(item)`` hashed ``rounds`` times."""
    data = str(item).encode()
    for _ in range(rounds):
        data = hashlib.sha256(data).digest()
    return data.hex()


def leading_zero_bits(item: object) -> int:
    """Number of leading zero bits of ``digest(item)`` (a toy proof-of-work score)."""
    value = int(digest(item), 16)
    return 256 - value.bit_length()
