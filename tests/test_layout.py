"""The layering: `contract` sits below `export` and `serving`, which never import each other."""

from __future__ import annotations

import ast

import pytest

from contract.layout import REPO_ROOT

FORBIDDEN = {"contract": {"export", "serving", "client"}, "export": {"serving", "client"}, "serving": {"export"}}


def imported_packages(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", FORBIDDEN)
def test_no_upward_or_sideways_imports(package):
    offenders = {str(path.relative_to(REPO_ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
                 for path in sorted((REPO_ROOT / package).rglob("*.py"))}
    assert {path: names for path, names in offenders.items() if names} == {}
