"""The layer rule of mpchan's architecture, checked by reading every module's imports.

A module may import only from modules of the same or a lower layer. Edge
modules (the facade, the command line, the pytest plugin, integrations and
the trace writer) sit on top: nothing in the layered library imports them,
and the facade ``mpchan/__init__.py`` itself imports only layered modules.

Two more rules keep the roles one-way inside a layer:

- no import cycle, whatever the layers (``TYPE_CHECKING`` imports count:
  a cycle of types is a cycle of design);
- no private name crosses a module: ``from ._x import _name`` and
  ``_x._name`` (on an imported mpchan module) are refused -- a name another
  module needs is public where it is defined; and ``obj._field`` is refused
  where the module defines no ``_field`` itself (it then reaches into an
  object another module owns), but for the few private names of the
  standard library that have no public spelling (``STDLIB_PRIVATE``) and
  for ``self._field`` (a class's own members, inherited ones included).
"""

from __future__ import annotations

import ast
import fnmatch
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "mpchan"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE

EDGE = "edge"
FACADE = "__init__"

# Module names are relative to the package ("_channel", "testing.plugin");
# the facade mpchan/__init__.py is "__init__". Listed modules need not exist.
LAYERS: dict[str, int | str] = {
    "_errors": 0,
    "_compat": 0,
    "_clock": 0,
    "_lifecycle": 0,
    "_policy": 0,
    "_codec": 1,
    "_shm": 1,
    "_wake": 1,
    "_park": 1,
    "_core": 1,  # C extension
    "_reaper": 1,
    "_ring": 2,
    "_lock": 2,
    "_context": 3,
    "_channel": 4,
    "_channel_*": 4,
    "_timer": 4,
    "_select": 5,
    "_sync": 5,
    "_worker": 6,
    "_pool.worker": 6,  # the child side of a pool
    "_supervisor": 6,
    "_supervisor_*": 6,
    "_metrics": 6,  # the supervisor owns the metrics server
    "_go": 7,
    "_pool": 7,
    "_pool.*": 7,
    "_group": 7,
    "_stream": 8,
    "_stream_*": 8,
    "_fan": 8,
    "_main": 8,
    "_joblib": 8,  # joblib's "mpchan" backend, on the public Pool
    "_joblib_hook": 8,  # the facade installs it; it imports _joblib lazily
    FACADE: EDGE,
    "__main__": EDGE,
    "cli": EDGE,
    "testing": EDGE,
    "testing.plugin": EDGE,
    "integrations": EDGE,
    "integrations.*": EDGE,
    "_trace": EDGE,
}


def layer_of(name: str) -> int | str | None:
    """The layer of a package-relative module name, or None when it is not in the table."""
    if name in LAYERS:
        return LAYERS[name]
    for pattern, layer in LAYERS.items():
        if "*" in pattern and fnmatch.fnmatchcase(name, pattern):
            return layer
    return None


def module_name(path: Path, root: Path = PACKAGE_DIR) -> str:
    """``root/_channel.py`` -> ``_channel``; ``root/testing/__init__.py`` -> ``testing``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def discover(root: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every Python module of the package, by package-relative name."""
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


@dataclass(frozen=True)
class Import:
    target: str  # package-relative module name, FACADE for "import mpchan"
    line: int


def _is_known(name: str, existing: set[str]) -> bool:
    return name in existing or layer_of(name) is not None


