"""Fixtures shared by mpchan's own tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

import mpchan.testing.plugin as leak_plugin
from mpchan import _supervisor


def pytest_configure(config: pytest.Config) -> None:
    # An installed mpchan registers the plugin through its pytest11 entry
    # point; from a bare source tree (PYTHONPATH) register it here instead.
    manager = config.pluginmanager
    if not manager.is_registered(leak_plugin) and not manager.is_blocked("mpchan"):
        manager.register(leak_plugin, "mpchan")


@pytest.fixture(autouse=True)
def _mpchan_leak_check(mpchan_leak_check: None) -> None:
    """Every test of mpchan itself fails if it leaks processes, shared memory or threads."""


@pytest.fixture
def make_sup(mpchan_leak_check: None) -> Iterator[Callable[..., _supervisor.Supervisor]]:
    """Make supervisors (installed as the program's one); shut all down after the test."""
    made: list[_supervisor.Supervisor] = []
    previous = _supervisor.set_supervisor(None)

    def make(*args: Any, **kwargs: Any) -> _supervisor.Supervisor:
        sup = _supervisor.Supervisor(*args, **kwargs)
        made.append(sup)
        _supervisor.set_supervisor(sup)
        return sup

    try:
        yield make
    finally:
        for sup in made:
            sup.shutdown(timeout=2)
        _supervisor.set_supervisor(previous)
