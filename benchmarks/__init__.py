"""mpchan's benchmark suite: mpchan side by side with the tools users would otherwise pick.

Run it with ``python -m benchmarks.harness [--quick] [--json FILE] [--plot FILE]
[--peers LIST] [--scenarios LIST]``. :mod:`benchmarks.harness` holds the runner, the
report and the plug-in interface (:class:`~benchmarks.harness.Scenario`,
:class:`~benchmarks.harness.Contender`); each other public module of this package
(``channels``, ...) contributes scenarios through a module-level ``SCENARIOS`` list.
"""
