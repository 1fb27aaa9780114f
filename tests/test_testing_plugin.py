"""The mpchan.testing pytest plugin: the leak check fixture and its marker."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from mpchan.testing.plugin import SHM_DIR

pytest_plugins = ["pytester"]

# The inner runs load the plugin explicitly (installed or not) and give leaks
# a short grace period so the failing cases stay fast.
_PLUGIN_ARGS = ("-p", "no:mpchan", "-p", "mpchan.testing.plugin", "-p", "no:cacheprovider")
_INI = """
[pytest]
mpchan_leak_grace = 0.5
"""
_AUTOUSE = """
import pytest

@pytest.fixture(autouse=True)
def _leak_check(mpchan_leak_check):
    pass
"""


def _run(pytester: pytest.Pytester, source: str) -> pytest.RunResult:
    pytester.makeini(_INI)
    pytester.makeconftest(_AUTOUSE)
    pytester.makepyfile(test_inner=textwrap.dedent(source))
    return pytester.runpytest_subprocess(*_PLUGIN_ARGS, timeout=50)


def _kill_if_sleeper(pid: int) -> None:
    """Kill ``pid`` if it is still the sleeping child an inner test started."""
    try:
        proc = psutil.Process(pid)
        if "time.sleep(30)" in " ".join(proc.cmdline()):
            proc.kill()
    except psutil.Error:
        pass


@pytest.fixture
def shm_name() -> Iterator[str]:
    # A name of this program's session, which the inner run inherits
    # (MPCHAN_SESSION): the plugin counts only its own session's segments.
    from mpchan import _shm

    name = f"mpchan-{_shm.session_token()}-zplugintest{uuid.uuid4().hex}"
    yield name
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(SHM_DIR, name))


def test_clean_test_passes(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        import subprocess, sys, threading

        def test_clean():
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            t = threading.Thread(target=lambda: None)
            t.start()
            t.join()
        """,
    )
    result.assert_outcomes(passed=1)


def test_leaked_child_process_fails_and_is_killed(pytester: pytest.Pytester) -> None:
    pid_file = pytester.path / "child.pid"
    result = _run(
        pytester,
        f"""
        import subprocess, sys

        def test_leaks_a_process():
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            with open({str(pid_file)!r}, "w") as f:
                f.write(str(proc.pid))
        """,
    )
    pid = int(pid_file.read_text())
    try:
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(
            [
                "*mpchan leak check: test_inner.py::test_leaks_a_process left resources behind:*",
                "*1 child process(es) still alive*",
                f"*pid {pid} *time.sleep(30)*",
                "*were killed*",
            ]
        )
        # The plugin killed it; it is no longer running (maybe a zombie
        # already reaped by init once the inner run ended).
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            assert proc.status() == psutil.STATUS_ZOMBIE or "time.sleep(30)" not in " ".join(
                proc.cmdline()
            )
    finally:
        _kill_if_sleeper(pid)


