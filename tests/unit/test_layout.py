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