def imports_of(source: str, name: str, *, is_package: bool, existing: set[str]) -> list[Import]:
    """The mpchan modules that ``source`` (the module ``name``) imports, anywhere in it.

    ``from mpchan import X`` counts as importing the submodule ``X`` when such
    a module exists or is in the table, and as importing the facade otherwise.
    """
    tree = ast.parse(source)
    # The package a relative import is resolved against, as dotted parts.
    package = name.split(".") if is_package and name != FACADE else name.split(".")[:-1]
    found: list[Import] = []

    def base_of(module: str | None, level: int) -> str | None:
        """Package-relative base of an import, "" for the package itself, None if foreign."""
        if level:
            if level - 1 > len(package):
                raise ValueError(f"{name}: relative import beyond the package")
            parts = package[: len(package) - (level - 1)]
            if module:
                parts = [*parts, *module.split(".")]
            return ".".join(parts)
        if module is None:
            return None
        if module == PACKAGE:
            return ""
        if module.startswith(PACKAGE + "."):
            return module[len(PACKAGE) + 1 :]
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                base = base_of(alias.name, 0)
                if base is not None:
                    found.append(Import(base or FACADE, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = base_of(node.module, node.level)
            if base is None:
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                if alias.name != "*" and _is_known(candidate, existing):
                    found.append(Import(candidate, node.lineno))
                else:
                    found.append(Import(base or FACADE, node.lineno))
    return found


def violations(name: str, imports: list[Import], *, existing: set[str]) -> list[str]:
    """Human-readable breaches of the layer rule by module ``name``."""
    own = layer_of(name)
    problems: list[str] = []
    for imp in imports:
        target = imp.target
        if target == name:
            continue
        where = f"{name} (line {imp.line}) imports {target}"
        theirs = layer_of(target)
        if theirs is None:
            if target in existing:
                continue  # reported once, as an unknown module, by its own test
            problems.append(f"{where}, which is not in the layer table")
        elif own == EDGE:
            if name == FACADE and theirs == EDGE:
                problems.append(f"{where}: the facade imports only layered modules")
        elif theirs == EDGE:
            problems.append(f"{where}: library modules never import edge modules")
        elif isinstance(own, int) and isinstance(theirs, int) and theirs > own:
            problems.append(f"{where}: layer {own} may not import layer {theirs}")
    return problems


def all_imports(root: Path = PACKAGE_DIR) -> tuple[set[str], dict[str, list[Import]]]:
    """(every module name, module -> the imports found in it) of the package at ``root``."""
    modules = discover(root)
    existing = set(modules)
    found = {
        name: imports_of(
            path.read_text(encoding="utf-8"),
            name,
            is_package=path.name == "__init__.py",
            existing=existing,
        )
        for name, path in modules.items()
    }
    return existing, found


def check_package(root: Path = PACKAGE_DIR) -> tuple[list[str], list[str]]:
    """(unknown modules, layer violations) of the package at ``root``."""
    existing, found = all_imports(root)
    unknown = sorted(m for m in existing if layer_of(m) is None)
    problems: list[str] = []
    for name, imports in found.items():
        problems.extend(violations(name, imports, existing=existing))
    return unknown, problems


def import_graph(root: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module -> the package modules it imports (the facade as FACADE)."""
    existing, found = all_imports(root)
    return {
        name: {i.target for i in imports if i.target != name and i.target in existing}
        for name, imports in found.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


def _package_of(name: str, is_package: bool) -> list[str]:
    if name == FACADE:
        return []
    return name.split(".") if is_package else name.split(".")[:-1]


def private_crossings(root: Path = PACKAGE_DIR) -> list[str]:
    """``from ._x import _name`` and ``_x._name`` uses, as readable lines."""
    modules = discover(root)
    existing = set(modules)
    problems: list[str] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = _package_of(name, path.name == "__init__.py")
        aliases: dict[str, str] = {}  # local name -> package module it is bound to

        def resolve(module: str | None, level: int, package: list[str] = package) -> str | None:
            if level:
                parts = package[: len(package) - (level - 1)]
                return ".".join([*parts, *(module.split(".") if module else [])])
            if module == PACKAGE:
                return ""
            if module and module.startswith(PACKAGE + "."):
                return module[len(PACKAGE) + 1 :]
            return None

        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = resolve(node.module, node.level)
                if base is None:
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}" if base else alias.name
                    if full in existing or layer_of(full) is not None:
                        aliases[alias.asname or alias.name] = full  # a module
                    elif alias.name.startswith("_") and not alias.name.startswith("__"):
                        where = base or FACADE
                        problems.append(
                            f"{name} (line {node.lineno}) imports {alias.name} from {where}"
                        )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    base = resolve(alias.name, 0)
                    if base and alias.asname:
                        aliases[alias.asname] = base
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and aliases[node.value.id] != name
            ):
                problems.append(f"{name} (line {node.lineno}) uses {node.value.id}.{node.attr}")
    return sorted(set(problems))


STDLIB_PRIVATE = {"os._exit", "util._run_finalizers", "sys._getframe"}
"""``base.attr`` uses of the standard library's private names, allowed."""


def foreign_private_attributes(root: Path = PACKAGE_DIR) -> list[str]:
    """``obj._field`` uses of a private attribute the module itself never
    defines (assigns, defines as a function or class, names in ``__slots__``)."""
    problems: list[str] = []
    for name, path in discover(root).items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, ast.arg):
                defined.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                defined.add(node.value)  # __slots__ entries, getattr(obj, "_x")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr not in defined
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                use = f"{ast.unparse(node.value)}.{node.attr}"
                if use not in STDLIB_PRIVATE:
                    problems.append(f"{name} (line {node.lineno}) uses {use}")
    return sorted(problems)


def test_every_module_is_in_the_layer_table() -> None:
    unknown, _ = check_package()
    assert not unknown, (
        f"modules not in the layer table: {', '.join(unknown)}; "
        "add them to LAYERS in tests/test_layers.py"
    )


def test_imports_respect_the_layers() -> None:
    _, problems = check_package()
    assert not problems, "layer violations:\n  " + "\n  ".join(problems)


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_no_private_name_crosses_a_module() -> None:
    problems = private_crossings() + foreign_private_attributes()
    assert not problems, "private names used across modules:\n  " + "\n  ".join(problems)


# The checker itself, on a throwaway package, so a silent checker cannot pass.


def test_cycle_checker_finds_same_layer_cycles(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "__init__.py": "",
            "_go.py": "from ._group import Group\n",
            "_group.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._go import go\n"
            ),
            "_errors.py": "",
            "_fan.py": "from . import _errors\n",
        },
    )
    assert cycles(import_graph(tmp_path)) == [["_go", "_group"]]


