"""dvc.yaml is complete by construction: every repository module a stage runs is one of its dependencies.

A stage's code is `pipeline/stages/<stage>.py` and every module of ast_core and pipeline it imports, directly or
through other modules, at module level or inside a function. Each must be listed in the stage's `deps`, itself
or through a folder, so editing it makes `dvc status` report the stage as changed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ast_core", "pipeline")
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """The repository file of a dotted module name (a module or a package's __init__), or None."""
    base = ROOT / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """Dotted names of the ast_core/pipeline modules a file imports (`from pkg import mod` counts mod)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in PACKAGES and module_file(n) is not None}


def stage_code(stage: str) -> set[Path]:
    """Every repository file stage `stage` runs: its module and everything it imports, transitively."""
    todo, seen = [ROOT / "pipeline" / "stages" / f"{stage}.py"], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(module_file(name) for name in imported_modules(path))
    return {p for p in seen if p.name != "__init__.py" or p.stat().st_size}


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(ROOT).as_posix()
    return any(relative == dep or relative.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "report"] + ["report"])
def test_every_module_a_stage_runs_is_a_dependency(stage: str) -> None:
    spec = STAGES[stage].get("do", STAGES[stage])
    deps = [d for d in spec.get("deps", []) if isinstance(d, str)]
    missing = sorted(p.relative_to(ROOT).as_posix() for p in stage_code(stage) if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage!r} misses deps: {missing}"


def test_the_import_walk_sees_lazy_and_from_imports(tmp_path: Path) -> None:
    code = stage_code("distill")
    for module in ("ast_core/distill.py", "ast_core/settings.py", "pipeline/params.py", "ast_core/init.py"):
        assert ROOT / module in code


STAGE_MODULES = {f"pipeline.stages.{path.stem}" for path in (ROOT / "pipeline" / "stages").glob("*.py")
                 if path.stem != "__init__"}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_imports_another_stage(stage: str) -> None:
    """What two stages share lives in a shared module, so a stage's deps are its own code."""
    imported = imported_modules(ROOT / "pipeline" / "stages" / f"{stage}.py") & STAGE_MODULES
    assert not imported, f"stage {stage!r} imports {sorted(imported)}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_depends_on_no_code_it_does_not_run(stage: str) -> None:
    """An edit to code a stage never runs must not rerun it: its code deps are exactly what it imports."""
    spec = STAGES[stage].get("do", STAGES[stage])
    code = {d for d in spec.get("deps", []) if isinstance(d, str) and d.endswith(".py")}
    runs = {p.relative_to(ROOT).as_posix() for p in stage_code(stage)}
    assert code == runs, f"dvc.yaml stage {stage!r}: extra {sorted(code - runs)}, missing {sorted(runs - code)}"


def test_pipeline_modules_import_no_circle() -> None:
    """No two pipeline modules import each other (directly or through others)."""
    modules = {f"pipeline.{p.stem}": p for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__init__"}
    graph = {name: {m for m in imported_modules(path) if m in modules} for name, path in modules.items()}

    def reaches(start: str, goal: str) -> bool:
        todo, seen = list(graph[start]), set()
        while todo:
            name = todo.pop()
            if name == goal:
                return True
            if name not in seen:
                seen.add(name)
                todo.extend(graph[name])
        return False

    circles = sorted(name for name in graph if reaches(name, name))
    assert not circles, f"modules on an import circle: {circles}"
