"""A real local Airflow for the DAG tests: its home (SQLite metadata DB) in a temporary folder,
migrated once per session. The environment is set at import, before anything imports airflow."""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from infra.orchestration import DAGS_FOLDER
from tests.conftest import QUICK_JVM, SAMPLE_DATA, TINY_TABLES_CONF

ROOT = Path(tempfile.mkdtemp(prefix="funnelrec-airflow-"))
HOME = ROOT / "airflow"
os.environ.update(
    {
        "AIRFLOW_HOME": str(HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{HOME / 'airflow.db'}",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(HOME / "logs"),
    }
)
DATE = "2017-12-03"


#: A shopper the bundled slice does not have: first seen on DATE (``with_newcomer``).
NEWCOMER = "990001"


def with_newcomer() -> Path:
    """A data root: the bundled Taobao slice plus a file of ``NEWCOMER``'s first events, on DATE:
    views of the three most viewed items of the slice's first week, and a cart of the first."""
    import gzip

    import pandas as pd

    root = ROOT / "data-newcomer"
    folder = root / "taobao_userbehavior"
    if folder.exists():
        return root
    folder.mkdir(parents=True)
    for src in (SAMPLE_DATA / "taobao_userbehavior").glob("*.csv*"):
        (folder / src.name).symlink_to(src)
    with gzip.open(next(folder.glob("*.csv.gz")), "rt") as fh:
        df = pd.read_csv(fh, header=None, names=["user", "item", "category", "behavior", "ts"])
    week = df[(df["behavior"] == "pv") & (df["ts"] < 1512086400)]  # before 2017-12-01 UTC
    top = week.groupby(["item", "category"]).size().sort_values(ascending=False).index[:3]
    start = int(datetime.fromisoformat(DATE).replace(tzinfo=UTC).timestamp()) + 36000
    rows = [(NEWCOMER, i, c, "pv", start + 60 * n) for n, (i, c) in enumerate(top)]
    rows.append((NEWCOMER, top[0][0], top[0][1], "cart", start + 600))
    (folder / "newcomer.csv").write_text("".join(",".join(map(str, r)) + "\n" for r in rows))
    return root


def write_config(name: str, policy_overrides: dict | None = None, **extra) -> Path:
    """A settings file for a DAG run: the bundled Taobao slice, two fast models, its own warehouse."""
    wh = ROOT / name
    policy = yaml.safe_load((DAGS_FOLDER.parent / "mlflow" / "promotion.yaml").read_text())
    policy["min_users"] = 3  # the slice is sparse: its 3-day validation window keeps 4 users
    policy.update(policy_overrides or {})
    (ROOT / f"{name}-policy.yaml").write_text(yaml.safe_dump(policy))
    cfg = {
        "paths": {
            "data_root": str(SAMPLE_DATA),
            "warehouse_root": str(wh),
            "quarantine_root": str(wh / "quarantine"),
        },
        "pipeline": {"sources": ["taobao"]},
        "sessionize": {"history_days": 10},
        "split": {"observation_days": 10, "test_days": 2, "validation_days": 3},
        "training": {"models": ["popularity", "als_multi"], "max_epochs": 3},
        "scoring": {"active_days": 10},
        "mlflow": {"promotion_policy": str(ROOT / f"{name}-policy.yaml")},
        "airflow": {"home": str(HOME), "retries": 0},
        # What a spark-submit task's own driver runs with (in-process tasks use the session's Spark).
        "spark": {
            "conf": {
                **TINY_TABLES_CONF,
                "spark.driver.extraJavaOptions": QUICK_JVM,
            }
        },
    }
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    path = ROOT / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def airflow_db():
    """The metadata DB migrated and the pools created in this process (the environment above is
    the config's), as `funnelrec dags-test` does; the setup test reruns it as `funnelrec airflow`
    does, through the `airflow` CLI."""
    from infra.orchestration import airflow_env, init_airflow
    from infra.settings import load_settings

    config = write_config("init")
    settings = load_settings(config, environ={})
    init_airflow(settings, airflow_env(settings, str(config)), in_process=True)
    return HOME


def dagbag(config: Path):
    """Parse dags/ with ``config`` as FUNNELREC_CONFIG (the DAG files read it when parsed)."""
    os.environ["FUNNELREC_CONFIG"] = str(config)
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_FOLDER))
