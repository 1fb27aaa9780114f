"""The exception hierarchy of spec section 2.1."""

from __future__ import annotations

import pickle
from concurrent.futures.process import BrokenProcessPool

import pytest

from mpchan import _errors
from mpchan._errors import (
    Cancelled,
    ChannelClosed,
    DeadlineExceeded,
    DeadlockError,
    EndOfChannel,
    MpchanError,
    PicklingError,
    RemoteError,
    SerializationError,
    ShutdownError,
    TaskTimeout,
    UnpicklingError,
    WorkerCrashed,
    WouldBlock,
)

ALL_ERRORS: list[type[MpchanError]] = [
    Cancelled,
    ChannelClosed,
    DeadlineExceeded,
    DeadlockError,
    EndOfChannel,
    MpchanError,
    PicklingError,
    RemoteError,
    SerializationError,
    ShutdownError,
    TaskTimeout,
    UnpicklingError,
    WorkerCrashed,
    WouldBlock,
]


def test_all_lists_every_error() -> None:
    assert sorted(_errors.__all__) == sorted(e.__name__ for e in ALL_ERRORS)


@pytest.mark.parametrize("error", ALL_ERRORS, ids=lambda e: e.__name__)
def test_every_error_is_an_mpchan_error(error: type[MpchanError]) -> None:
    assert issubclass(error, MpchanError)
    assert issubclass(error, Exception)


@pytest.mark.parametrize(
    ("sub", "base"),
    [
        (EndOfChannel, ChannelClosed),
        (DeadlineExceeded, Cancelled),
        (DeadlineExceeded, TimeoutError),
        (WorkerCrashed, BrokenProcessPool),
        (ShutdownError, RuntimeError),
        (PicklingError, SerializationError),
        (PicklingError, pickle.PicklingError),
        (UnpicklingError, SerializationError),
        (UnpicklingError, pickle.UnpicklingError),
    ],
    ids=lambda c: c.__name__,
)
def test_subclass_relations(sub: type[BaseException], base: type[BaseException]) -> None:
    assert issubclass(sub, base)


@pytest.mark.parametrize(
    ("error", "not_base"),
    [
        (TaskTimeout, TimeoutError),  # told apart from future.result(timeout=)
        (Cancelled, TimeoutError),
        (ChannelClosed, EndOfChannel),
        (WouldBlock, ChannelClosed),
        (SerializationError, ChannelClosed),
    ],
    ids=lambda c: c.__name__,
)
def test_deliberate_non_relations(
    error: type[BaseException], not_base: type[BaseException]
) -> None:
    assert not issubclass(error, not_base)


def test_cancelled_cause() -> None:
    assert Cancelled().cause is None
    cause = ValueError("stop")
    err = Cancelled("cancelled by user", cause)
    assert err.cause is cause
    assert str(err) == "cancelled by user"
    assert DeadlineExceeded().cause is None
    assert DeadlineExceeded(cause="late").cause == "late"


def _roundtrip(err: BaseException) -> BaseException:
    return pickle.loads(pickle.dumps(err))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "err",
    [
        MpchanError("base"),
        ChannelClosed("closed"),
        EndOfChannel("drained"),
        WouldBlock("full"),
        SerializationError("cannot pickle"),
        TaskTimeout("task ran past 1.5 s"),
        ShutdownError("pool is shut down"),
        DeadlockError("all processes are asleep"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_plain_errors_pickle(err: MpchanError) -> None:
    back = _roundtrip(err)
    assert type(back) is type(err)
    assert back.args == err.args
    assert str(back) == str(err)


@pytest.mark.parametrize("kind", [Cancelled, DeadlineExceeded], ids=lambda c: c.__name__)
def test_cancelled_pickles_with_cause(kind: type[Cancelled]) -> None:
    err = kind("why", cause={"reason": "user", "code": 3})
    back = _roundtrip(err)
    assert type(back) is kind
    assert isinstance(back, Cancelled)
    assert str(back) == "why"
    assert back.cause == {"reason": "user", "code": 3}
    default = _roundtrip(kind())
    assert isinstance(default, Cancelled)
    assert str(default) == str(kind())
    assert default.cause is None


def test_worker_crashed_pickles_with_attributes() -> None:
    err = WorkerCrashed(
        "worker 4242 died running f(1)",
        pid=4242,
        exitcode=-9,
        signal="SIGKILL",
        task="f(1)",
        cause="killed (possibly out of memory)",
    )
    assert (err.pid, err.exitcode, err.signal, err.task) == (4242, -9, "SIGKILL", "f(1)")
    back = _roundtrip(err)
    assert isinstance(back, WorkerCrashed)
    assert isinstance(back, BrokenProcessPool)
    assert str(back) == str(err)
    assert back.pid == 4242
    assert back.exitcode == -9
    assert back.signal == "SIGKILL"
    assert back.cause == "killed (possibly out of memory)"


def test_remote_error_pickles_with_attributes() -> None:
    err = RemoteError("LocalThing", "cannot be pickled", "Traceback (most recent call last): ...")
    assert str(err) == "LocalThing: cannot be pickled"
    back = _roundtrip(err)
    assert isinstance(back, RemoteError)
    assert back.type_name == "LocalThing"
    assert back.message == "cannot be pickled"
    assert back.traceback == "Traceback (most recent call last): ..."
    assert str(back) == str(err)


def test_errors_can_be_raised_and_caught_by_their_bases() -> None:
    with pytest.raises(TimeoutError):
        raise DeadlineExceeded()
    with pytest.raises(ChannelClosed):
        raise EndOfChannel()
    with pytest.raises(BrokenProcessPool):
        raise WorkerCrashed("dead", pid=1)
    with pytest.raises(RuntimeError):
        raise ShutdownError("shut down")


def test_worker_crashed_pickles_its_task() -> None:
    back = _roundtrip(WorkerCrashed("dead", pid=1, task="f(1)"))
    assert isinstance(back, WorkerCrashed)
    assert back.task == "f(1)"
