"""Registry fixtures: a real MLflow store (SQLite file, or an `mlflow server` on a free loopback
port), and a training bundle written to disk as Parquet with the catalogue's schemas."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from infra.settings import DEFAULT_PROMOTION_POLICY
from infra.tables import (
    HELDOUT,
    INTERACTIONS,
    ITEM_MAP,
    MANIFEST_FILE,
    TRAIN_EVENTS,
    TRAINING,
    USER_MAP,
    VISITED,
)
from tests.conftest import settings_under
from tests.training.conftest import tiny_data

DS = "2026-01-05"


def write_bundle(data, warehouse: Path, ds: str = DS) -> Path:
    """Write an in-memory ``TrainingData`` as ``training/ds=<ds>`` (what `split` publishes)."""
    root = TRAINING.dir(warehouse, ds)
    root.mkdir(parents=True)

    def put(table, columns: dict) -> None:
        (root / table.name).mkdir()
        pq.write_table(pa.table(columns, schema=table.arrow_schema()), root / table.name / "part-0.parquet")

    put(USER_MAP, {"user_id": [f"u{u}" for u in range(data.n_users)], "user_idx": list(range(data.n_users))})
    put(
        ITEM_MAP,
        {
            "item_id": [f"i{i}" for i in range(data.n_items)],
            "item_idx": list(range(data.n_items)),
            "category_id": [str(i % 5) for i in range(data.n_items)],
        },
    )
    rows = {"user_idx": [], "item_idx": [], "behavior": [], "count": [], "last_time": []}
    for behavior, m in data.matrices.items():
        coo = m.tocoo()
        rows["user_idx"] += coo.row.tolist()
        rows["item_idx"] += coo.col.tolist()
        rows["behavior"] += [behavior] * coo.nnz
        rows["count"] += [1] * coo.nnz
        rows["last_time"] += [None] * coo.nnz
    put(INTERACTIONS, rows)
    vis = data.visited.tocoo()
    put(VISITED, {"user_idx": vis.row.tolist(), "item_idx": vis.col.tolist()})
    held = {"user_idx": [], "item_idx": [], "split": [], "event_time": [], "visited": []}
    for split, (u, i, v) in data.heldout.items():
        held["user_idx"] += u.tolist()
        held["item_idx"] += i.tolist()
        held["split"] += [split] * len(u)
        held["event_time"] += [None] * len(u)
        held["visited"] += [bool(x) for x in v]
    put(HELDOUT, held)
    users = np.repeat(np.arange(data.n_users), data.user_events)
    put(
        TRAIN_EVENTS,
        {
            "user_idx": users.tolist(),
            "item_idx": [0] * len(users),
            "behavior": ["view"] * len(users),
            "event_time": [None] * len(users),
            "session_id": [None] * len(users),
            "validation_fit": [True] * len(users),
        },
    )
    manifest = {
        "ds": ds,
        "protocol": "fixture",
        "eval_mask": "train_purchases",
        "sources": ["tiny"],
        "checksums": {t: f"fixture-{ds}-{t}" for t in ("interactions", "heldout")},
    }
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))
    return root


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