def test_child_that_exits_within_grace_is_not_a_leak(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        import subprocess, sys

        def test_short_lived_child():
            # Not waited for: it ends on its own well within the grace period.
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.1)"])
        """,
    )
    result.assert_outcomes(passed=1)


def test_multiprocessing_infrastructure_is_not_a_leak(pytester: pytest.Pytester) -> None:
    # The forkserver and the resource tracker live as long as the program.
    result = _run(
        pytester,
        """
        import multiprocessing, os

        def test_forkserver_process():
            proc = multiprocessing.get_context("forkserver").Process(target=os.getpid)
            proc.start()
            proc.join(10)
            assert proc.exitcode == 0
        """,
    )
    result.assert_outcomes(passed=1)


def test_leaked_shm_file_fails(pytester: pytest.Pytester, shm_name: str) -> None:
    path = os.path.join(SHM_DIR, shm_name)
    result = _run(
        pytester,
        f"""
        def test_leaks_shm():
            open({path!r}, "wb").close()
        """,
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*1 shared-memory file(s)*", f"*{shm_name}*"])
    # The plugin reports segments; it does not remove them.
    assert os.path.exists(path)


def test_shm_file_removed_within_grace_is_not_a_leak(
    pytester: pytest.Pytester, shm_name: str
) -> None:
    path = os.path.join(SHM_DIR, shm_name)
    result = _run(
        pytester,
        f"""
        import os, subprocess, sys

        def test_releases_shm_late():
            # Another process unlinks the segment shortly after the test ends.
            open({path!r}, "wb").close()
            subprocess.Popen([sys.executable, "-c",
                              "import os, time; time.sleep(0.1); os.unlink({path!r})"])
        """,
    )
    result.assert_outcomes(passed=1)
    assert not os.path.exists(path)


def test_unrelated_shm_file_is_ignored(pytester: pytest.Pytester) -> None:
    name = f"other-{uuid.uuid4().hex}"
    path = os.path.join(SHM_DIR, name)
    try:
        result = _run(
            pytester,
            f"""
            def test_other_file():
                open({path!r}, "wb").close()
            """,
        )
        result.assert_outcomes(passed=1)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def test_a_pool_worker_started_by_the_forkserver_is_a_leak(pytester: pytest.Pytester) -> None:
    # Workers forked by multiprocessing's forkserver carry the server's command
    # line; only the server itself is infrastructure.
    result = _run(
        pytester,
        """
        import mpchan

        _kept = []

        def test_leaves_a_pool_running():
            pool = mpchan.Pool(1, start_method="forkserver")
            assert pool.submit(abs, -1).result(timeout=30) == 1
            _kept.append(pool)
        """,
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*1 child process(es) still alive*", "*forkserver*"])


def test_other_sessions_segments_are_ignored(pytester: pytest.Pytester) -> None:
    # Another mpchan program running beside the tests (its own session token)
    # makes and removes segments as it pleases: not this test's leak.
    name = f"mpchan-{uuid.uuid4().hex[:12]}-c{uuid.uuid4().hex[:16]}"
    path = os.path.join(SHM_DIR, name)
    try:
        result = _run(
            pytester,
            f"""
            def test_other_program():
                open({path!r}, "wb").close()
            """,
        )
        result.assert_outcomes(passed=1)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def test_leaked_thread_fails(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        import threading

        stop = threading.Event()

        def test_leaks_thread():
            threading.Thread(target=stop.wait, name="leaky-thread", daemon=True).start()

        def test_zz_cleanup():
            stop.set()
        """,
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*1 thread(s) still alive*", "*'leaky-thread'*daemon*"])


def test_infra_thread_is_not_a_leak(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        import threading

        stop = threading.Event()

        def test_starts_infra_thread():
            threading.Thread(target=stop.wait, name="mpchan-infra-test", daemon=True).start()

        def test_zz_cleanup():
            stop.set()
        """,
    )
    result.assert_outcomes(passed=2)


def test_allow_leaks_marker_skips_the_check(pytester: pytest.Pytester, shm_name: str) -> None:
    path = os.path.join(SHM_DIR, shm_name)
    result = _run(
        pytester,
        f"""
        import pytest

        @pytest.mark.mpchan_allow_leaks
        def test_allowed():
            open({path!r}, "wb").close()
        """,
    )
    result.assert_outcomes(passed=1)
    assert os.path.exists(path)


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    pytester.makeini(_INI)
    result = pytester.runpytest_subprocess(*_PLUGIN_ARGS, "--markers", timeout=50)
    result.stdout.fnmatch_lines(["@pytest.mark.mpchan_allow_leaks:*"])


def test_fixture_is_not_autouse_by_default(pytester: pytest.Pytester, shm_name: str) -> None:
    # Installing mpchan must not change other projects' tests.
    path = os.path.join(SHM_DIR, shm_name)
    pytester.makeini(_INI)
    pytester.makepyfile(
        test_inner=f"""
        def test_leaks_without_opting_in():
            open({path!r}, "wb").close()
        """
    )
    result = pytester.runpytest_subprocess(*_PLUGIN_ARGS, timeout=50)
    result.assert_outcomes(passed=1)


def test_entry_point_registers_the_plugin() -> None:
    try:
        importlib.metadata.distribution("mpchan")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mpchan is not installed (running from a source tree)")
    entry_points = importlib.metadata.entry_points(group="pytest11", name="mpchan")
    assert [ep.value for ep in entry_points] == ["mpchan.testing.plugin"]


def test_shm_dir_exists() -> None:
    assert Path(SHM_DIR).is_dir()
