r"""Make ``"mpchan"`` a joblib backend name without importing joblib (layer 8).

``import mpchan`` must stay cheap (every worker process does it) and must
not import joblib, yet ``joblib.parallel_config(backend="mpchan")`` should
work whichever of the two a program imports first. joblib has a table for
exactly this, ``joblib.parallel.EXTERNAL_BACKENDS``: backend name -> a
zero-argument function that ``parallel_config`` calls the first time the
name is used, to register the backend. :func:`install` puts ``"mpchan"``
into that table::

    install()
      joblib.parallel in sys.modules?
        yes -> EXTERNAL_BACKENDS["mpchan"] = register        (now;
               BACKENDS["mpchan"] = make_backend              likewise below)
        no  -> sys.meta_path.insert(0, _Finder)
               ... later: import joblib (-> joblib.parallel)
               _Finder.find_spec("joblib.parallel")
                 -> the spec the other finders give, its loader wrapped;
                    the finder leaves sys.meta_path
               _Loader.exec_module: the real loader runs the module, then
                 EXTERNAL_BACKENDS["mpchan"] = register; the real loader is
                 put back on the module and its spec
    parallel_config(backend="mpchan") or Parallel(backend="mpchan")
      -> make_backend() (or register()): import mpchan._joblib, which
         registers MpchanBackend in place of the factory

Invariants:
    * The finder answers only for ``joblib.parallel``; for every other name
      it returns None at once, and anything it raises for joblib.parallel
      itself is swallowed (it then returns None and the import goes on as
      if it were not there): it never breaks an import.
    * It fires once: it takes itself off ``sys.meta_path`` before the
      module runs, and puts itself back only if running the module failed
      (so a retried ``import joblib`` still registers).
    * :func:`install` is idempotent (one finder at most on ``sys.meta_path``).

Ownership: the finder belongs to this module; ``EXTERNAL_BACKENDS`` and
``BACKENDS`` are joblib's, this module only adds its one entry to each
(``setdefault``: a backend registered as "mpchan" before stays).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Sequence
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

__all__ = ["BACKEND_NAME", "install", "make_backend", "register"]

BACKEND_NAME = "mpchan"
_TARGET = "joblib.parallel"
_lock = threading.Lock()


def register() -> None:
    """Register :class:`mpchan._joblib.MpchanBackend` with joblib as ``"mpchan"``.

    The function joblib calls (through ``EXTERNAL_BACKENDS``) the first time
    the name is used; it imports joblib (and numpy) if they are not yet.
    Never blocks (beyond those imports). Process safety: any thread.
    """
    from . import _joblib

    _joblib.register(BACKEND_NAME)


def make_backend(**kwargs: Any) -> Any:
    """joblib's factory for ``"mpchan"`` until its first use: register the real
    class (which replaces this factory) and return an instance of it.

    ``EXTERNAL_BACKENDS`` serves ``parallel_config`` only; this makes
    ``Parallel(backend="mpchan")`` work too. Never blocks (beyond the imports).
    Process safety: any thread.
    """
    from . import _joblib

    _joblib.register(BACKEND_NAME)
    return _joblib.MpchanBackend(**kwargs)


def _add_entry(parallel: Any) -> None:
    table = getattr(parallel, "EXTERNAL_BACKENDS", None)
    if isinstance(table, dict):
        table.setdefault(BACKEND_NAME, register)
    backends = getattr(parallel, "BACKENDS", None)
    if isinstance(backends, dict):
        backends.setdefault(BACKEND_NAME, make_backend)


class _Loader(Loader):
    """Runs the real loader, then adds the entry."""

    def __init__(self, real: Loader, finder: _Finder) -> None:
        self.real = real
        self.finder = finder

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # The module and its spec should name the real loader (inspect,
        # importlib.resources and reload use it), not this wrapper.
        spec = module.__spec__
        if spec is not None:
            spec.loader = self.real
        module.__loader__ = self.real
        try:
            self.real.exec_module(module)
        except BaseException:
            self.finder.put_back()
            raise
        with contextlib.suppress(Exception):  # joblib still works, without the name
            _add_entry(module)


class _Finder(MetaPathFinder):
    """A one-shot finder that watches for ``joblib.parallel``."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname != _TARGET:
            return None
        try:
            return self._wrapped_spec(fullname, path, target)
        except Exception:
            return None

    def _wrapped_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None
    ) -> ModuleSpec | None:
        with _lock:
            if self not in sys.meta_path:
                return None  # another thread fired it meanwhile
            sys.meta_path.remove(self)
        spec: ModuleSpec | None = None
        try:
            for finder in list(sys.meta_path):
                find = getattr(finder, "find_spec", None)
                if find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        except BaseException:
            self.put_back()
            raise
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            # Not ours to change: let the import go on (and fail) as it would.
            self.put_back()
            return spec
        spec.loader = _Loader(spec.loader, self)
        return spec

    def put_back(self) -> None:
        with _lock:
            if self not in sys.meta_path:
                sys.meta_path.insert(0, self)


_finder = _Finder()


def install() -> None:
    """Make ``"mpchan"`` a joblib backend name, now or when joblib is imported.

    Never blocks; never imports joblib. Process safety: any thread; idempotent.
    """
    parallel = sys.modules.get(_TARGET)
    if parallel is not None and hasattr(parallel, "EXTERNAL_BACKENDS"):
        _add_entry(parallel)
        return
    _finder.put_back()
