"""The Spark stages on a real standalone cluster (a master and two workers on 127.0.0.1, started
from the pip wheel) give the rows they give on ``local[*]``, and a worker killed in the middle of
a job costs retried tasks, not rows."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from infra.settings import load_settings
from infra.spark import StandaloneCluster
from infra.tables import TRAINING, read_manifest
from tests.conftest import QUICK_JVM, REPO, TAOBAO_DATE, TINY_TABLES_CONF

pytestmark = pytest.mark.spark

DS = TAOBAO_DATE


def _rows(path, drop=()) -> pd.DataFrame:
    frame = pq.read_table(path).to_pandas()
    frame = frame.drop(columns=[c for c in drop if c in frame.columns])
    for c in frame.columns:  # arrays (visited sets, histories) and partition values as text
        if isinstance(frame[c].dtype, pd.CategoricalDtype):
            frame[c] = frame[c].astype(str)
        elif frame[c].map(lambda v: hasattr(v, "__len__") and not isinstance(v, str)).any():
            frame[c] = frame[c].map(lambda v: json.dumps(list(v), default=str))
    return frame.sort_values(list(frame.columns)).reset_index(drop=True)


def test_the_stages_on_a_standalone_cluster_give_the_local_rows_and_survive_a_killed_worker(
    taobao_nightly, tmp_path
):
    # The local[2] rows: the session's nightly run of the Taobao slice, whose champion (als_multi)
    # scores both warehouses.
    config, code, out = taobao_nightly
    assert code == 0, out
    local = load_settings(config, environ={})
    settings = yaml.safe_load(config.read_text())

    with StandaloneCluster(
        tmp_path / "cluster", workers=2, cores=1, memory="1g", java_opts=QUICK_JVM
    ) as cluster:
        config = tmp_path / "cluster.yaml"
        wh = tmp_path / "cluster" / "warehouse"
        config.write_text(
            yaml.safe_dump(
                {
                    **settings,
                    "paths": {
                        "data_root": str(local.paths.data_root),
                        "warehouse_root": str(wh),
                        "quarantine_root": str(wh / "quarantine"),
                    },
                    "spark": {
                        "master": cluster.url,
                        "conf": {
                            **StandaloneCluster.driver_conf,
                            **TINY_TABLES_CONF,
                            # Six JVMs share two cores for a few minutes: the JIT's quick tier only
                            "spark.driver.extraJavaOptions": QUICK_JVM,
                            "spark.executor.extraJavaOptions": QUICK_JVM,
                        },
                    },
                    # The local run's registry: the same champion scores both warehouses.
                    "mlflow": {**settings["mlflow"], "tracking_uri": local.mlflow_tracking_uri},
                }
            )
        )
        run = subprocess.run(
            [sys.executable, "-m", "tests.spark.cluster_run", "--config", str(config), "--date", DS,
             "--kill-pgid", str(cluster.workers[1].pid)],
            cwd=REPO, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        seen = json.loads(run.stdout.strip().splitlines()[-1])
        apps = cluster.status()["completedapps"]
    assert seen["master"] == cluster.url and len(apps) == 1  # the stages ran on the cluster

    lw = local.paths.warehouse_root
    for table in ("events", f"sessionized/ds={DS}/sessions", f"sessionized/ds={DS}/session_events",
                  f"serving/ds={DS}/serving_context", f"serving/ds={DS}/catalogue"):  # fmt: skip
        pd.testing.assert_frame_equal(_rows(wh / table), _rows(lw / table), obj=table)
    assert read_manifest(TRAINING.dir(wh, DS)).checksums == read_manifest(TRAINING.dir(lw, DS)).checksums
    # The cluster's staged scores against the nightly's, which its publish moved into the table.
    pd.testing.assert_frame_equal(
        _rows(wh / f"scores_staged/ds={DS}", drop=["scored_at", "ds"]),
        _rows(lw / f"scores/ds={DS}", drop=["scored_at", "ds"]),
    )

    # The killed worker: its executor was lost, its running tasks failed and ran again on the
    # other one, and every row came through once.
    kill = seen["kill"]
    assert kill["killed"], kill
    assert (kill["executors_before"], kill["executors_after"]) == (2, 1), kill
    assert kill["task_runs"] > kill["partitions"] == 4, kill  # the lost executor's tasks ran again
    assert kill["got"] == kill["expected"], kill

    # Distributed training asking for two processes of the one one-core worker left: refused by
    # Spark's barrier check in seconds (infra/defaults.yaml), with one clear line.
    refused = seen["too_many_processes"]
    assert refused["error"] and "fewer free task slots" in refused["error"], refused
    assert refused["seconds"] < 30, refused
