"""The DAGs, parsed and run by real Airflow (`dag.test()`), with real Spark, GX, MLflow and torch."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, date, datetime
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from infra.orchestration import CHAMPION_ASSET
from infra.tables import TRAINING, scores_dir
from tests import stage_plugin
from tests.conftest import REPO, sorted_rows
from tests.dags.conftest import DATE, NEWCOMER, ROOT, dagbag, with_newcomer, write_config
from training.data import ids

pytestmark = [pytest.mark.spark, pytest.mark.slow]
NIGHTLY, SCORING = "funnelrec_nightly", "funnelrec_scoring"


def _states(run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in run.get_task_instances()}


def test_dagbag_has_no_import_errors(airflow_db):
    bag = dagbag(write_config("parse"))
    assert bag.import_errors == {}
    assert {NIGHTLY, SCORING} <= set(bag.dag_ids)


#: Edges (upstream, downstream) of the DAGs as they were written by hand before the pipeline
#: declaration (1c30b8a), for training.models = [popularity, als_multi].
NIGHTLY_EDGES = {
    ("etl.ingest", "etl.validate_events"),
    ("etl.validate_events", "etl.sessionize"),
    ("etl.sessionize", "etl.validate_sessions"),
    ("etl.validate_sessions", "etl.split"),
    ("etl.split", "etl.validate_training"),
    *(
        edge
        for m in ("popularity", "als_multi")
        for edge in (
            ("etl.validate_training", f"train_eval.train_{m}"),
            (f"train_eval.train_{m}", f"train_eval.evaluate_{m}"),
            (f"train_eval.evaluate_{m}", f"train_eval.register_{m}"),
            (f"train_eval.register_{m}", "train_eval.promote"),
        )
    ),
    # The second stage (added after 1c30b8a): it emits the champion asset once both stages are decided.
    ("train_eval.promote", "train_eval.rank"),
}
SCORING_EDGES = {
    ("context", "validate_serving"),
    ("validate_serving", "score"),
    ("score", "validate_scores"),
    ("validate_scores", "publish"),
    ("publish", "prune"),
}


def _edges(dag) -> set[tuple[str, str]]:
    return {(up, t.task_id) for t in dag.tasks for up in t.upstream_task_ids}


def test_the_generated_dags_have_the_task_ids_and_edges_of_the_hand_written_ones(airflow_db):
    bag = dagbag(write_config("graph"))
    dag = bag.get_dag(NIGHTLY)
    assert _edges(dag) == NIGHTLY_EDGES
    assert set(dag.task_ids) == {t for edge in NIGHTLY_EDGES for t in edge}
    for model in ("popularity", "als_multi"):
        assert dag.get_task(f"train_eval.train_{model}").pool == "gpu"
        assert dag.get_task(f"train_eval.train_{model}").queue == "default"  # airflow.gpu_queue unset
    queued = dagbag(write_config("graph_gpu_queue", airflow={"gpu_queue": "gpu"})).get_dag(NIGHTLY)
    assert {t.task_id for t in queued.tasks if t.queue == "gpu"} == {
        "train_eval.train_popularity",
        "train_eval.train_als_multi",
        "train_eval.rank",
    }
    assert [a.name for a in dag.get_task("train_eval.rank").outlets] == [CHAMPION_ASSET]
    assert dag.get_task("train_eval.promote").outlets == []
    assert (
        dag.get_task("train_eval.promote").pool == "promote" and dag.get_task("train_eval.rank").pool == "gpu"
    )
    from airflow.models.pool import Pool

    assert Pool.get_pool("promote").slots == 1  # created by init_airflow: one date decides at a time
    assert dag.max_active_runs == 1 and dag.catchup is False
    ingest = dag.get_task("etl.ingest")
    assert ingest.retries == 0 and ingest.retry_exponential_backoff and ingest.execution_timeout
    assert ingest.on_failure_callback
    assert dag.timetable.expression == "0 2 * * *"

    scoring = bag.get_dag(SCORING)
    assert _edges(scoring) == SCORING_EDGES
    assert set(scoring.task_ids) == {t for edge in SCORING_EDGES for t in edge}
    assert CHAMPION_ASSET in str(scoring.timetable.asset_condition)


def _nightly(config, ds: str = DATE):
    dag = dagbag(config).get_dag(NIGHTLY)
    return dag.test(logical_date=datetime.fromisoformat(ds).replace(tzinfo=UTC), run_conf={"ds": ds})


def _tasks(config, ds: str, *task_ids: str):
    """Only ``task_ids`` of the nightly DAG, in its order, for ``ds``."""
    dag = dagbag(config).get_dag(NIGHTLY)
    part = dag.partial_subset(task_ids=list(task_ids), include_upstream=False, include_downstream=False)
    return part.test(logical_date=datetime.fromisoformat(ds).replace(tzinfo=UTC), run_conf={"ds": ds})


def _ingest(config, ds: str):
    """The nightly's ingest task alone: the events up to ``ds`` arrive (what the scoring DAG reads)."""
    return _tasks(config, ds, "etl.ingest")


def _scoring(config, **conf):
    dag = dagbag(config).get_dag(SCORING)
    return dag.test(run_conf=conf)


def _scores(wh, ds: str):
    return pq.read_table(scores_dir(wh) / f"ds={ds}").to_pandas().sort_values(["user_id", "rank"])


def _snapshot(wh, ds: str) -> dict:
    bundle = TRAINING.dir(wh, ds)
    return {
        "checksums": json.loads((bundle / "manifest.json").read_text())["checksums"],
        "scores": _scores(wh, ds).reset_index(drop=True),
    }


D1 = "2017-12-01"


def test_airflow_setup_runs_again_only_when_what_it_set_up_changes(airflow_db):
    from airflow.models.pool import Pool
    from airflow.utils.session import create_session
    from sqlalchemy import update

    from infra.orchestration import airflow_env, init_airflow
    from infra.settings import load_settings

    def init(**airflow) -> dict[str, int]:
        config = write_config("init", airflow=airflow)
        settings = load_settings(config, environ={})
        init_airflow(settings, airflow_env(settings, str(config)))
        return {p.pool: p.slots for p in Pool.get_pools() if p.pool in ("gpu", "promote")}

    with create_session() as session:  # a pool changed by hand, which only a new setup undoes
        session.execute(update(Pool).where(Pool.pool == "promote").values(slots=4))
    assert init() == {"gpu": 1, "promote": 4}  # set up already: Airflow is not started again
    # A new pool size: set up again (the DAG runs of the other tests fit a 2-slot GPU pool too).
    assert init(gpu_pool_slots=2) == {"gpu": 2, "promote": 1}


def test_nightly_then_scoring_from_each_nights_context_every_date_scored_and_a_rerun_changes_nothing(
    airflow_db, spark
):
    """A MEMBER champion trained on D1 serves D3 (= DATE) from D3's context: an item a shopper first
    viewed after D1 is typed visited and scored by the visited expert, and a shopper first seen on
    D3 gets K rows (the fallback). D1 again, after D3's events arrived (a backfill): its split and,
    in one scoring run triggered for D1 and D3, its scores are the first run's."""
    config = write_config(
        "e2e",
        policy_overrides={"floor_model": None},  # the first champion is MEMBER, whatever it scores
        paths={"data_root": str(with_newcomer())},
        training={"models": ["member"], "max_epochs": 2},
    )
    wh = ROOT / "e2e"
    # D1: both DAGs in one call, as `make demo` runs them (`funnelrec dags-test`).
    from infra.orchestration import DAG_IDS, airflow_env, run_dags
    from infra.settings import load_settings

    settings = load_settings(config, environ={})
    lines = run_dags(settings, airflow_env(settings, str(config)), date.fromisoformat(D1))
    assert [line.split()[:3] for line in lines] == [[dag_id, D1 + ":", "success"] for dag_id in DAG_IDS]

    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:  # the promotion's event, which triggers the scoring DAG
        events = (
            session.query(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetModel.name == CHAMPION_ASSET)
            .all()
        )
        assert [e.extra["ds"] for e in events] == [D1] and events[0].extra["rank"] == "off"
        champion = events[0].extra["champion"]

    first = _snapshot(wh, D1)
    assert first["scores"]["model_version"].eq(champion).all() and len(first["scores"]) > 0
    assert (wh / "reports" / f"ds={D1}" / "report.html").is_file()

    # Two nights later D2's and D3's events have arrived. D1 again, from its own events only: the
    # split task rebuilds the same training tables (the other ETL tasks' reruns are tests/spark's).
    assert str(_ingest(config, DATE).state) == "success"
    assert str(_tasks(config, D1, "etl.split").state) == "success"
    assert _snapshot(wh, D1)["checksums"] == first["checksums"]
    # One scoring run for D1 and D3: the D1 champion serves both, D1 as it did the first time.
    run = _scoring(config, dates=[DATE, D1])
    assert str(run.state) == "success", _states(run)
    assert _snapshot(wh, D1)["scores"].equals(first["scores"])
    k = 50
    trained = TRAINING.dir(wh, D1)
    users, items = ids(trained, "user"), ids(trained, "item")
    old = pq.read_table(trained / "visited").to_pandas()
    old_visited = set(zip(users[old["user_idx"]], items[old["item_idx"]], strict=True))
    known = set(users)
    for ds in (D1, DATE):
        scores = _scores(wh, ds)
        context = pq.read_table(wh / "serving" / f"ds={ds}" / "serving_context").to_pandas()
        assert set(scores["user_id"]) == set(context["user_id"])  # every active user
        assert scores.groupby("user_id").size().eq(k).all() and scores["model_version"].eq(champion).all()
    scores = _scores(wh, DATE)
    context = pq.read_table(wh / "serving" / f"ds={DATE}" / "serving_context").to_pandas()
    visited_now = {(u, i) for u, vs in zip(context["user_id"], context["visited"], strict=True) for i in vs}
    pairs = list(zip(scores["user_id"], scores["item_id"], strict=True))
    fresh = scores[[p in visited_now and p not in old_visited and p[0] in known for p in pairs]]
    # Visited since the champion's training date: its own tables would call these unvisited.
    assert len(fresh) > 0
    assert fresh["item_type"].eq("visited").all() and fresh["expert"].eq("visited").all()
    newcomer = scores[scores["user_id"] == NEWCOMER]
    assert NEWCOMER not in known and len(newcomer) == k
    assert newcomer["expert"].eq("fallback").all() and newcomer["rank"].tolist() == list(range(1, k + 1))
    seen = {i for u, i in visited_now if u == NEWCOMER}
    assert (
        newcomer["item_type"]
        .eq(newcomer["item_id"].isin(seen).map({True: "visited", False: "unvisited"}))
        .all()
    )


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


def test_etl_through_spark_submit_gives_the_in_process_tables_and_runs_an_added_stage(
    airflow_db, spark, taobao_nightly, monkeypatch, tmp_path
):
    """``airflow.spark_submit_conn_id`` makes every Spark stage of the ETL group a SparkSubmitOperator
    (a real ``spark-submit`` of ``infra/cli.py`` on the connection's master). Ingest run that way
    gives the events of the session's in-process nightly of the slice (``taobao_nightly``); the
    other Spark stages are the same operator with their own stage name. A stage added by an entry
    point alone (reads ``events``) is a task of the ETL group after the events' validation, and runs
    in the same run."""
    stage_plugin.install(tmp_path, monkeypatch)
    monkeypatch.setenv("AIRFLOW_CONN_FUNNELREC_SPARK", json.dumps({"conn_type": "spark", "host": "local[1]"}))
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    config = write_config("submit", airflow={"spark_submit_conn_id": "funnelrec_spark"})
    dag = dagbag(config).get_dag(NIGHTLY)
    for stage in ("ingest", "sessionize", "split"):
        assert type(dag.get_task(f"etl.{stage}")).__name__ == "StageSubmit", stage
    added = f"etl.{stage_plugin.STAGE}"
    assert dag.get_task(added).upstream_task_ids == {"etl.validate_events"}
    run = _tasks(config, DATE, "etl.ingest", "etl.validate_events", added)
    assert str(run.state) == "success", _states(run)
    assert _states(run)[added] == "success"
    counted = json.loads((ROOT / "submit" / "event_counts" / f"ds={DATE}" / "counts.json").read_text())
    events = pq.read_table(ROOT / "submit" / "events").to_pandas()
    assert counted["events"] == (events["event_date"].astype(str) == DATE).sum() > 0

    # The session's in-process nightly of the same slice, date and settings.
    reference, code, out = taobao_nightly
    assert code == 0, out
    expected = pq.read_table(reference.parent / "wh" / "events").to_pandas()
    columns = sorted(expected.columns)
    assert len(events) == len(expected)
    assert (
        events[columns].astype(str).sort_values(columns).reset_index(drop=True)
        .equals(expected[columns].astype(str).sort_values(columns).reset_index(drop=True))
    )  # fmt: skip
    os.environ.pop("FUNNELREC_CONFIG", None)


def test_funnelrec_airflow_standalone_listens_on_loopback_only_retries_a_killed_task_and_stops_everything(
    airflow_db, taobao_nightly
):
    """Airflow's own `standalone` opens the scheduler's and triggerer's log servers on every
    interface; funnelrec's starts the same components with every listening socket on 127.0.0.1.

    Its scheduler runs a nightly of the Taobao slice of its sessionize task alone (the events before it
    are the session's uninterrupted nightly's, ``taobao_nightly``), whose process is SIGKILLed once
    its Spark driver is up: Airflow records the try as failed, runs it again, and the date's
    sessions are those of the uninterrupted nightly."""
    import json
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    import psutil

    from tests.registry.conftest import _free_port

    reference = taobao_nightly[0].parent / "wh"
    assert taobao_nightly[1] == 0, taobao_nightly[2]
    port = _free_port()
    config = write_config(
        "standalone",
        # end_date: the scheduler makes no run by itself, only the one the test triggers.
        airflow={"api_port": port, "retries": 1, "retry_delay_minutes": 0.05, "end_date": DATE},
        training={"models": ["popularity"], "max_epochs": 3},
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "infra.cli", "--config", str(config), "airflow", "standalone"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline, health = time.monotonic() + 240, {}
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=2) as r:
                    health = json.load(r)
            except OSError:
                pass
            if all(
                health.get(c, {}).get("status") == "healthy"
                for c in ("scheduler", "triggerer", "dag_processor")
            ):
                break
            time.sleep(1)
        assert proc.poll() is None, proc.stdout.read()
        assert all(health[c]["status"] == "healthy" for c in ("scheduler", "triggerer", "dag_processor")), (
            health
        )
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        listening = {
            (c.laddr.ip, c.laddr.port)
            for p in tree
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert (("127.0.0.1", port)) in listening
        assert all(ip in ("127.0.0.1", "::1") for ip, _ in listening), listening
        started = [p.pid for p in tree[1:]]
        killed = _kill_task_and_wait(
            config, "etl.sessionize", ("etl.ingest", "etl.validate_events"), reference / "events"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0 and f"127.0.0.1:{port} (loopback only)" in out, out
    _, alive = psutil.wait_procs([psutil.Process(p) for p in started if psutil.pid_exists(p)], timeout=10)
    assert alive == [], alive

    # The killed try is the first and is recorded failed; Airflow ran a second, which succeeded
    # and wrote the uninterrupted nightly's sessions.
    assert killed["killed_try"] == 1 and killed["tries"] == {1: "failed", 2: "success"}, killed
    for table in ("sessions", "session_events"):
        got, expected = (
            pq.read_table(wh / "sessionized" / f"ds={DATE}" / table).to_pandas()
            for wh in (ROOT / "standalone", reference)
        )
        pd.testing.assert_frame_equal(sorted_rows(got), sorted_rows(expected), obj=table)


def _kill_task_and_wait(config, task: str, done: tuple[str, ...], inputs: Path, timeout: float = 240) -> dict:
    """Through the running scheduler: a nightly run for DATE of ``task`` alone, as after an operator
    marked the tasks before it (``done``) successful, their output (``inputs``) copied in, and
    those after it skipped; SIGKILL the task's process 1.5 s after its Spark driver (a JVM child)
    started; wait until the task has succeeded or failed for good. Returns the killed try's number
    and the state of each of the task's tries."""
    import shutil
    import signal
    import time

    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.models.dag import DagModel
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskinstancehistory import TaskInstanceHistory
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from airflow.utils.types import DagRunTriggeredByType

    deadline = time.monotonic() + timeout
    # Other tests' dag.test() calls stored this DAG as their settings made it: wait for the
    # dag-processor's parse with this config (one training task: popularity's).
    while True:
        with create_session() as session:
            latest = SerializedDagModel.get(NIGHTLY, session=session)
            trains = [t for t in latest.dag.task_ids if t.startswith("train_eval.train_")] if latest else []
        if trains == ["train_eval.train_popularity"]:
            break
        assert time.monotonic() < deadline, f"the dag-processor did not parse {config}: {trains}"
        time.sleep(1)
    shutil.copytree(inputs, ROOT / "standalone" / inputs.name, dirs_exist_ok=True)
    with create_session() as session:  # one transaction: the run exists only with the ETL marked
        run_id = trigger_dag(
            NIGHTLY, triggered_by=DagRunTriggeredByType.TEST, conf={"ds": DATE}, session=session
        ).run_id
        marked = (
            session.query(TaskInstance)
            .filter(
                TaskInstance.dag_id == NIGHTLY,
                TaskInstance.run_id == run_id,
                TaskInstance.task_id.in_(done),
            )
            .update({"state": TaskInstanceState.SUCCESS}, synchronize_session=False)
        )
        # The tasks after it are not what is tested: skipped, so that no task is left running
        # when the components stop (the scheduler's executor waits for its running tasks).
        session.query(TaskInstance).filter(
            TaskInstance.dag_id == NIGHTLY,
            TaskInstance.run_id == run_id,
            TaskInstance.task_id.not_in((*done, task)),
        ).update({"state": TaskInstanceState.SKIPPED}, synchronize_session=False)
        assert marked == len(done), marked
        session.query(DagModel).filter(DagModel.dag_id == NIGHTLY).update({"is_paused": False})
    killed_try, jvm_seen = None, None
    while time.monotonic() < deadline:
        with create_session() as session:
            ti = session.query(TaskInstance).filter_by(dag_id=NIGHTLY, run_id=run_id, task_id=task).one()
            state, pid, try_number = str(ti.state), ti.pid, ti.try_number
        if state in ("success", "failed", "upstream_failed"):
            break
        if killed_try is None and state == "running" and pid and _has_jvm_child(pid):
            jvm_seen = jvm_seen or time.monotonic()
            if time.monotonic() - jvm_seen >= 1.5:
                os.kill(pid, signal.SIGKILL)
                killed_try = try_number
        time.sleep(0.2)
    else:
        raise AssertionError(f"{task} of {run_id} did not end in {timeout} s")
    assert killed_try is not None, f"{task} ended ({state}) before it could be killed"
    with create_session() as session:  # every try of the task: the earlier ones are history rows
        tries = {
            t.try_number: str(t.state)
            for model in (TaskInstanceHistory, TaskInstance)
            for t in session.query(model).filter_by(dag_id=NIGHTLY, run_id=run_id, task_id=task)
        }
    return {"killed_try": killed_try, "tries": tries}


def _has_jvm_child(pid: int) -> bool:
    import psutil

    try:
        return any("java" in c.name() for c in psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return False
