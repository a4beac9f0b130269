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
