"""Serialisation: the one place that decides by reference or by value (layer 1).

Everything mpchan pickles -- tasks and their results, map chunks, channel
values, control records -- goes through :func:`pickle_value`, always in the
caller (the sender), so a failure is raised there and nothing was sent.

The rule, as ``multiprocessing`` has it, plus cloudpickle where it cannot::

    pickle_value(v)
      1. the C pickler, protocol 5: every function and class by reference
         (module + qualified name) -- module-level functions, classes,
         staticmethods, classmethods and bound methods of importable
         classes, and the objects of the program's own ``__main__`` script,
         which every worker imports as ``__mp_main__`` (spawn, forkserver)
         or inherits (fork);
      2. cloudpickle (by value) for what a worker cannot import by name:
         lambdas, closures, local classes, modules registered with
         ``cloudpickle.register_pickle_by_value``, and ``__main__`` objects
         when the main module is not a script a worker re-imports (an
         interactive session, ``python -c``, a notebook) or the object is
         defined only under ``if __name__ == "__main__":`` -- a worker
         importing the script never runs that block.

Step 2 runs when step 1 fails, and when step 1's bytes name ``__main__``
while the main module cannot be imported, or name something of its guarded
block or of a by-value module (a bytes search; false hits only cost the
slower pickler). :func:`function_blob` pickles one function by value once,
so a pool can send it to each worker once and refer to it by a key.

Values exposing the buffer protocol go out of band (pickle protocol 5);
``bytes``, ``bytearray`` and ``memoryview`` skip pickle (:func:`encode`).

Handles (channels, contexts, wait groups) count the pickles of themselves
not yet unpickled in their segment (``transit``); a handle's ``__reduce__``
reports its count to :func:`note_transit`, so an attempt that fails
(step 1 falling back to step 2, or an error) takes its counts back.

Invariants:
    * A successful :func:`pickle_value` leaves exactly one transit count per
      handle occurrence in the bytes it returns; a failed one leaves none.
    * Nothing here imports cloudpickle until step 2 needs it (a worker
      process starts without it).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import io
import os
import pickle
import sys
import threading
import types
import weakref
from typing import Any

from ._errors import PicklingError, UnpicklingError, exception_chain

__all__ = [
    "OOB_MIN",
    "TAG_BYTEARRAY",
    "TAG_BYTES",
    "TAG_PICKLE",
    "FunctionCache",
    "by_reference",
    "cannot_pickle",
    "cannot_unpickle",
    "decode",
    "dumps",
    "encode",
    "note_transit",
    "pickle_value",
    "release_unread",
]

TAG_PICKLE = 0
TAG_BYTES = 1
TAG_BYTEARRAY = 2
OOB_MIN = 64 * 1024

MAIN_MODULES = ("__main__", "__mp_main__")

_dumps = pickle.dumps
_loads = pickle.loads
_PROTOCOL = 5
_MAIN_BYTES = b"__main__"


# ---------------------------------------------------------------- the main module


class _MainInfo:
    """What a worker will find in the program's main module, computed once per module."""

    __slots__ = ("guarded", "importable", "module", "toplevel")

    def __init__(self, module: Any) -> None:
        self.module = module
        self.importable = False
        self.toplevel: frozenset[str] = frozenset()
        self.guarded: tuple[bytes, ...] = ()  # names bound only in the guarded block
        path = _reimported_path(module)
        if path is None:
            return
        try:
            with open(path, "rb") as fh:
                tree = ast.parse(fh.read(), filename=path)
        except (OSError, SyntaxError, ValueError):
            return  # not a source file a worker re-imports the same way
        top: set[str] = set()
        guard: set[str] = set()
        _bind_names(tree.body, top, guard, top)
        self.importable = True
        self.toplevel = frozenset(top)
        self.guarded = tuple(n.encode() for n in sorted(guard - top))


