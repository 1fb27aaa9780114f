"""What travels between the processes of a pipeline (layer 8).

Both sides of a pipeline import this module -- the parent (``_stream``,
``_stream_run``) and its stage workers (``_stream_worker``) -- and it imports
neither. It owns what they must agree on, all of it plain picklable data: a
stage's definition (:class:`Stage`), the message that carries a chunk from
hop to hop (:data:`Message`), the record of an item that failed
(:class:`ItemError`), and the journal a worker leaves for its parent
(:class:`Guard`, :data:`Journal`, :data:`Resume`).

The path of one source chunk::

    feeder (parent)         stage worker, each hop                consumer (parent)
    (seq, start, chunk, None) --ch0--> (seq, idx, results, failed) --ch1--> ... --> by seq
                                 |
                                 | while it runs the chunk:
                                 |   guard.journal  <- (seq, idx, items, failed, spent)
                                 |   guard.progress += 1 per item started
                                 v
                 its death: the parent reads both (take_journal, progress.count)
                 and hands the chunk to a replacement as a Resume

Every hop carries one :data:`Message` ``(seq, idx, items, failed)``:
  seq     numbers the source chunk (``None`` for the tail a ``batch`` stage
          emits at the end); every stage keeps it, so an ordered pipeline is
          put back in source order by the consumer alone.
  idx     the source index of each item: an int, the index of the first,
          while the items are consecutive source items (one for one); a list
          once a stage dropped or multiplied some (a derived item has the
          index of the source item it came from); ``None`` after a
          ``batch``. (An int, not a range: a range pickles slowly.)
  failed  ``None``, or the :class:`ItemError` records of the chunk's items
          that failed: skipped ones (``on_error="skip"``), and at most one
          fatal one, always last, after which the chunk holds no item.

Invariants:
    - a fatal record is the last of its chunk's ``failed`` (``fatal_of``
      reads it there; a skipped record joins before it);
    - an :class:`ItemError` carries the pickled exception and the user's
      traceback for a fatal failure only (a skipped one is counted and
      shown, never raised);
    - a journal (capacity 1) holds at most one record: its worker's chunk,
      from before the chunk's first item starts until before its results
      are sent; ``b""`` stands for a chunk that could not be pickled (it
      cannot be run again).

Ownership:
    - a :class:`Stage` is built by the parent and never changes; every
      worker of the stage gets a copy.
    - the parent makes one :class:`Guard` per worker place of a stage that
      calls a function, and hands it to each worker that holds the place in
      turn; only that worker writes the journal and the progress counter
      while it lives; the parent reads and clears them only once the
      worker's process is dead.
"""

from __future__ import annotations

import os
import pickle
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from ._channel import Channel
from ._codec import pickle_value
from ._errors import rebuild_remote
from ._sync import WaitGroup

__all__ = [
    "Guard",
    "ItemError",
    "Journal",
    "Kind",
    "Message",
    "OnError",
    "Resume",
    "Stage",
    "TraceEvent",
    "dumps_or_none",
    "fatal_of",
    "index_at",
    "item_error",
    "take_journal",
]

OnError = Literal["fail", "skip"]
Kind = Literal["map", "filter", "flat_map", "batch"]

# One traced item: (start, end) from time.monotonic(), outcome ("ok",
# "skipped" or "error"), and the error ("Type: message") or None.
TraceEvent = tuple[float, float, str, str | None]

# A message between stages: (seq, idx, items, failed), see the module docstring.
# (idx: an int, a list of int or None; typed Any, as the code that reads it takes all)
Message = tuple[int | None, Any, list[Any], "list[ItemError] | None"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep  # frames users never see


@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline as :class:`~mpchan.Stream` built it; a copy
    travels to each of its workers."""

    kind: Kind
    fn: Callable[..., Any] | None
    workers: int
    capacity: int
    ordered: bool
    on_error: OnError
    retries: int
    timeout: float | None
    size: int = 0  # batch size

    @property
    def name(self) -> str:
        if self.fn is None:
            return f"{self.kind}({self.size})"
        qual = getattr(self.fn, "__qualname__", None) or repr(self.fn)
        return f"{self.kind}({qual})"


class ItemError(NamedTuple):
    """One item that failed, on its way to the consumer with its chunk (plain data).

    ``exc`` (the exception, pickled) and ``traceback`` (the user's own frames:
    no mpchan frame) travel for a fatal failure only.
    """

    stage: int
    source_index: int | None  # the source index of the item, if known
    item: str  # its repr, shortened
    type_name: str
    message: str  # the first line of the exception's message
    fatal: bool
    pid: int
    exc: bytes | None = None
    traceback: str = ""

    @property
    def error(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name

    def rebuild(self, stage_name: str) -> BaseException:
        """The exception, as raised to the consumer (see :meth:`mpchan.Stream.__iter__`)."""
        what = self.item
        if self.source_index is not None:
            what = f"input item {self.source_index}: {self.item}"
        note = (
            f"raised in mpchan worker (pid {self.pid}) running stage {self.stage} "
            f"{stage_name}, on {what}"
        )
        return rebuild_remote(self.exc, self.type_name, self.message, self.traceback, note)


def item_error(
    exc: BaseException,
    stage: int,
    index: int | None,
    item: Any,
    *,
    fatal: bool,
    pid: int | None = None,
    with_traceback: bool = True,
) -> ItemError:
    """The record of ``exc``, raised by ``item`` (source index ``index``) in
    stage ``stage``, by process ``pid`` (default: this one)."""
    type_name = type(exc).__name__
    message = _first_line(exc)
    if not fatal:
        return ItemError(stage, index, _short_repr(item), type_name, message, False, _pid(pid))
    blob = dumps_or_none(exc)
    tb = _user_traceback(exc) if with_traceback else ""
    return ItemError(stage, index, _short_repr(item), type_name, message, True, _pid(pid), blob, tb)


def _pid(pid: int | None) -> int:
    return os.getpid() if pid is None else pid


def _first_line(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        return "<message cannot be printed>"
    first, sep, _rest = text.strip().partition("\n")
    return first + (" [...]" if sep else "")


def _user_traceback(exc: BaseException) -> str:
    """``exc`` formatted with its chain, without mpchan's own frames."""
    try:
        te = traceback.TracebackException.from_exception(exc)
        _strip_frames(te, set())
        return "".join(te.format())
    except Exception:
        return ""


def _strip_frames(te: traceback.TracebackException, seen: set[int]) -> None:
    if id(te) in seen:
        return
    seen.add(id(te))
    te.stack = traceback.StackSummary.from_list(
        [f for f in te.stack if not f.filename.startswith(_PACKAGE_DIR)]
    )
    for sub in (te.__cause__, te.__context__, *(te.exceptions or ())):
        if sub is not None:
            _strip_frames(sub, seen)


def dumps_or_none(obj: Any) -> bytes | None:
    """Pickle ``obj`` as a channel would (by the codec's rule); None if it cannot be."""
    try:
        return pickle_value(obj)
    except BaseException:
        return None


def _short_repr(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = f"<unprintable {type(obj).__name__}>"
    return text if len(text) <= 200 else text[:197] + "..."


class Guard(NamedTuple):
    """Where a stage worker leaves what it holds, for its parent to read after
    its death: the chunk (``journal``, capacity 1, pickled bytes) and how many
    of its items it started (``progress``)."""

    journal: Channel
    progress: WaitGroup


# What a journal holds, and what a replacement is handed to run first: the
# chunk (seq, idx, items, failed) and the failed calls spent per item (None:
# none); a resume adds the position of the item to fail at once (its calls
# are spent: its last worker died running it) and that failure.
Journal = tuple[int, Any, list[Any], "list[ItemError] | None", "list[int] | None"]
Resume = tuple[int, Any, list[Any], "list[ItemError] | None", "list[int] | None", "int | None", Any]


def take_journal(journal: Channel) -> Journal | None:
    """What a dead worker held (its journal emptied), or None.

    Never blocks. Process safety: the parent only, once the journal's worker
    is dead (while it lives, the journal is its own).
    """
    try:
        blob = journal.recv_nowait()
    except Exception:  # empty; or left half written by the death
        return None
    if not blob:
        return None
    try:
        record: Journal = pickle.loads(blob)
    except Exception:
        return None
    return record


def index_at(idx: Any, j: int) -> int | None:
    """The source index of item ``j`` of a chunk whose index is ``idx``."""
    if idx is None:
        return None
    return idx + j if type(idx) is int else int(idx[j])


def fatal_of(failed: list[ItemError] | None) -> ItemError | None:
    """The fatal record of a chunk's ``failed``, or None (it is always last)."""
    return failed[-1] if failed and failed[-1].fatal else None
