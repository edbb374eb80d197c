"""Import rules between packages, read from the source (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import diffprobe

SRC = Path(diffprobe.__file__).resolve().parent  # src/diffprobe


def modules(package: Path):
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield path, ".".join(parts), is_package


def imports(path: Path, module: str, is_package: bool):
    """(imported module, imported name or None) for every import statement in the file, relative ones resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                yield target, alias.name


def test_models_import_neither_guidance_nor_worlds():
    bad = []
    for path, module, is_package in modules(SRC / "models"):
        for target, name in imports(path, module, is_package):
            full = f"{target}.{name}" if name else target
            for forbidden in ("diffprobe.guidance", "diffprobe.worlds"):
                if full == forbidden or full.startswith(forbidden + ".") or target.startswith(forbidden):
                    bad.append(f"{path.relative_to(SRC)}: imports {full}")
    assert bad == [], "models/ must not import guidance or worlds:\n" + "\n".join(bad)


def test_the_import_resolver_sees_relative_and_nested_imports(tmp_path):
    """The rule above can fail: a function-level relative import of guidance is found."""
    (tmp_path / "pkg").mkdir()
    file = tmp_path / "pkg" / "m.py"
    file.write_text("def f():\n    from ..guidance.base import AttentionLayer\n    from . import _hidden\n")
    found = list(imports(file, "diffprobe.models.m", False))
    assert found == [("diffprobe.guidance.base", "AttentionLayer"), ("diffprobe.models", "_hidden")]


def private_imports() -> set[str]:
    found = set()
    for path, module, is_package in modules(SRC):
        for target, name in imports(path, module, is_package):
            if name and name.startswith("_") and not name.startswith("__") and target.startswith("diffprobe"):
                found.add(f"{path.relative_to(SRC).as_posix()}: from {target} import {name}")
    return found


def test_no_module_imports_another_modules_private_names():
    found = sorted(private_imports())
    assert found == [], "private names imported across modules (make them public):\n" + "\n".join(found)
