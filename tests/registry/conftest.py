"""Registry fixtures: a real MLflow store (SQLite file, or an `mlflow server` on a free loopback
port), and a training bundle of in-memory data published by ``training.data.write_training_bundle``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from infra.settings import DEFAULT_PROMOTION_POLICY
from tests.conftest import settings_under
from tests.training.conftest import tiny_data
from training.data import tables_of, write_training_bundle

DS = "2026-01-05"


def write_bundle(data, warehouse: Path, ds: str = DS) -> Path:
    """Publish in-memory ``TrainingData`` as ``training/ds=<ds>``, as the code that owns bundles does."""
    return write_training_bundle(warehouse, ds, tables_of(data), protocol="fixture", sources=["tiny"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free loopback port, SQLite behind it; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = open(root / "server.log", "wb")  # noqa: SIM115 (closed below, after the server)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    log.close()


@pytest.fixture(params=["sqlite", "server"])
def store(request, tmp_path):
    """Settings whose MLflow store is either the embedded SQLite file or the test server."""
    overrides: dict = {"mlflow": {"max_retries": 2, "backoff_seconds": 0, "lock_timeout_seconds": 30}}
    if request.param == "server":
        uri = request.getfixturevalue("mlflow_server")
        # One server for the session: a fresh registered model per test keeps them apart.
        overrides["mlflow"].update(tracking_uri=uri, registered_model=f"funnelrec_{request.node.name}"[:200])
        overrides["mlflow"]["registered_model"] = (
            overrides["mlflow"]["registered_model"].replace("[", "_").rstrip("]")
        )
        overrides["mlflow"]["experiment"] = overrides["mlflow"]["registered_model"]
    return settings_under(tmp_path, overrides)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A real training run of `als_multi` and `popularity` on the tiny bundle, tracked in SQLite."""
    from training.train_evaluate import run_evaluate, run_train

    base = tmp_path_factory.mktemp("trained")
    policy = yaml.safe_load(DEFAULT_PROMOTION_POLICY.read_text())
    policy["min_users"] = 10  # the tiny bundle has 27 validation users
    (base / "promotion.yaml").write_text(yaml.safe_dump(policy))
    settings = settings_under(
        base, {"training": {"max_epochs": 3}, "mlflow": {"promotion_policy": str(base / "promotion.yaml")}}
    )
    write_bundle(tiny_data(), settings.paths.warehouse_root)
    for name in ("popularity", "als_multi"):
        run_train(settings, DS, name)
        run_evaluate(settings, DS, name)
    return settings


def copy_models(src_settings, dst_settings) -> None:
    """Copy the trained models and their bundle into another warehouse (a different store)."""
    src, dst = src_settings.paths.warehouse_root, dst_settings.paths.warehouse_root
    for sub in ("training", "models"):
        shutil.copytree(src / sub, dst / sub, dirs_exist_ok=True)
