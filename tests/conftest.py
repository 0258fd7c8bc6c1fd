"""Shared fixtures. One SparkSession for the whole test session (JVM start-up is ~8 s)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "jobs" / "sample_data"
FIXTURES = REPO / "tests" / "fixtures"

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


@pytest.fixture
def make_settings(tmp_path):
    """Settings with every output under this test's tmp dir; ``overrides`` is a nested mapping."""
    from infra.settings import load_settings

    def make(overrides: dict | None = None, data_root: Path = SAMPLE_DATA):
        base = {
            "paths": {
                "data_root": str(data_root),
                "warehouse_root": str(tmp_path / "warehouse"),
                "quarantine_root": str(tmp_path / "warehouse" / "quarantine"),
            },
            "spark": {"master": "local[2]", "conf": {"spark.sql.shuffle.partitions": "2"}},
        }
        from infra.settings import _deep_merge

        return load_settings(environ={}, overrides=_deep_merge(base, overrides or {}))

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
                "conf": {"spark.sql.shuffle.partitions": "2", "spark.default.parallelism": "2"},
            }
        },
    )
    session = get_spark(settings)
    yield session
    session.stop()
