"""The DAGs, parsed and run by real Airflow (`dag.test()`), with real Spark, GX, MLflow and torch."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from itertools import pairwise

import pyarrow.parquet as pq
import pytest

from infra.orchestration import CHAMPION_ASSET
from infra.tables import TRAINING, scores_dir
from tests.dags.conftest import DATE, ROOT, dagbag, write_config

pytestmark = [pytest.mark.spark, pytest.mark.slow]
NIGHTLY, SCORING = "funnelrec_nightly", "funnelrec_scoring"


def _states(run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in run.get_task_instances()}


def test_dagbag_has_no_import_errors(airflow_db):
    bag = dagbag(write_config("parse"))
    assert bag.import_errors == {}
    assert {NIGHTLY, SCORING} <= set(bag.dag_ids)


def test_nightly_graph_is_what_the_design_says(airflow_db):
    dag = dagbag(write_config("graph")).get_dag(NIGHTLY)
    up = {t.task_id: set(t.upstream_task_ids) for t in dag.tasks}
    chain = [
        "etl.ingest",
        "etl.validate_events",
        "etl.sessionize",
        "etl.validate_sessions",
        "etl.split",
        "etl.validate_training",
    ]
    assert up[chain[0]] == set()
    for before, after in pairwise(chain):
        assert up[after] == {before}
    for model in ("popularity", "als_multi"):
        assert up[f"train_eval.train_{model}"] == {"etl.validate_training"}
        assert up[f"train_eval.evaluate_{model}"] == {f"train_eval.train_{model}"}
        assert up[f"train_eval.register_{model}"] == {f"train_eval.evaluate_{model}"}
        assert dag.get_task(f"train_eval.train_{model}").pool == "gpu"
    assert up["train_eval.promote"] == {"train_eval.register_popularity", "train_eval.register_als_multi"}
    assert [a.name for a in dag.get_task("train_eval.promote").outlets] == [CHAMPION_ASSET]
    assert dag.get_task("train_eval.promote").pool == "promote"
    from airflow.models.pool import Pool

    assert Pool.get_pool("promote").slots == 1  # created by init_airflow: one date decides at a time
    assert dag.max_active_runs == 1 and dag.catchup is False
    ingest = dag.get_task("etl.ingest")
    assert ingest.retries == 0 and ingest.retry_exponential_backoff and ingest.execution_timeout
    assert ingest.on_failure_callback
    assert dag.timetable.expression == "0 2 * * *"

    scoring = dagbag(write_config("graph")).get_dag(SCORING)
    up = {t.task_id: set(t.upstream_task_ids) for t in scoring.tasks}
    assert up == {
        "context": set(),
        "validate_serving": {"context"},
        "score": {"validate_serving"},
        "validate_scores": {"score"},
        "publish": {"validate_scores"},
    }
    assert CHAMPION_ASSET in str(scoring.timetable.asset_condition)


def _nightly(config):
    dag = dagbag(config).get_dag(NIGHTLY)
    return dag.test(logical_date=datetime.fromisoformat(DATE).replace(tzinfo=UTC), run_conf={"ds": DATE})


def _scoring(config):
    dag = dagbag(config).get_dag(SCORING)
    return dag.test(run_conf={"ds": DATE})


def _snapshot(wh) -> dict:
    bundle = TRAINING.dir(wh, DATE)
    scores = pq.read_table(scores_dir(wh) / f"ds={DATE}").to_pandas().sort_values(["user_id", "rank"])
    return {
        "checksums": json.loads((bundle / "manifest.json").read_text())["checksums"],
        "scores": scores.reset_index(drop=True),
    }


def test_nightly_then_scoring_end_to_end_and_a_rerun_changes_nothing(airflow_db, spark):
    config = write_config("e2e")
    wh = ROOT / "e2e"
    run = _nightly(config)
    assert str(run.state) == "success", _states(run)
    promote = next(ti for ti in run.get_task_instances() if ti.task_id == "train_eval.promote")
    assert promote.xcom_pull(task_ids="train_eval.promote")["decision"] == "promoted"

    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        events = (
            session.query(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetModel.name == CHAMPION_ASSET)
            .all()
        )
        assert [e.extra["ds"] for e in events] == [DATE] and events[0].extra["decision"] == "promoted"
        champion = events[0].extra["champion"]

    run = _scoring(config)
    assert str(run.state) == "success", _states(run)
    first = _snapshot(wh)
    assert first["scores"]["model_version"].eq(champion).all() and len(first["scores"]) > 0
    assert (wh / "reports" / f"ds={DATE}" / "report.html").is_file()

    # The same date again: same tables; the retrained model ties the champion, so the gate keeps it.
    assert str(_nightly(config).state) == "success"
    assert str(_scoring(config).state) == "success"
    again = _snapshot(wh)
    assert again["checksums"] == first["checksums"]
    assert again["scores"].equals(first["scores"])


def test_broken_input_fails_its_validation_task_and_nothing_downstream_runs(airflow_db, spark):
    config = write_config("broken", validation={"events_max_rows": 100})  # the slice has 10,000 events
    run = _nightly(config)
    states = _states(run)
    assert str(run.state) == "failed"
    assert states["etl.ingest"] == "success" and states["etl.validate_events"] == "failed"
    downstream = [t for t in states if t not in ("etl.ingest", "etl.validate_events")]
    assert downstream and all(states[t] == "upstream_failed" for t in downstream), states
    assert not TRAINING.dir(ROOT / "broken", DATE).exists()
    record = json.loads(
        next((ROOT / "airflow" / "failures" / NIGHTLY).rglob("etl.validate_events.json")).read_text()
    )
    assert record["ds"] == DATE and "expect_table_row_count_to_be_between" in record["exception"]
    os.environ.pop("FUNNELREC_CONFIG", None)


def test_etl_through_spark_submit_gives_the_in_process_tables(airflow_db, spark, monkeypatch):
    """``airflow.spark_submit_conn_id`` runs ingest, sessionize and split with SparkSubmitOperator
    (a real ``spark-submit`` of ``infra/cli.py`` on the connection's master): same tables as the
    in-process tasks of the end-to-end test."""
    monkeypatch.setenv("AIRFLOW_CONN_FUNNELREC_SPARK", json.dumps({"conn_type": "spark", "host": "local[1]"}))
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    config = write_config("submit", airflow={"spark_submit_conn_id": "funnelrec_spark"})
    dag = dagbag(config).get_dag(NIGHTLY)
    assert type(dag.get_task("etl.ingest")).__name__ == "StageSubmit"
    etl = dag.partial_subset(
        task_ids=[t for t in dag.task_ids if t.startswith("etl.")],
        include_upstream=False,
        include_downstream=False,
    )
    run = etl.test(logical_date=datetime.fromisoformat(DATE).replace(tzinfo=UTC), run_conf={"ds": DATE})
    assert str(run.state) == "success", _states(run)
    submitted = json.loads((TRAINING.dir(ROOT / "submit", DATE) / "manifest.json").read_text())["checksums"]

    reference = ROOT / "e2e"
    if not TRAINING.dir(reference, DATE).exists():
        run = _nightly(write_config("e2e"))
        assert str(run.state) == "success", _states(run)
    expected = json.loads((TRAINING.dir(reference, DATE) / "manifest.json").read_text())["checksums"]
    assert submitted == expected
    os.environ.pop("FUNNELREC_CONFIG", None)