def _reimported_path(module: Any) -> str | None:
    # The file a spawned or forkserver worker runs as __mp_main__, following
    # multiprocessing.spawn's own choice: by module name (python -m, but not
    # a package's __main__), else by path; nothing for an interactive
    # session, python -c, an IPython kernel, or a program read from stdin
    # (whose path "<stdin>" mpchan's workers skip: see _supervisor).
    if module is None or sys.flags.interactive:
        return None
    spec_name = getattr(getattr(module, "__spec__", None), "name", None)
    if spec_name is not None and (spec_name == "__main__" or spec_name.endswith(".__main__")):
        return None
    path = getattr(module, "__file__", None)
    if not isinstance(path, str):
        return None
    if os.path.splitext(os.path.basename(path))[0] == "ipython":
        return None
    return path if os.path.isfile(path) else None


def _is_main_guard(test: ast.expr) -> bool:
    # ``__name__ == "__main__"`` either way round.
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return False
    if not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(consts) == 1


def _target_names(node: ast.expr | None, out: set[str]) -> None:
    if isinstance(node, ast.Name):
        out.add(node.id)
    elif isinstance(node, (ast.Tuple, ast.List)):
        for elt in node.elts:
            _target_names(elt, out)
    elif isinstance(node, ast.Starred):
        _target_names(node.value, out)


def _bind_names(body: list[ast.stmt], top: set[str], guard: set[str], defs: set[str]) -> None:
    # Names bound by module-level code (blocks of if/for/while/with/try
    # included) go to ``top``; in the ``if __name__ == "__main__":`` block
    # (which a worker never runs; its ``else`` it does) only what a def or
    # class binds matters -- nothing else is pickled by name -- and goes to
    # ``guard``. ``defs`` is where this body's def/class names go.
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs.add(stmt.name)
        elif isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                _target_names(target, top)
        elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
            _target_names(stmt.target, top)
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            for alias in stmt.names:
                top.add(alias.asname or alias.name.partition(".")[0])
        elif isinstance(stmt, ast.If):
            if _is_main_guard(stmt.test):
                _bind_names(stmt.body, set(), guard, guard)
            else:
                _bind_names(stmt.body, top, guard, defs)
            _bind_names(stmt.orelse, top, guard, defs)
        elif isinstance(stmt, (ast.For, ast.AsyncFor)):
            _target_names(stmt.target, top)
            _bind_names(stmt.body + stmt.orelse, top, guard, defs)
        elif isinstance(stmt, ast.While):
            _bind_names(stmt.body + stmt.orelse, top, guard, defs)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                _target_names(item.optional_vars, top)
            _bind_names(stmt.body, top, guard, defs)
        elif isinstance(stmt, (ast.Try, ast.TryStar)):
            for handler in stmt.handlers:
                if handler.name:
                    top.add(handler.name)
                _bind_names(handler.body, top, guard, defs)
            _bind_names(stmt.body + stmt.orelse + stmt.finalbody, top, guard, defs)
        elif isinstance(stmt, ast.Match):
            for case in stmt.cases:
                _bind_names(case.body, top, guard, defs)


_main_info: _MainInfo | None = None
_main_lock = threading.Lock()


def _main() -> _MainInfo:
    global _main_info
    module = sys.modules.get("__main__")
    info = _main_info
    if info is None or info.module is not module:
        with _main_lock:
            info = _main_info
            if info is None or info.module is not module:
                info = _main_info = _MainInfo(module)
    return info


# ---------------------------------------------------------------- by reference?


def by_reference(obj: Any) -> bool:
    """True when a worker can import ``obj`` (a callable) by name. Never blocks.

    Module-level functions and classes, staticmethods, classmethods and
    bound methods of importable classes, callable instances of importable
    classes, partials of any of these, and the module-level objects of a
    main script that workers re-import are by reference; lambdas, closures,
    local classes, by-value modules and other ``__main__`` objects are not.
    """
    module: Any
    qualname: Any
    if type(obj) is types.FunctionType:  # the common case, first
        module, qualname = obj.__module__, obj.__qualname__
    elif isinstance(obj, functools.partial):
        return by_reference(obj.func)
    elif isinstance(obj, (types.MethodType, types.BuiltinFunctionType)):
        owner = obj.__self__
        if owner is None or isinstance(owner, types.ModuleType):
            return True  # a builtin function of a module
        return by_reference(owner if isinstance(owner, type) else type(owner))
    elif not isinstance(obj, (types.FunctionType, type)):
        return by_reference(type(obj))
    else:
        module = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return False
    if module in MAIN_MODULES:
        info = _main()
        return info.importable and qualname.partition(".")[0] in info.toplevel
    cp = sys.modules.get("cloudpickle")
    if cp is None:
        return True
    by_value: set[str] = cp.list_registry_pickle_by_value()
    return not (by_value and _in_modules(module, by_value))


