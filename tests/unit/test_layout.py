"""The design's layout: mlflow/ is configuration only and never shadows the library."""

import subprocess
import sys

from tests.conftest import REPO


def test_import_mlflow_from_repo_root_gets_the_real_library():
    code = "import mlflow, sys; print(mlflow.__file__); print(mlflow.__version__); print(callable(mlflow.start_run))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    path, version, has_api = out.stdout.split()
    assert "site-packages" in path, path
    assert version.startswith("3.")
    assert has_api == "True"


def test_mlflow_folder_holds_configuration_only():
    assert not (REPO / "mlflow" / "__init__.py").exists()
    assert not list((REPO / "mlflow").glob("*.py"))


def test_design_folders_exist():
    for name in ("dags", "jobs", "training", "validation", "mlflow", "infra", "tests", "bench"):
        assert (REPO / name).is_dir(), name


BLOCK_STAGES = """
import importlib, importlib.abc, pkgutil, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jobs", "training", "validation"):
            raise ImportError(f"{name} is a stage package: infra must not import it")
        return None

sys.meta_path.insert(0, Block())
import infra
names = sorted(m.name for m in pkgutil.iter_modules(infra.__path__, "infra."))
for name in names:
    importlib.import_module(name)
print(" ".join(names))
"""


def test_infra_imports_no_stage_package():
    """The ground floor stands alone: every module of infra/ imports with jobs, training and
    validation unimportable (the CLI and the DAG builder find the stages through entry points)."""
    out = subprocess.run(
        [sys.executable, "-c", BLOCK_STAGES], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert {"infra.cli", "infra.orchestration", "infra.pipeline", "infra.tables"} <= set(out.stdout.split())


def test_bench_imports_no_test_module_and_no_private_name():
    import ast

    for path in sorted((REPO / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                assert module.split(".")[0] != "tests", f"{path.name} imports {module}"
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {module}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "tests" for a in node.names), path.name
            elif (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                assert not isinstance(node.value, ast.Name) or node.value.id in ("self", "cls"), (
                    f"{path.name} uses {node.value.id}.{node.attr}"
                )
