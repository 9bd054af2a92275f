"""Validating the settings stays cheap (issue #17) and every setting is declared once (issue #18).

`ast-dd params` must reject a bad file in well under 3 s, so the settings path (`pipeline.params`,
`pipeline.cli` with its plugin commands) may not import torch, scikit-learn, MLflow, Prefect or DVC; every
name registry and settings dataclass lives in `ast_core.settings` and nowhere else.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "sklearn", "mlflow", "prefect", "dvc")

# Every registry and settings class `ast_core.settings` owns; the modules that use them import them from there.
SETTINGS_NAMES = (
    "IMAGENET_SUBSETS", "DATASETS", "DIGIT_DATASETS", "ARCHITECTURES", "PROTOCOLS", "INIT_METHODS",
    "CORESET_METHODS", "BETA_MODES", "OPTIMIZERS", "GP_NORMS", "GP_SIDES", "CLIP_SCHEDULES",
    "SAMPLING", "INTERMEDIATE_WEIGHTS", "GRADIENT_MODES", "PERTURB_FORMS", "DENOMINATORS", "BALANCE_MIDDLES",
    "DEFAULT_STRATEGY", "FAMILIES", "DistillConfig", "ExpertConfig", "parse_dsa_strategy", "dsa_strategy_for",
    "check_balance", "EVAL_SPLITS", "EvalSpec",
)

# (module, name) pairs existing callers import: they must stay importable and be the settings' own objects.
REEXPORTS = (
    ("ast_core.data", "DATASETS"), ("ast_core.data", "IMAGENET_SUBSETS"), ("ast_core.distill", "DistillConfig"),
    ("ast_core.experts", "ExpertConfig"), ("ast_core.evaluate", "PROTOCOLS"),
    ("ast_core.evaluate", "EVAL_SPLITS"), ("ast_core.evaluate", "EvalSpec"), ("ast_core.init", "INIT_METHODS"),
    ("ast_core.models", "ARCHITECTURES"), ("ast_core.trajectory", "BETA_MODES"),
    ("ast_core.baselines", "CORESET_METHODS"), ("ast_core.augment", "FAMILIES"),
    ("ast_core.augment", "DEFAULT_STRATEGY"), ("ast_core.augment", "dsa_strategy_for"),
    ("ast_core.losses", "GP_NORMS"),
)


def test_settings_path_imports_nothing_heavy() -> None:
    code = ("import json, sys\n"
            "import ast_core.settings, pipeline.params, pipeline.cli\n"
            "pipeline.cli.build_parser()  # loads the plugin commands (flows) as `ast-dd params` does\n"
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            check=True)
    assert json.loads(result.stdout.splitlines()[-1]) == []


def top_level_names(path: Path) -> set[str]:
    """Names a module binds at its top level by assignment, class or function definition (not by import)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ClassDef | ast.FunctionDef):
            names.add(node.name)
    return names


def test_each_setting_is_declared_once_in_settings() -> None:
    sources = [p for folder in ("ast_core", "pipeline", "flows") for p in sorted((ROOT / folder).rglob("*.py"))]
    defined = {name: [p.relative_to(ROOT).as_posix() for p in sources if name in top_level_names(p)]
               for name in SETTINGS_NAMES}
    assert {name: where for name, where in defined.items() if where != ["ast_core/settings.py"]} == {}
    assert not [p for p in sources if "CORESET_BASELINES" in top_level_names(p)]  # params uses CORESET_METHODS


@pytest.mark.parametrize(("module", "name"), REEXPORTS)
def test_old_import_paths_still_work(module: str, name: str) -> None:
    settings = importlib.import_module("ast_core.settings")
    assert getattr(importlib.import_module(module), name) is getattr(settings, name)


def test_the_project_imports_each_ast_core_name_from_the_module_that_defines_it() -> None:
    """Old paths keep working for users' scripts (above); the project's own code uses one path per name."""
    sources = [p for folder in ("ast_core", "pipeline", "flows", "tests", "benchmarks")
               for p in sorted((ROOT / folder).rglob("*.py"))]
    indirect = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ast_core."):
                owner = ROOT / (node.module.replace(".", "/") + ".py")
                indirect += [f"{path.relative_to(ROOT)}: {alias.name} from {node.module}" for alias in node.names
                             if alias.name not in top_level_names(owner)]
    assert indirect == []
