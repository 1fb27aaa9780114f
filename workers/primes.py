"""Prime counting: ``count(n)`` is the number of primes below ``1000 * (n + 1)``.

CPU-bound pure Python (a sieve per call), a few milliseconds an item.
"""

from __future__ import annotations

SPAN = 1000


def is_prime(n: int) -> bool:
    """Trial division; True when ``n`` is prime."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def count(item: int | str) -> int:
    """How many primes lie below ``SPAN * (item + 1)`` (sieve of Eratosthenes)."""
    limit = SPAN * (int(item) + 1)
    sieve = bytearray([1]) * limit
    sieve[:2] = b"\0\0"
    for p in range(2, int(limit**0.5) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytes(len(range(p * p, limit, p)))
    return sum(sieve)


def nth_is_prime(item: int | str) -> bool:
    """Whether ``item`` is prime (trial division: cost grows with the number)."""
    return is_prime(int(item))
