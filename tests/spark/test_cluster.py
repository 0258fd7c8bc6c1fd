"""The Spark stages on a real standalone cluster (a master and two workers on 127.0.0.1, started
from the pip wheel) give the rows they give on ``local[*]``, and a worker killed in the middle of
a job costs retried tasks, not rows."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from infra.pipeline import load_pipeline
from infra.spark import StandaloneCluster
from infra.tables import TRAINING, read_manifest
from tests.conftest import REPO, settings_under

pytestmark = pytest.mark.spark

DS = "2017-12-03"
SETTINGS = {
    "pipeline": {"sources": ["taobao"]},
    "sessionize": {"history_days": 10},
    "split": {"observation_days": 10, "test_days": 2, "validation_days": 3},
    "training": {"models": ["popularity"]},
    "scoring": {"active_days": 10},
}


def _rows(path, drop=()) -> pd.DataFrame:
    frame = pq.read_table(path).to_pandas()
    frame = frame.drop(columns=[c for c in drop if c in frame.columns])
    for c in frame.columns:  # arrays (visited sets, histories) and partition values as text
        if isinstance(frame[c].dtype, pd.CategoricalDtype):
            frame[c] = frame[c].astype(str)
        elif frame[c].map(lambda v: hasattr(v, "__len__") and not isinstance(v, str)).any():
            frame[c] = frame[c].map(lambda v: json.dumps(list(v), default=str))
    return frame.sort_values(list(frame.columns)).reset_index(drop=True)


def test_the_stages_on_a_standalone_cluster_give_the_local_rows_and_survive_a_killed_worker(spark, tmp_path):
    # local[2]: the whole chain up to score, with a popularity champion both runs score with (the
    # policy's floor is popularity itself, and the slice's validation has a handful of users).
    policy = yaml.safe_load((REPO / "mlflow" / "promotion.yaml").read_text())
    policy.update(floor_model=None, min_users=3)
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    local = settings_under(
        tmp_path / "local", {**SETTINGS, "mlflow": {"promotion_policy": str(tmp_path / "policy.yaml")}}
    )
    load_pipeline().run(local, date.fromisoformat(DS), until="score", checks=False)

    with StandaloneCluster(tmp_path / "cluster", workers=2, cores=1, memory="1g") as cluster:
        config = tmp_path / "cluster.yaml"
        wh = tmp_path / "cluster" / "warehouse"
        config.write_text(
            yaml.safe_dump(
                {
                    **SETTINGS,
                    "paths": {
                        "data_root": str(local.paths.data_root),
                        "warehouse_root": str(wh),
                        "quarantine_root": str(wh / "quarantine"),
                    },
                    "spark": {
                        "master": cluster.url,
                        "conf": {
                            **StandaloneCluster.driver_conf,
                            "spark.sql.shuffle.partitions": "2",
                            "spark.sql.adaptive.enabled": "false",
                        },
                    },
                    # The local run's registry: the same champion scores both warehouses.
                    "mlflow": {"tracking_uri": local.mlflow_tracking_uri},
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
    scores = f"scores_staged/ds={DS}"
    pd.testing.assert_frame_equal(
        _rows(wh / scores, drop=["scored_at"]), _rows(lw / scores, drop=["scored_at"])
    )

    # The killed worker: its executor was lost, its running tasks failed and ran again on the
    # other one, and every row came through once.
    kill = seen["kill"]
    assert kill["killed"], kill
    assert (kill["executors_before"], kill["executors_after"]) == (2, 1), kill
    assert kill["task_runs"] > kill["partitions"] == 8, kill  # the lost executor's tasks ran again
    assert kill["got"] == kill["expected"], kill
