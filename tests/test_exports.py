"""The public surface: what ``mpchan`` exports, and what its docstrings promise.

``mpchan/__init__.py`` names each public name three times -- in ``__all__``,
in the lazy export table (``_EXPORTS``, PEP 562) and in the imports type
checkers read under ``TYPE_CHECKING``. These tests keep the three in
agreement, and check that every name resolves to the object its module
defines.

The docstring rule (STYLE.md, Documentation): every public callable says
whether it blocks. One that can block says when under ``Blocks:``, what a
cancelled context or a timeout does under ``Cancellation:``, and who may
call it at once under ``Process safety:``; one that never blocks says so
("Never blocks" or "Blocks: never"). Context-manager exits count: leaving
a ``with`` block can wait.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mpchan

FACADE = Path(mpchan.__file__)
EXTRA = {"__version__", "shutdown"}  # defined in the facade itself


def _type_checking_imports() -> dict[str, str]:
    """Public name -> module, from the ``if TYPE_CHECKING:`` block of the facade."""
    tree = ast.parse(FACADE.read_text(encoding="utf-8"))
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.level == 1, ast.unparse(stmt)
                for alias in stmt.names:
                    assert alias.asname == alias.name, f"{alias.name}: re-export as itself"
                    assert stmt.module is not None
                    found[alias.name] = stmt.module
    return found


def test_all_and_the_lazy_table_name_the_same_things() -> None:
    exports = mpchan._EXPORTS  # type: ignore[attr-defined]
    assert set(mpchan.__all__) == set(exports) | EXTRA
    assert len(mpchan.__all__) == len(set(mpchan.__all__)), "a name twice in __all__"


def test_type_checking_imports_agree_with_the_lazy_table() -> None:
    exports = mpchan._EXPORTS  # type: ignore[attr-defined]
    assert _type_checking_imports() == exports


@pytest.mark.parametrize("name", sorted(mpchan._EXPORTS))  # type: ignore[attr-defined]
def test_every_export_resolves_to_its_modules_object(name: str) -> None:
    module = importlib.import_module(f"mpchan.{mpchan._EXPORTS[name]}")  # type: ignore[attr-defined]
    assert getattr(mpchan, name) is getattr(module, name)
    assert name in dir(mpchan)


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = mpchan.nothing_here  # type: ignore[attr-defined]


# ------------------------------------------------------------------ docstrings

_DUNDERS = {"__enter__", "__exit__", "__aenter__", "__aexit__", "__iter__", "__next__"}
_NEVER = re.compile(r"never blocks|blocks: never", re.IGNORECASE)
# "Blocks, Cancellation, Process safety: as :meth:`close`." -- all three by reference
_AS = re.compile(r"Blocks, Cancellation,? (and )?Process safety: as ")


def _public_callables() -> Iterator[tuple[str, Any]]:
    for name in sorted(mpchan.__all__):
        obj = getattr(mpchan, name)
        if not inspect.isclass(obj):
            if callable(obj):
                yield name, obj
            continue
        if issubclass(obj, BaseException):
            continue  # the error classes: documented, nothing to block
        for attr, value in inspect.getmembers(obj):
            if attr.startswith("_") and attr not in _DUNDERS:
                continue
            fn = value.fget if isinstance(value, property) else value
            if not callable(fn) or not (getattr(fn, "__module__", "") or "").startswith("mpchan"):
                continue  # inherited from the standard library (Executor, Future)
            yield f"{name}.{attr}", fn


def _doc_problem(fn: Any) -> str | None:
    doc = inspect.getdoc(fn) or ""
    if not doc:
        return "no docstring"
    if _NEVER.search(doc) or _AS.search(doc):
        return None
    if "Blocks:" not in doc:
        return "says neither 'Blocks:' nor 'Never blocks'"
    missing = [k for k in ("Cancellation:", "Process safety:") if k not in doc]
    return f"blocks, but has no {' / '.join(missing)}" if missing else None


def test_every_exported_class_and_error_has_a_docstring() -> None:
    missing = [n for n in mpchan.__all__ if n != "__version__" and not getattr(mpchan, n).__doc__]
    assert not missing


def test_every_public_callable_says_whether_and_how_it_blocks() -> None:
    problems = [f"{q}: {why}" for q, fn in _public_callables() if (why := _doc_problem(fn))]
    assert not problems, "docstrings that break the rule:\n  " + "\n  ".join(problems)


def test_the_docstring_rule_itself() -> None:
    def quiet() -> None:
        """Do a thing. Never blocks."""

    def waits() -> None:
        """Wait.

        Blocks: until done.
        Cancellation: a cancelled ctx raises Cancelled.
        Process safety: any thread.
        """

    def half() -> None:
        """Wait.

        Blocks: until done.
        """

    def silent() -> None:
        """Do a thing."""

    def same() -> None:
        """Wait as another does.

        Blocks, Cancellation, Process safety: as :func:`waits`.
        """

    assert _doc_problem(quiet) is None
    assert _doc_problem(waits) is None
    assert _doc_problem(same) is None
    assert _doc_problem(half) == "blocks, but has no Cancellation: / Process safety:"
    assert _doc_problem(silent) == "says neither 'Blocks:' nor 'Never blocks'"
    assert _doc_problem(lambda: None) == "no docstring"
