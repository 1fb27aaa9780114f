"""Shared-memory segment life (spec 2.2: freed once no live process holds a handle)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import stat
import subprocess
import sys

import pytest

from mpchan import Channel, _shm
from mpchan._compat import SHM_DIR

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "chan_scripts"))
import chan_workers as cw

wait_for = cw.wait_for


def _exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name))


def test_segment_files_are_private_and_unguessable() -> None:
    ch = Channel(2)
    ch.send(bytes(2_000_000))  # a payload slot file too
    files = [n for n in os.listdir(SHM_DIR) if n.startswith(ch._name)]
    assert len(files) >= 2
    for n in files:
        mode = stat.S_IMODE(os.stat(os.path.join(SHM_DIR, n)).st_mode)
        assert mode == 0o600, (n, oct(mode))
    other = Channel(2)
    assert ch._name != other._name
    assert len(ch._name.rsplit("-c", 1)[1]) >= 16  # 64 random bits
    assert ch.recv(timeout=1) == bytes(2_000_000)


def test_freed_when_the_last_holder_drops_it() -> None:
    ctx = multiprocessing.get_context("fork")
    ch, ack = Channel(1), Channel(1)
    name = ch._name
    p = ctx.Process(target=cw.recv_then_report, args=(ch, ack), daemon=True)
    p.start()
    wait_for(lambda: _blocked_receivers(name) == 1, what="the child to hold it")
    del ch
    assert _exists(name)  # the child still holds a handle
    reopened = pickle.loads(pickle.dumps(_reopen(name)))
    reopened.send("bye")
    assert ack.recv(timeout=10) == ("value", "bye")
    p.join(10)
    del reopened
    wait_for(lambda: not _exists(name), timeout=5, what="the segment to be unlinked")


def _blocked_receivers(name: str) -> int:
    return int(_shm.open_segment(name).core.stats()[5])


def _reopen(name: str) -> Channel:
    return Channel._from_segment(_shm.open_segment(name))


def test_local_handles_share_one_mapping() -> None:
    ch = Channel(1)
    clone = pickle.loads(pickle.dumps(ch))
    assert clone._seg is ch._seg
    name = ch._name
    del ch
    assert _exists(name)
    del clone
    assert not _exists(name)


def test_pickled_handle_in_transit_keeps_it_alive() -> None:
    ch = Channel(1)
    name = ch._name
    data = pickle.dumps(ch)
    ch._seg.release()  # the only mapped holder goes; a handle is in transit
    del ch
    assert _exists(name)
    back = pickle.loads(data)
    back.send(1)
    assert back.recv(timeout=1) == 1
    del back
    wait_for(lambda: not _exists(name), timeout=5, what="the segment to be unlinked")


def test_no_resource_tracker_involvement() -> None:
    code = (
        "import mpchan, multiprocessing.resource_tracker as rt\n"
        "chs = [mpchan.Channel(2) for _ in range(5)]\n"
        "for c in chs: c.send(bytes(300000)); c.recv()\n"
        "assert rt._resource_tracker._fd is None, 'resource tracker started'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MPCHAN_SESSION"}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == 0, r.stderr
    assert "resource_tracker" not in r.stderr and "leaked" not in r.stderr


@pytest.mark.timeout(60)
def test_program_exit_removes_everything() -> None:
    code = (
        "import os, mpchan\n"
        "a = mpchan.Channel(4); a.send(bytes(300000))\n"
        "b = mpchan.Channel(0)\n"
        "import pickle; keep = pickle.dumps(a)  # never unpickled\n"
        "print(os.environ['MPCHAN_SESSION'].partition(':')[0], flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MPCHAN_SESSION"}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == 0, r.stderr
    prefix = f"mpchan-{r.stdout.strip()}-"
    wait_for(
        lambda: not [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)],
        timeout=5,
        what="the session's files to go",
    )
