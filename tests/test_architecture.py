"""The packages' one-way dependencies, checked statically: storage imports neither of the others;
the labeling service and the trainer each import storage and never each other. (Any import, at
any depth, lazy ones inside functions included.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"storage": {"labeler_service", "trainer"},
             "labeler_service": {"trainer"},
             "trainer": {"labeler_service"}}


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_goes_the_wrong_way(package):
    wrong = {f"{path.relative_to(ROOT)} imports {name}"
             for path in sorted((ROOT / package).rglob("*.py"))
             for name in imported_packages(path) & FORBIDDEN[package]}
    assert not wrong, sorted(wrong)


def test_the_check_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from labeler_service.labeling import x\n")
    assert "labeler_service" in imported_packages(bad)
