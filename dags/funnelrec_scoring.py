"""funnelrec_scoring: build the date's serving context, score every active user with ``@champion``
from it, validate, publish.

Runs when the nightly DAG's promote task emits the ``funnelrec_champion`` asset (its extra carries
the data date: asset-triggered runs have no logical date) and on its own daily cron
(``airflow.scoring_schedule``), which scores the previous day. ``context -> validate_serving ->
score -> validate_scores -> publish -> prune``: the champion scores each user from the context as of the
date (never from its training tables), nothing is visible to analysts until the scores pass their
suite, and the publish swaps the date's partition in atomically.

A run scores every date it was triggered for (``infra.orchestration.data_dates``): when the
scheduler batches several champion asset events into one run (a backfill), each task handles each
date in order, so no date goes unscored. ``prune`` applies retention (``training/retention.py``)
as of the run's latest date.
"""

from __future__ import annotations

from datetime import UTC, datetime

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, dag, get_current_context, task

from infra.orchestration import CHAMPION_ASSET, data_dates, default_args
from infra.settings import load_settings

SETTINGS = load_settings()
CFG = SETTINGS.airflow


def _dates():
    return data_dates(get_current_context())


@task
def context() -> dict:
    from infra.spark import get_spark
    from jobs.context import run_context

    s = load_settings()
    out = {}
    for d in _dates():
        r = run_context(get_spark(s), s, d)
        out[d.isoformat()] = {"users": r.users, "items": r.items}
    return out


@task
def score() -> dict:
    from training.score import run_score

    s = load_settings()
    spark = None
    if s.scoring.path == "spark":
        from infra.spark import get_spark

        spark = get_spark(s)
    out = {}
    for d in _dates():
        result = run_score(s, d, spark=spark)
        out[d.isoformat()] = {"version": result["champion"]["version"], "rows": result["rows"]}
    return out


def _validate(table: str):
    @task(task_id=f"validate_{table}")
    def validate() -> dict:
        from infra.spark import get_spark
        from validation.validate import run_validate

        s = load_settings()
        return {d.isoformat(): run_validate(get_spark(s), s, table, d)["success"] for d in _dates()}

    return validate()


@task
def publish() -> dict:
    from jobs.publish import run_publish

    return {d.isoformat(): run_publish(load_settings(), d) for d in _dates()}


@task
def prune() -> dict:
    from training.retention import run_retention

    r = run_retention(load_settings(), max(_dates()))
    return {"removed": len(r.removed), "pruned_versions": r.pruned_versions}


@dag(
    dag_id="funnelrec_scoring",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(CFG.scoring_schedule, timezone="UTC"), assets=[Asset(CHAMPION_ASSET)]
    )
    if CFG.scoring_schedule
    else [Asset(CHAMPION_ASSET)],
    start_date=datetime.combine(CFG.start_date, datetime.min.time(), tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(SETTINGS),
    tags=["funnelrec"],
    doc_md=__doc__,
)
def funnelrec_scoring():
    context() >> _validate("serving") >> score() >> _validate("scores") >> publish() >> prune()


funnelrec_scoring()
