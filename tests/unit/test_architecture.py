"""The package's shape, held by tests: no import cycle, small modules, SQL only in the store, a pinned API.

Read from the source (an AST walk), not by importing: an import inside a
function or under ``TYPE_CHECKING`` counts as much as one at the top, since
it is a dependency all the same and hides a cycle just as well.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import pipeline

PACKAGE = Path(pipeline.__file__).resolve().parent
ROOT = PACKAGE.parent
MAX_LINES = 500
# Modules still over MAX_LINES, each with the reason; the list only shrinks.
OVER_LIMIT: dict[str, str] = {}


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool


def modules() -> Iterator[Module]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        yield Module(".".join(parts), path, is_package)


def import_graph() -> dict[str, set[str]]:
    """Every module's imports of other pipeline modules, wherever in the file they are."""
    known = {m.name: m for m in modules()}

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module in known.values():
        package = module.name if module.is_package else module.name.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(module.path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(resolve(alias.name) for alias in node.names if alias.name.startswith("pipeline"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                if base.split(".")[0] != "pipeline":
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    # `from pipeline.engine import tokens` imports the module; else the name's module.
                    targets.add(full if full in known else resolve(base))
        targets.discard(None)
        targets.discard(module.name)
        graph[module.name] = {t for t in targets if t is not None}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path = [root]
        stack = [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            step = next(stack[-1], None)
            if step is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(step) == 1:
                return [*path[path.index(step) :], step]
            elif step not in state:
                state[step] = 1
                path.append(step)
                stack.append(iter(sorted(graph.get(step, ()))))
    return None


def test_import_linter_contracts_hold() -> None:
    """The layers and the driver independence in pyproject.toml's [tool.importlinter]."""
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists():
        pytest.fail("import-linter is missing: pip install -e '.[dev]'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [str(lint), "--no-cache", "--no-logo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_the_graph_sees_every_kind_of_import() -> None:
    # The walk must see what the test exists for: function-local and TYPE_CHECKING imports.
    graph = import_graph()
    assert "pipeline.engine.plan" in graph["pipeline.engine.estimate"]  # top level
    assert "pipeline.engine.drivers.ray.driver" in graph["pipeline.engine.run"]  # inside a function
    assert "pipeline.engine.drivers.ray.cluster" in graph["pipeline.cli.app"]  # under TYPE_CHECKING


def test_find_cycle_finds_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_pipeline() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_driver_imports_another() -> None:
    drivers = ("pipeline.engine.drivers.realtime", "pipeline.engine.drivers.batch", "pipeline.engine.drivers.ray")
    allowed: set[tuple[str, str]] = set()  # none: each driver composes the shared core
    graph = import_graph()
    found = []
    for module, targets in graph.items():
        mine = next((d for d in drivers if module == d or module.startswith(d + ".")), None)
        for target in targets:
            theirs = next((d for d in drivers if target == d or target.startswith(d + ".")), None)
            if mine and theirs and mine != theirs and (module, target) not in allowed:
                found.append(f"{module} imports {target}")
    assert not found, found


def test_no_module_over_the_line_limit() -> None:
    long = {
        m.name: n
        for m in modules()
        if (n := len(m.path.read_text(encoding="utf-8").splitlines())) > MAX_LINES and m.name not in OVER_LIMIT
    }
    assert not long, f"split these modules (at most {MAX_LINES} lines each): {long}"
    stale = [name for name in OVER_LIMIT if name not in {m.name for m in modules()}]
    assert not stale, f"remove from OVER_LIMIT: {stale}"


# SQL as this code base writes it: an upper-case statement keyword opening a string.
SQL = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|PRAGMA|BEGIN|VACUUM)\b")


def sql_strings(tree: ast.AST) -> Iterator[ast.AST]:
    """String literals and f-strings that open with a SQL keyword (docstrings are not code)."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    # The pieces of an f-string are constants too: the f-string is judged as a whole.
    pieces = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    for node in ast.walk(tree):
        if id(node) in docstrings or id(node) in pieces:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value):
            yield node
        elif isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and SQL.match(first.value):
                yield node


def test_the_sql_finder_finds_sql() -> None:
    tree = ast.parse('"""SELECT in a docstring"""\nconn.execute("SELECT 1 FROM t")\nx = f"UPDATE t SET a = {b}"')
    assert len(list(sql_strings(tree))) == 2


def test_sql_only_in_the_store() -> None:
    found = [
        f"{module.name}:{getattr(node, 'lineno', '?')}"
        for module in modules()
        if not module.name.startswith("pipeline.store")
        for node in sql_strings(ast.parse(module.path.read_text(encoding="utf-8")))
    ]
    assert not found, "SQL outside pipeline/store/: " + ", ".join(found)


def test_the_journal_is_opened_read_only_only_by_the_store() -> None:
    """Readers beside a run use ``store.journal.read_only``, not a hand-made read-only open."""
    found = [
        f"{module.name}:{node.lineno}"
        for module in modules()
        if not module.name.startswith("pipeline.store")
        for node in ast.walk(ast.parse(module.path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call) and any(k.arg == "readonly" for k in node.keywords)
    ]
    found += [
        f"{module.name}: mode=ro"
        for module in modules()
        if not module.name.startswith("pipeline.store") and "mode=ro" in module.path.read_text(encoding="utf-8")
    ]
    assert not found, "open the journal with pipeline.store.journal.read_only: " + ", ".join(found)


def test_only_the_front_ends_start_an_event_loop() -> None:
    """``asyncio.run`` in the CLI and the Python API's synchronous calls; the engine runs in their loop."""
    front_ends = ("pipeline.cli", "pipeline.api")
    found = []
    for module in modules():
        if module.name.startswith(front_ends):
            continue
        for node in ast.walk(ast.parse(module.path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "run"
                and isinstance(node.value, ast.Name)
                and node.value.id == "asyncio"
            ):
                found.append(f"{module.name}:{node.lineno}")
    assert not found, "asyncio.run outside the front ends: " + ", ".join(found)


def test_public_api_is_pinned() -> None:
    # Changing the public surface is a decision: update this list and the CHANGELOG together.
    assert sorted(pipeline.__all__) == [
        "CredentialsError",
        "Estimate",
        "Evaluation",
        "ExitCode",
        "IdentityError",
        "InputError",
        "Job",
        "JobError",
        "JobStatus",
        "JournalError",
        "LabelScore",
        "LocalServerError",
        "LockedError",
        "PipelineError",
        "Result",
        "RunSummary",
        "Scores",
        "UserError",
        "VariantEvaluation",
        "aevaluate",
        "arun",
        "estimate",
        "evaluate",
        "load",
        "load_job",
        "run",
        "status",
    ]
    assert all(hasattr(pipeline, name) for name in pipeline.__all__)
