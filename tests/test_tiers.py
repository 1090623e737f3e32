"""The package's import structure: its tiers, and what importing a module brings in.

The tiers, lowest first (issue 22): the shared leaves (``errors``, ``driver``: the
contract, ``crashpoints``, ``options``, ``progress``), ``host`` (the machine's
primitives), ``archive`` (the tar engine), ``store``, ``backends``, ``registry``
(backends by name), ``image``, ``frontends``.  A module imports only from its own tier
or lower ones, at module level or inside a function (imports under ``if
TYPE_CHECKING:`` do not run, and do not count; nor do imports by name through
``importlib``, as the registry's of the built-in backends).  The modules are parsed,
not imported.  ``lamina/__init__.py`` (the public API, gathered from several tiers)
and ``lamina/__main__.py`` belong to none; importing the package itself (``import
lamina``, ``from lamina import open_driver``) counts as importing the highest tier
that ``lamina/__init__.py`` imports.

Importing one backend module registers that one backend, and nothing else does.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lamina"

TIERS: tuple[tuple[str, ...], ...] = (
    ("lamina.errors", "lamina.driver", "lamina.crashpoints", "lamina.options",
     "lamina.progress"),
    ("lamina.host",),
    ("lamina.archive",),
    ("lamina.store",),
    ("lamina.backends",),
    ("lamina.registry",),
    ("lamina.image",),
    ("lamina.frontends",),
)
EXEMPT = ("lamina", "lamina.__main__")

KNOWN_UPWARD: set[tuple[str, str]] = set()
"""Upward imports that are known and not yet fixed: (importer, imported)."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _tier(module: str) -> int | None:
    for i, prefixes in enumerate(TIERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: not those under ``if TYPE_CHECKING:``."""
    yield from _walk(ast.iter_child_nodes(tree))


def _walk(nodes: Iterable[ast.AST]) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in nodes:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING",
                                                                  "typing.TYPE_CHECKING"):
            yield from _walk(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _walk(ast.iter_child_nodes(node))


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules of lamina that an import statement of ``module`` imports."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if MODULES[module].name == "__init__.py" else \
                module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        # ``from package import name``: the submodule ``name`` if there is one.
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                 for alias in node.names]
    return [n for n in names if n == "lamina" or n.startswith("lamina.")]


def _facade_tier() -> int:
    """The tier of ``lamina`` itself: the highest its ``__init__`` imports."""
    tree = ast.parse(MODULES["lamina"].read_text())
    tiers = [_tier(name) for node in _runtime_imports(tree)
             for name in _imported("lamina", node)]
    return max(t for t in tiers if t is not None)


def _upward_imports() -> list[tuple[str, str, str]]:
    """(importer, imported, where and what) of every import of a higher tier."""
    facade = _facade_tier()
    found = []
    for module, path in MODULES.items():
        if module in EXEMPT:
            continue
        mine = _tier(module)
        assert mine is not None, f"{module} is in no tier: add it to TIERS"
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            for name in _imported(module, node):
                theirs = facade if name == "lamina" else _tier(name)
                assert theirs is not None, f"{module} imports {name}, which is in no tier"
                if theirs > mine:
                    where = (f"{path.relative_to(REPO)}:{node.lineno}: {module} (tier {mine}) "
                             f"imports {name} (tier {theirs}): {ast.unparse(node)}")
                    found.append((module, name, where))
    return found


def test_no_module_imports_a_higher_tier() -> None:
    upward = [(importer, imported, where) for importer, imported, where in _upward_imports()
              if not any(importer == k and (imported == v or imported.startswith(v + "."))
                         for k, v in KNOWN_UPWARD)]
    for _, _, where in upward:
        print(where)
    assert not upward, "imports of a higher tier:\n" + "\n".join(w for _, _, w in upward)


def test_the_known_upward_imports_are_still_there() -> None:
    """A known one that is fixed comes off :data:`KNOWN_UPWARD`."""
    seen = {(importer, imported) for importer, imported, _ in _upward_imports()}
    gone = {(k, v) for k, v in KNOWN_UPWARD
            if not any(k == i and (n == v or n.startswith(v + ".")) for i, n in seen)}
    assert not gone, f"fixed, take them off KNOWN_UPWARD: {sorted(gone)}"


def test_the_checker_sees_an_upward_import() -> None:
    """The parse finds imports inside functions and skips TYPE_CHECKING ones."""
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from lamina.frontends import cli\n"
        "else:\n    from lamina.store import layers\n"
        "def f():\n    import lamina.image.spec\n    from lamina import registry, errors\n")
    names = [n for node in _runtime_imports(tree) for n in _imported("lamina.host.fsutil", node)]
    assert names == ["lamina.store.layers", "lamina.image.spec", "lamina.registry",
                     "lamina.errors"]


def _fresh(code: str) -> object:
    """What ``code`` prints as JSON, run in a fresh interpreter (nothing imported yet)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def test_importing_one_backend_registers_that_one() -> None:
    for name in ("overlay", "vfs", "windowsfilter"):
        seen = _fresh(
            f"import json, sys, lamina.backends.{name}\n"
            "from lamina import registry\n"
            "print(json.dumps([sorted(registry._backends),\n"
            "    sorted(m for m in sys.modules if m in registry.BUILTIN_BACKENDS)]))")
        assert seen == [[name], [f"lamina.backends.{name}"]]


def test_the_registry_loads_every_builtin_backend() -> None:
    seen = _fresh("import json, lamina\nprint(json.dumps(lamina.registry.backends(None)))")
    assert seen == ["overlay", "vfs", "windowsfilter"]
