"""The SparkSession every Spark stage uses, built from the settings.

One session per process: the CLI, an Airflow task and the test suite each call ``get_spark`` and
share whatever session is already active.
"""

from __future__ import annotations

import os
import sys

from infra.settings import Settings


def get_spark(settings: Settings):
    """Return the active SparkSession, creating it on ``settings.spark.master`` with its conf."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    if settings.spark.master.startswith("local"):
        # Binding to loopback avoids the hostname lookup warning and never exposes the driver.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # Executors must run the same interpreter as the driver (the project's venv).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.master(settings.spark.master).appName(settings.spark.app_name)
    for key, value in settings.spark.conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark
