"""The code's shape: size limits, public interfaces between modules, arrows that point one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("experiments", "tuning", "registry")
MAX_FILE_LINES, MAX_TRAIN_LINES, MAX_FUNCTION_LINES, MAX_TRAIN_FUNCTION_LINES = 400, 250, 80, 60
MAX_CLOSURE_LINES = 6  # a nested function of a few lines, passed as a callback


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def functions(tree: ast.AST):
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def length(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("path", python_files(*PACKAGES), ids=lambda p: str(p.relative_to(ROOT)))
def test_files_and_functions_stay_small(path):
    lines = len(path.read_text().splitlines())
    limit = MAX_TRAIN_LINES if path == ROOT / "experiments" / "train.py" else MAX_FILE_LINES
    assert lines <= limit, f"{path.name} has {lines} lines (limit {limit}): split it by job"
    for node in functions(parse(path)):
        limit = MAX_TRAIN_FUNCTION_LINES if (path.name, node.name) == ("train.py", "train") else MAX_FUNCTION_LINES
        assert length(node) <= limit, f"{path.name}:{node.lineno} {node.name}() has {length(node)} lines (limit {limit})"


def private_imports(path: Path) -> list[str]:
    """Imports of another module's private (underscore) names, by `from` import or as `module.<name>` attributes."""
    tree = parse(path)
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found += [f"from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
            modules |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[-1].startswith("_")]
            modules |= {(a.asname or a.name).split(".")[0] for a in node.names}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    return found


def test_no_module_reaches_into_another_modules_private_names():
    offenders = {str(p.relative_to(ROOT)): private_imports(p)
                 for p in python_files(*PACKAGES, "benchmarks", "tests")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_tuning_defines_its_classes_and_functions_at_module_level():
    for path in python_files("tuning"):
        for outer in functions(parse(path)):
            for node in ast.walk(outer):
                if node is outer:
                    continue
                assert not isinstance(node, ast.ClassDef), f"{path.name}: class {node.name} inside {outer.name}()"
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    assert length(node) <= MAX_CLOSURE_LINES, (
                        f"{path.name}: {node.name}() inside {outer.name}() has {length(node)} lines")


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
    return names


def test_data_flows_one_way():
    """experiments -> tuning -> registry; benchmarks and tests sit on top. Nothing points back down."""
    below = {"experiments": {"tuning", "registry", "benchmarks"}, "tuning": {"registry", "benchmarks"},
             "registry": {"tuning", "benchmarks"}}
    for package, forbidden in below.items():
        for path in python_files(package):
            assert not imported_packages(path) & forbidden, f"{path.relative_to(ROOT)} imports {imported_packages(path) & forbidden}"


def test_search_roles_and_run_ownership_are_decided_in_one_module():
    """Role strings and MLFLOW_RUN_ID are read through experiments/tracking.py, not spelled out elsewhere."""
    for path in python_files(*PACKAGES, "benchmarks"):
        if path == ROOT / "experiments" / "tracking.py":
            continue
        text = path.read_text()
        assert 'os.environ.get("MLFLOW_RUN_ID")' not in text and 'os.environ["MLFLOW_RUN_ID"]' not in text, path.name
        assert '"search_role"' not in text, path.name


@pytest.mark.parametrize("module", ["experiments.train", "registry.promote", "experiments.pipeline", "tuning.search"])
def test_help_answers_without_importing_tensorflow(module):
    """`--help` must not wait seconds for TensorFlow: the heavy imports happen where they are used."""
    import subprocess
    import sys

    probe = (f"import runpy, sys\nsys.argv = ['{module}', '--help']\ntry:\n    runpy.run_module('{module}', "
             "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('tensorflow' in sys.modules, 'keras' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "False False"


def test_the_help_lists_every_registered_architecture():
    from experiments.cli import architecture_names
    from experiments.models import list_models

    assert architecture_names() == list_models()


@pytest.mark.slow
def test_a_training_imports_mlflow_s_flavours_before_its_run_starts():
    """mlflow.models.evaluate imports the MLflow flavour of every library already loaded while it holds MLflow's
    import-hook lock; an import then, with the run's system-metrics thread importing too, deadlocked a
    training in CI. Everything it would import must be loaded before the run starts."""
    import subprocess
    import sys

    probe = ("import sys, keras, sklearn, tensorflow\nimport experiments.run_logging\n"
             "from mlflow.models.evaluation.utils.trace import FLAVOR_TO_MODULE_NAME\n"
             "print(sorted(f for f, m in FLAVOR_TO_MODULE_NAME.items() if m in sys.modules and "
             "f'mlflow.{f}' not in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
