"""The train package's imports flow down (ARCHITECTURE.md): no module of train/ imports trainer.py (the loop
that uses them all) or pipeline.py (the main job above the package), at module level or inside a function.
The package's ``__init__`` is its public face and may name ``train_model``."""

from __future__ import annotations

import ast
from pathlib import Path

import scratchlm.train

ABOVE = {"scratchlm.train.trainer", "scratchlm.pipeline"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from scratchlm.train import trainer`
    return names


def test_no_module_of_train_imports_the_trainer_or_the_pipeline():
    package = Path(scratchlm.train.__file__).parent
    modules = [p for p in sorted(package.glob("*.py")) if p.name != "__init__.py"]
    assert len(modules) > 10  # the package's modules were found
    offenders = {
        p.name: sorted(imported_modules(p) & ABOVE)
        for p in modules
        if p.name != "trainer.py" and imported_modules(p) & ABOVE
    }
    assert not offenders, f"train/ modules importing from above: {offenders}"


def test_the_check_finds_a_function_level_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from scratchlm.train.trainer import micro_steps\n")
    assert "scratchlm.train.trainer" in imported_modules(f)
    f.write_text("from scratchlm.train import trainer\n")
    assert "scratchlm.train.trainer" in imported_modules(f)
