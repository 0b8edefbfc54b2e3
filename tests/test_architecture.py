"""The architecture stays as docs/architecture.md draws it.

* The import contracts in ``pyproject.toml`` (``[tool.importlinter]``: the layers, the root
  facades on top, ``alembic/`` beside, no cycle between siblings) hold; ``.ci/test`` runs the
  same ``lint-imports`` as a step of its own.
* No module is over ``MAX_MODULE_LINES`` lines, no class over ``MAX_CLASS_LINES`` lines, unless
  its docstring says why with the phrase ``LONG_BECAUSE`` ("Long because ...").
* No module imports a private name (``_name``) of another module of the package: make it public
  or move it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sqlalchemy_q4m"

MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 250
LONG_BECAUSE = "Long because"


def modules() -> Iterator[tuple[str, Path]]:
    """Each module of the package: its path relative to the package, and its file."""
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), path


def dotted_name(relative: str) -> str:
    """``worker/consumer.py`` -> ``sqlalchemy_q4m.worker.consumer`` (packages: their name)."""
    parts = ["sqlalchemy_q4m", *relative.removesuffix(".py").split("/")]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_import_contracts_hold() -> None:
    """``lint-imports`` keeps every contract of ``[tool.importlinter]`` in ``pyproject.toml``."""
    pytest.importorskip("importlinter", reason="import-linter is in the dev extra")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; "
            "sys.exit(lint_imports_command())",
            "--no-cache",
            "--no-logo",
            str(ROOT / "pyproject.toml"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        pytest.fail(result.stdout + result.stderr, pytrace=False)


def test_modules_and_classes_are_short() -> None:
    long_modules: set[str] = set()
    long_classes: set[str] = set()
    for relative, path in modules():
        source = path.read_text(encoding="utf-8")
        if len(source.splitlines()) > MAX_MODULE_LINES:
            long_modules.add(relative)
        for node in ast.walk(ast.parse(source, filename=str(path))):
            if not isinstance(node, ast.ClassDef):
                continue
            assert node.end_lineno is not None
            size = node.end_lineno - node.lineno + 1
            if size > MAX_CLASS_LINES and LONG_BECAUSE not in (ast.get_docstring(node) or ""):
                long_classes.add(f"{relative}:{node.name}")
    problems = [f"{m}: module over {MAX_MODULE_LINES} lines" for m in sorted(long_modules)]
    problems += [
        f"{c}: class over {MAX_CLASS_LINES} lines whose docstring does not say '{LONG_BECAUSE} ...'"
        for c in sorted(long_classes)
    ]
    assert not problems, "\n".join(problems)


def private_imports(relative: str, tree: ast.Module) -> Iterator[str]:
    """The private names of other package modules that this module imports.

    ``from .x import _name`` (at any depth, also inside functions and ``TYPE_CHECKING``), and
    ``x._name`` where ``x`` is a package module bound by an import.
    """
    here = dotted_name(relative).split(".")
    package = here if relative.endswith("__init__.py") else here[:-1]
    bound: dict[str, str] = {}  # local name -> package module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            if source != "sqlalchemy_q4m" and not source.startswith("sqlalchemy_q4m."):
                continue
            for alias in node.names:
                if is_private(alias.name):
                    yield f"{source}.{alias.name}"
                else:
                    # ``from ..backends import pinned``: maybe a module, its privates count too
                    bound[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sqlalchemy_q4m.") and alias.asname:
                    bound[alias.asname] = alias.name
    own = dotted_name(relative)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and is_private(node.attr)
            and bound[node.value.id] != own
        ):
            yield f"{bound[node.value.id]}.{node.attr}"


def test_no_private_names_imported_across_modules() -> None:
    found = {
        f"{relative}: {name}"
        for relative, path in modules()
        for name in private_imports(
            relative, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        )
    }
    assert not found, "imports a private name of another module:\n" + "\n".join(sorted(found))


def test_the_checker_sees_private_imports() -> None:
    """The private-import checker resolves relative imports and module aliases."""
    tree = ast.parse(
        "from ..server import _validate, check_server\n"
        "from . import enqueue\n"
        "from ..backends import pinned as keeping\n"
        "def f():\n"
        "    from .enqueue import _groups\n"
        "    return enqueue._shape_for, keeping._lock, keeping.public, self._mine\n"
    )
    assert sorted(private_imports("producer/unique.py", tree)) == [
        "sqlalchemy_q4m.backends.pinned._lock",
        "sqlalchemy_q4m.producer.enqueue._groups",
        "sqlalchemy_q4m.producer.enqueue._shape_for",
        "sqlalchemy_q4m.server._validate",
    ]
