"""Test helpers for programs that use mpchan.

:mod:`mpchan.testing.plugin` is a pytest plugin, registered through the
``pytest11`` entry point, that provides the ``mpchan_leak_check`` fixture:
it fails a test that leaves child processes, ``mpchan-`` shared-memory
segments or threads behind (goleak for mpchan). The fixture is opt-in; make
it autouse in your own ``conftest.py``::

    import pytest

    @pytest.fixture(autouse=True)
    def _leak_check(mpchan_leak_check: None) -> None:
        pass

Mark a test with ``@pytest.mark.mpchan_allow_leaks`` to skip the check.
"""

from __future__ import annotations

__all__: list[str] = []
