"""Stock CPU-heavy workloads for ``mpchan run``, the examples and the benchmarks.

Plain modules, importable from a checkout (``mpchan run workers.primes:count
--range 0:2000``); every function takes one item and returns one result, so
it works as a stage of a pipeline.
"""
