"""The packages' one-way dependencies, checked statically: storage imports neither of the others;
the labeling service and the trainer each import storage and never each other. Inside the
service, the task bodies (``labeler_service.tasks``) are imported by the worker's start-up alone:
the API and the job and registration stores send tasks by name through ``labeler_service.queue``,
and nothing imports back up into the API. (Any import, at any depth, lazy ones inside functions
included.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"storage": {"labeler_service", "trainer"},
             "labeler_service": {"trainer"},
             "trainer": {"labeler_service"}}


# modules -> what they may not import (a module or a package prefix)
SERVICE_FORBIDDEN = {
    "labeler_service/api": {"labeler_service.tasks"},
    "labeler_service/api/routes": {"labeler_service.api.routes"},  # routes share api/lookups.py
    "labeler_service/jobs.py": {"labeler_service.tasks", "labeler_service.api"},
    "labeler_service/registrations.py": {"labeler_service.tasks", "labeler_service.api"},
    "labeler_service/queue.py": {"labeler_service.tasks", "labeler_service.api",
                                 "labeler_service.jobs"},
    "labeler_service/keys.py": {"labeler_service"},
    "labeler_service/tasks.py": {"labeler_service.api"},
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def imported_packages(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imported_modules(path)}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_goes_the_wrong_way(package):
    wrong = {f"{path.relative_to(ROOT)} imports {name}"
             for path in sorted((ROOT / package).rglob("*.py"))
             for name in imported_packages(path) & FORBIDDEN[package]}
    assert not wrong, sorted(wrong)


@pytest.mark.parametrize("where", sorted(SERVICE_FORBIDDEN))
def test_the_service_imports_task_bodies_only_to_run_them(where):
    target = ROOT / where
    paths = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    wrong = {f"{path.relative_to(ROOT)} imports {name}"
             for path in paths for name in imported_modules(path)
             for banned in SERVICE_FORBIDDEN[where]
             if name == banned or name.startswith(banned + ".")}
    assert not wrong, sorted(wrong)


def test_only_the_worker_command_imports_the_task_bodies():
    importers = {str(path.relative_to(ROOT))
                 for path in sorted((ROOT / "labeler_service").rglob("*.py"))
                 if any(name == "labeler_service.tasks" for name in imported_modules(path))}
    assert importers == {"labeler_service/cli.py"}


def test_the_check_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from labeler_service.labeling import x\n")
    assert "labeler_service" in imported_packages(bad)
    bad.write_text("from labeler_service import tasks\n")
    assert "labeler_service.tasks" in imported_modules(bad)


# -- no circle anywhere -------------------------------------------------------------------------

PACKAGES = ("storage", "labeler_service", "trainer")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_edges(path: Path, own: str, modules: set[str]) -> set[str]:
    """The project modules ``path`` (module ``own``) imports, at any depth (lazy imports inside
    functions included): ``from a.b import c`` is an edge to ``a.b.c`` when that is a module,
    else to ``a.b``. A package's ``__init__`` run on the way to a submodule is not an edge of
    its own: Python has it under way already, so it closes no circle."""
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        edges |= {target for target in targets if target in modules and target != own}
    return edges


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    paths = [path for package in packages for path in sorted((root / package).rglob("*.py"))]
    names = {path: module_name(path, root) for path in paths}
    return {name: import_edges(path, name, set(names.values())) for path, name in names.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_round_a_circle():
    """No circle of imports between modules, lazy imports counted (a lazy import hides a circle
    from Python, not from the next reader)."""
    assert cycles(import_graph()) == []


def test_the_circle_check_sees_a_planted_circle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import f\n")
    (package / "b.py").write_text("def f():\n    from pkg import a\n")
    (package / "c.py").write_text("from . import a\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