def test_foreign_private_attribute_checker(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "__init__.py": "",
            "_go.py": (
                "class A:\n    __slots__ = ('_x',)\n    def _m(self): return self._x\n"
                "def f(a, b):\n    a._x; a._m(); b._other; os._exit(0)\n"
                "class B(A):\n    def g(self): return self._base\n"
            ),
        },
    )
    assert foreign_private_attributes(tmp_path) == ["_go (line 5) uses b._other"]


def test_private_name_checker(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "__init__.py": "",
            "_errors.py": "_hidden = 1\npublic = 2\n",
            "_go.py": (
                "from ._errors import _hidden, public\nfrom . import _errors\n"
                "x = _errors._hidden\ny = _errors.__name__\n"
            ),
            "_group.py": "from . import _errors as e\nz = e._hidden\n_own = 1\nw = _own\n",
        },
    )
    assert private_crossings(tmp_path) == [
        "_go (line 1) imports _hidden from _errors",
        "_go (line 3) uses _errors._hidden",
        "_group (line 2) uses e._hidden",
    ]


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_checker_accepts_downward_and_same_layer_imports(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "__init__.py": "from ._channel import Channel\nfrom . import _errors\n",
            "_errors.py": "",
            "_clock.py": "from mpchan._errors import MpchanError\n",
            "_channel.py": "from . import _clock, _core\nimport mpchan._timer\n",
            "_timer.py": "from mpchan import _errors\n",
            "cli.py": "import mpchan\nfrom mpchan import Channel\nfrom mpchan._errors import X\n",
            "__main__.py": "from .cli import main\n",
            "testing/__init__.py": "",
            "testing/plugin.py": "from .. import Channel\nimport os, pytest\n",
        },
    )
    assert check_package(tmp_path) == ([], [])


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"_clock.py": "from ._channel import Channel\n"}, "layer 0 may not import layer 4"),
        ({"_clock.py": "import mpchan._pool\n"}, "layer 0 may not import layer 7"),
        ({"_ring.py": "def f():\n    from mpchan import _context\n"}, "layer 2 may not"),
        ({"_channel.py": "import mpchan\n"}, "never import edge"),
        ({"_channel.py": "from mpchan import Channel\n"}, "never import edge"),
        ({"_pool.py": "from .cli import main\n"}, "never import edge"),
        ({"_fan.py": "from .testing import plugin\n"}, "never import edge"),
        ({"__init__.py": "from .cli import main\n"}, "the facade imports only layered"),
        ({"_channel.py": "from ._nowhere import x\n"}, "not in the layer table"),
    ],
)
def test_checker_reports_violations(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    _write(tmp_path, {"__init__.py": "", "_channel.py": "", "cli.py": "", **files})
    _write(tmp_path, {"testing/__init__.py": "", "testing/plugin.py": ""})
    unknown, problems = check_package(tmp_path)
    assert unknown == []
    assert len(problems) == 1, problems
    assert expected in problems[0]


def test_checker_reports_unknown_modules(tmp_path: Path) -> None:
    _write(tmp_path, {"__init__.py": "", "_mystery.py": "", "extra/__init__.py": ""})
    unknown, _ = check_package(tmp_path)
    assert unknown == ["_mystery", "extra"]


def test_layer_table_patterns() -> None:
    assert layer_of("integrations.joblib") == EDGE
    assert layer_of("_core") == 1
    assert layer_of("_unknown") is None
