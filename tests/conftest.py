"""Fixtures shared by mpchan's own tests."""

from __future__ import annotations

import pytest

import mpchan.testing.plugin as leak_plugin


def pytest_configure(config: pytest.Config) -> None:
    # An installed mpchan registers the plugin through its pytest11 entry
    # point; from a bare source tree (PYTHONPATH) register it here instead.
    manager = config.pluginmanager
    if not manager.is_registered(leak_plugin) and not manager.is_blocked("mpchan"):
        manager.register(leak_plugin, "mpchan")


@pytest.fixture(autouse=True)
def _mpchan_leak_check(mpchan_leak_check: None) -> None:
    """Every test of mpchan itself fails if it leaks processes, shared memory or threads."""