def _in_modules(module: str, names: set[str]) -> bool:
    return any(module == n or module.startswith(n + ".") for n in names)


def _careful(data: bytes) -> bool:
    # Do the C pickler's bytes name something a worker cannot import?
    if _MAIN_BYTES in data:
        info = _main()
        if not info.importable or any(name in data for name in info.guarded):
            return True
    cp = sys.modules.get("cloudpickle")
    if cp is None:
        return False
    by_value: set[str] = cp.list_registry_pickle_by_value()
    return bool(by_value) and any(name.encode() in data for name in by_value)


# ---------------------------------------------------------------- transit counts


class _Local(threading.local):
    log: list[Any] | None = None  # the handles pickled by this thread's current attempt


_tls = _Local()


def note_transit(core: Any) -> None:
    """Record that a handle of segment ``core`` was just pickled (its
    ``__reduce__`` raised the segment's transit count), so a pickling attempt
    that fails takes the count back. Never blocks."""
    log = _tls.log
    if log is not None:
        log.append(core)


def _rollback(log: list[Any]) -> None:
    for core in log:
        with contextlib.suppress(Exception):
            core.transit(-1)
    log.clear()


# ---------------------------------------------------------------- pickling


def _cloudpickler() -> type[pickle.Pickler]:
    global _CarefulPickler
    if _CarefulPickler is None:
        import cloudpickle

        class Careful(cloudpickle.Pickler):  # type: ignore[misc,name-defined]
            """cloudpickle, except that main-script objects a worker imports go by name."""

            def reducer_override(self, obj: Any) -> Any:
                if isinstance(obj, (types.FunctionType, type)) and (
                    getattr(obj, "__module__", None) in MAIN_MODULES and by_reference(obj)
                ):
                    return NotImplemented
                return super().reducer_override(obj)

        _CarefulPickler = Careful
    return _CarefulPickler


_CarefulPickler: type[pickle.Pickler] | None = None


def _taker(oob_min: int | None, bufs: list[pickle.PickleBuffer]) -> Any:
    if oob_min is None:
        return None

    def take(pb: pickle.PickleBuffer) -> bool:
        if pb.raw().nbytes < oob_min:
            return True  # small: in band
        bufs.append(pb)
        return False

    return take


def _pickle(value: Any, oob_min: int | None) -> tuple[bytes, list[pickle.PickleBuffer]]:
    outer = _tls.log
    log: list[Any] = []
    _tls.log = log
    bufs: list[pickle.PickleBuffer] = []
    try:
        try:
            if oob_min is None:
                data = _dumps(value, _PROTOCOL)
            else:
                data = _dumps(value, _PROTOCOL, buffer_callback=_taker(oob_min, bufs))
        except Exception:
            pass
        else:
            if not _careful(data):
                return data, bufs
        _rollback(log)
        bufs = []
        out = io.BytesIO()
        pickler = _cloudpickler()(out, protocol=_PROTOCOL, buffer_callback=_taker(oob_min, bufs))
        pickler.dump(value)
        return out.getvalue(), bufs
    except BaseException:
        _rollback(log)
        raise
    finally:
        _tls.log = outer


def pickle_value(value: Any) -> bytes:
    """Pickle ``value`` (in band) by the rule above; raise what the pickler raised.

    A ``BaseException`` raised while pickling (``SystemExit`` from a
    ``__reduce__``) propagates as it is; callers turn it into their
    :class:`PicklingError` (see :func:`cannot_pickle`). Never blocks.
    """
    return _pickle(value, None)[0]


