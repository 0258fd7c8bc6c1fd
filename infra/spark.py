"""The SparkSession every Spark stage uses, built from the settings.

One session per process: the CLI, an Airflow task and the test suite each call ``get_spark`` and
share whatever session is already active.
"""

from __future__ import annotations

import os
import sys

from infra.settings import Settings


def use_this_interpreter() -> None:
    """Make Spark's Python driver and executors this interpreter (the project's venv) unless set."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def get_spark(settings: Settings):
    """Return the active SparkSession, creating it on ``settings.spark.master`` with its conf (or,
    inside ``spark-submit``, on the submit's master and conf)."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    if settings.spark.master.startswith("local"):
        # Binding to loopback avoids the hostname lookup warning and never exposes the driver.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    use_this_interpreter()
    builder = SparkSession.builder.appName(settings.spark.app_name)
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        # Under spark-submit (which starts the JVM and sets the gateway port) the master and conf
        # are the submit's own: the Spark connection's, with ``spark.conf`` passed by the DAG.
        builder = builder.master(settings.spark.master)
        for key, value in settings.spark.conf.items():
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark
