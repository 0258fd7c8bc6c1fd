"""funnelrec_nightly: the nightly pipeline for one data date.

etl:        ingest -> validate_events -> sessionize -> validate_sessions -> split -> validate_training
train_eval: per model of ``training.models``: train_<m> (pool ``airflow.gpu_pool``; CUDA when the
            worker has it) -> evaluate_<m> -> register_<m>; then promote (pool ``airflow.promote_pool``,
            one slot), which emits the ``funnelrec_champion`` asset with the data date in its extra
            (the scoring DAG runs on it).

Every task calls the same stage function as the CLI and rewrites only its date's outputs, so a
rerun or a backfill of a date is safe. The schedule is a cron data interval (``airflow.schedule``,
02:00 UTC): the run that starts at 02:00 on D+1 processes day D. Settings come from
``$FUNNELREC_CONFIG`` (see ``infra/defaults.yaml``); with ``airflow.spark_submit_conn_id`` set the
Spark stages are submitted with SparkSubmitOperator to that connection instead of running in the
worker's process.
"""

from __future__ import annotations

from datetime import UTC, datetime

from airflow.sdk import Asset, CronDataIntervalTimetable, dag, get_current_context, task, task_group

from infra.orchestration import CHAMPION_ASSET, REPO, data_date, default_args
from infra.settings import load_settings
from infra.spark import use_this_interpreter

SETTINGS = load_settings()
CFG = SETTINGS.airflow
CHAMPION = Asset(CHAMPION_ASSET)
SPARK_STAGES = ("ingest", "sessionize", "split")


def _settings():
    return load_settings()


def _ds() -> str:
    return data_date(get_current_context()).isoformat()


@task
def ingest() -> dict:
    from infra.spark import get_spark
    from jobs.ingest import run_ingest

    s, ds = _settings(), _ds()
    results = run_ingest(get_spark(s), s, data_date(get_current_context()))
    return {"ds": ds, "sources": [r.source for r in results]}


@task
def sessionize() -> str:
    from infra.spark import get_spark
    from jobs.sessionize import run_sessionize

    s = _settings()
    run_sessionize(get_spark(s), s, data_date(get_current_context()))
    return _ds()


@task
def split() -> str:
    from infra.spark import get_spark
    from jobs.split import run_split

    s = _settings()
    run_split(get_spark(s), s, data_date(get_current_context()))
    return _ds()


def _validate(table: str):
    @task(task_id=f"validate_{table}")
    def validate() -> dict:
        from infra.spark import get_spark
        from validation.validate import run_validate

        s = _settings()
        summary = run_validate(get_spark(s), s, table, data_date(get_current_context()))
        return {"ds": _ds(), "success": summary["success"], "data_docs": str(summary.get("data_docs"))}

    return validate()


def _spark_submit(stage: str):
    """The same stage as ``spark-submit infra/cli.py <stage> --date <ds>`` on a Spark connection.

    The date is computed when the task runs, by the same ``data_date`` rule as the in-process tasks
    (a Jinja template could not read the triggering asset events)."""
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    class StageSubmit(SparkSubmitOperator):
        def execute(self, context):
            self.application_args = [stage, "--date", data_date(context).isoformat()]
            use_this_interpreter()  # spark-submit's driver: the worker's venv, with the project
            return super().execute(context)

    return StageSubmit(
        task_id=stage,
        conn_id=CFG.spark_submit_conn_id,
        application=str(REPO / "infra" / "cli.py"),
        conf=dict(SETTINGS.spark.conf),
        name=f"funnelrec-{stage}",
    )


@task(pool=CFG.gpu_pool, pool_slots=1)
def train(model: str) -> dict:
    from training.train_evaluate import run_train

    meta = run_train(_settings(), _ds(), model)
    return {k: meta[k] for k in ("device", "best_epoch", "epochs_run", "seconds_per_epoch", "run_id")}


@task
def evaluate(model: str) -> dict:
    from training.train_evaluate import run_evaluate

    out = run_evaluate(_settings(), _ds(), model)
    return {split: values["standard"] for split, values in out.items()}


@task
def register(model: str) -> int:
    from training.registry import register as register_version

    return register_version(_settings(), _ds(), model)


# One slot: two dates (a backfill) never decide at once; the registry lease still guards the CLI.
@task(outlets=[CHAMPION], pool=CFG.promote_pool, pool_slots=1)
def promote(versions: list[int]) -> dict:
    from training.registry import promote as apply_policy

    ds = _ds()
    decision = apply_policy(_settings(), ds=ds)
    # Asset-triggered runs have no logical date: the scoring run reads the date from here.
    get_current_context()["outlet_events"][CHAMPION].extra = {
        "ds": ds,
        "decision": decision.action,
        "champion": decision.champion_after,
        "considered": decision.version,
    }
    return {"decision": decision.action, "version": decision.version, "champion": decision.champion_after}


@dag(
    dag_id="funnelrec_nightly",
    schedule=CronDataIntervalTimetable(CFG.schedule, timezone="UTC"),
    start_date=datetime.combine(CFG.start_date, datetime.min.time(), tzinfo=UTC),
    end_date=datetime.combine(CFG.end_date, datetime.max.time(), tzinfo=UTC) if CFG.end_date else None,
    catchup=False,
    max_active_runs=1,
    default_args=default_args(SETTINGS),
    tags=["funnelrec"],
    doc_md=__doc__,
)
def funnelrec_nightly():
    @task_group(group_id="etl")
    def etl():
        stages = {}
        for stage, fn in (("ingest", ingest), ("sessionize", sessionize), ("split", split)):
            stages[stage] = _spark_submit(stage) if CFG.spark_submit_conn_id else fn()
        checks = {t: _validate(t) for t in ("events", "sessions", "training")}
        stages["ingest"] >> checks["events"] >> stages["sessionize"] >> checks["sessions"]
        checks["sessions"] >> stages["split"] >> checks["training"]

    @task_group(group_id="train_eval")
    def train_eval():
        versions = []
        for model in SETTINGS.training.models:
            trained = train.override(task_id=f"train_{model}")(model)
            scored = evaluate.override(task_id=f"evaluate_{model}")(model)
            version = register.override(task_id=f"register_{model}")(model)
            trained >> scored >> version
            versions.append(version)
        promote(versions)

    # A task group that returns a value would wire that task, not the group: these return nothing.
    etl() >> train_eval()


funnelrec_nightly()