def cannot_pickle(what: str, exc: BaseException) -> PicklingError:
    """The :class:`PicklingError` for failing to pickle ``what`` (``exc`` as cause).

    The cause keeps its traceback as text only (a note): its frames, and
    through them every caller's, would keep the value, the arguments of the
    call that failed and the thread's own state alive for as long as the
    error lives (in a Future, say). Never blocks.
    """
    err = PicklingError(f"cannot pickle {what}: {type(exc).__name__}: {exc}")
    _frames_to_text(exc)
    err.__cause__ = exc
    return err


def cannot_unpickle(what: str, exc: BaseException) -> UnpicklingError:
    """The :class:`UnpicklingError` for failing to unpickle ``what`` (frames
    as in :func:`cannot_pickle`). Never blocks."""
    err = UnpicklingError(f"cannot unpickle {what}: {type(exc).__name__}: {exc}")
    _frames_to_text(exc)
    err.__cause__ = exc
    return err


def _frames_to_text(exc: BaseException) -> None:
    import traceback

    for e in exception_chain(exc):
        tb = e.__traceback__
        if tb is not None:
            with contextlib.suppress(Exception):
                text = "".join(traceback.format_tb(tb))
                e.add_note("Traceback (most recent call last):\n" + text.rstrip("\n"))
            e.__traceback__ = None


def dumps(value: Any) -> bytes:
    """Pickle ``value`` in band (for control records). Raises :class:`PicklingError`."""
    try:
        return pickle_value(value)
    except BaseException as exc:
        raise cannot_pickle(f"{type(value).__name__} value", exc) from exc


def encode(value: Any) -> tuple[int, Any, list[pickle.PickleBuffer]]:
    """Return ``(tag, payload, out_of_band_buffers)`` for a channel value.

    Never blocks; raises :class:`PicklingError`.
    """
    t = type(value)
    if t is bytes:
        return TAG_BYTES, value, []
    if t is bytearray or t is memoryview:
        return TAG_BYTEARRAY if t is bytearray else TAG_BYTES, value, []
    try:
        data, bufs = _pickle(value, OOB_MIN)
    except BaseException as exc:
        raise cannot_pickle(f"{t.__name__} value", exc) from exc
    return TAG_PICKLE, data, bufs


def decode(tag: int, payload: Any, buffers: list[Any] | None = None) -> Any:
    """Rebuild a value from :func:`encode`'s parts. Raises :class:`UnpicklingError`."""
    if tag == TAG_BYTES:
        return bytes(payload) if type(payload) is not bytes else payload
    if tag == TAG_BYTEARRAY:
        return bytearray(payload)
    try:
        return _loads(payload, buffers=buffers)
    except BaseException as exc:
        raise cannot_unpickle("value", exc) from exc


_HANDLE_MARK = b"mpchan-"  # every handle pickles the name of its segment


def release_unread(data: Any) -> None:
    """Pickled bytes that nobody will unpickle are being dropped (a reply
    never read, a result of a cancelled task): if they may hold handles
    (their segment names), unpickle and drop them now, so the segments'
    transit counts are taken back and nothing is pinned until the program
    ends. Never raises. Never blocks."""
    try:
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data)  # a memoryview's "in" looks for one byte, not bytes
        if _HANDLE_MARK in data:
            _loads(data)
    except BaseException:
        pass


# ---------------------------------------------------------------- functions by value


class FunctionCache:
    """Functions that go by value, pickled once each: ``fn -> (key, blob)``.

    ``key`` is a hash of ``blob``, so equal functions share one key and a
    worker unpickles each once. Entries are held weakly (the cache never
    keeps a function alive). A function is captured when first met: a later
    change to a global it reads is not seen by workers that already have it.

    Process safety: any thread.
    """

    __slots__ = ("_blobs", "_lock")

    def __init__(self) -> None:
        self._blobs: weakref.WeakKeyDictionary[Any, tuple[int, bytes]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, fn: Any) -> tuple[int, bytes] | None:
        """``(key, blob)`` for a function that goes by value, None for one by
        reference. Raises what pickling it raises. Never blocks."""
        if by_reference(fn):
            return None
        try:
            hit = self._blobs.get(fn)
        except TypeError:
            hit = None
        if hit is not None:
            return hit
        blob = pickle_value(fn)
        key = int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") or 1
        entry = (key, blob)
        with self._lock, contextlib.suppress(TypeError):
            self._blobs[fn] = entry
        return entry
