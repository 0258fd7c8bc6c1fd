"""Shared fixtures. One SparkSession for the whole test session (JVM start-up is ~8 s)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "jobs" / "sample_data"
FIXTURES = REPO / "tests" / "fixtures"

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def pytest_unconfigure(config):
    # py4j closes its gateway connections from __del__ as the interpreter exits, logging each at
    # INFO through a handler holding one of pytest's capture streams, closed by then: the
    # run would end in a "--- Logging error ---" traceback after its summary.
    logging.getLogger("py4j").setLevel(logging.WARNING)


#: JVM options of the short-lived JVMs the tests start (drivers in subprocesses, a cluster's
#: executors): the JIT's quick tier only and one GC thread; the optimising tier pays off on long
#: jobs, not on these, and its compiler threads compete for the two cores.
QUICK_JVM = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
#: Spark SQL settings for the tests' tiny tables (infra/demo.yaml says why each): few shuffle
#: partitions, no adaptive re-planning, partition directories listed by the driver, not by a job.
TINY_TABLES_CONF = {
    "spark.sql.shuffle.partitions": "2",
    "spark.sql.adaptive.enabled": "false",
    "spark.sql.sources.parallelPartitionDiscovery.threshold": "100000",
}


def sorted_rows(frame):
    """``frame`` sorted by every column, its index reset: tables compared as sets of rows."""
    return frame.sort_values(list(frame.columns)).reset_index(drop=True)


def settings_under(base_dir: Path, overrides: dict | None = None, data_root: Path = SAMPLE_DATA):
    """Settings with every output under ``base_dir``; ``overrides`` is a nested mapping."""
    from infra.settings import load_settings

    base = {
        "paths": {
            "data_root": str(data_root),
            "warehouse_root": str(base_dir / "warehouse"),
            "quarantine_root": str(base_dir / "warehouse" / "quarantine"),
        },
        "spark": {
            "master": "local[2]",
            "conf": TINY_TABLES_CONF,
        },
    }
    return load_settings(environ={}, overrides=[base, overrides or {}])


@pytest.fixture
def make_settings(tmp_path):
    """``settings_under`` this test's tmp dir."""

    def make(overrides: dict | None = None, data_root: Path = SAMPLE_DATA):
        return settings_under(tmp_path, overrides, data_root)

    return make


@pytest.fixture(scope="session")
def spark():
    from infra.settings import load_settings
    from infra.spark import get_spark

    settings = load_settings(
        environ={},
        overrides={
            "spark": {
                "master": "local[2]",
                "conf": {
                    **TINY_TABLES_CONF,
                    "spark.default.parallelism": "2",
                    "spark.ui.enabled": "false",  # no test reads it; its listeners run on every job
                },
            }
        },
    )
    session = get_spark(settings)
    yield session
    session.stop()


DEMO_DATE = "2015-09-18"
#: The date the Taobao slice's nightly tests run (its last full day but one).
TAOBAO_DATE = "2017-12-03"


def taobao_config(base: Path, **extra) -> Path:
    """A settings file for the bundled Taobao slice under ``base``: a 10-day history, a 3-day
    validation and 2-day test window, popularity and als_multi; ``extra`` adds top-level sections."""
    import yaml

    policy = yaml.safe_load((REPO / "mlflow" / "promotion.yaml").read_text())
    policy["min_users"] = 3  # the slice is sparse: its 3-day validation window keeps 4 users
    base.mkdir(parents=True, exist_ok=True)
    (base / "promotion.yaml").write_text(yaml.safe_dump(policy))
    cfg = {
        "paths": {
            "data_root": str(SAMPLE_DATA),
            "warehouse_root": str(base / "wh"),
            "quarantine_root": str(base / "wh" / "quarantine"),
        },
        "pipeline": {"sources": ["taobao"]},
        "sessionize": {"history_days": 10},
        "split": {"observation_days": 10, "test_days": 2, "validation_days": 3},
        "training": {"models": ["popularity", "als_multi"]},
        "scoring": {"active_days": 10},
        "mlflow": {"promotion_policy": str(base / "promotion.yaml")},
        **extra,
    }
    path = base / "settings.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def retailrocket(spark, tmp_path_factory):
    """The demo's chain on the bundled RetailRocket slice (its last 90 days, as ``infra/demo.yaml``
    reads it), the pipeline's steps up to ``split`` without their validations, built once.

    Returns ``(settings, ingest summary of the source, split manifest)``.
    """
    from datetime import date

    from infra.pipeline import load_pipeline

    settings = settings_under(
        tmp_path_factory.mktemp("retailrocket"),
        {
            "pipeline": {"sources": ["retailrocket_mb"]},
            "sessionize": {"history_days": 90},
            "split": {"protocol": "leave_last_purchase", "observation_days": 90, "val_user_fraction": 1.0},
            "training": {"max_epochs": 2},
        },
    )
    done = load_pipeline().run(settings, date.fromisoformat(DEMO_DATE), until="split", checks=False)
    (ingested,) = done["ingest"].data["sources"]
    return settings, ingested, done["split"].data


@pytest.fixture(scope="session")
def taobao_nightly(spark, tmp_path_factory):
    """`funnelrec nightly` on the bundled Taobao slice for ``TAOBAO_DATE``, run once: every stage and
    gate, popularity then als_multi registered (als_multi promoted), scores published.

    Returns ``(config path, exit code, what it printed)``."""
    import contextlib
    import io

    from infra.cli import main

    config = taobao_config(tmp_path_factory.mktemp("taobao-nightly"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--config", str(config), "nightly", "--date", TAOBAO_DATE])
    return config, code, out.getvalue()
