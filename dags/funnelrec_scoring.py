"""funnelrec_scoring: build the date's serving context, score every active user with ``@champion``
from it, validate, publish.

Runs when the nightly DAG's promote task emits the ``funnelrec_champion`` asset (its extra carries
the data date: asset-triggered runs have no logical date) and on its own daily cron
(``airflow.scoring_schedule``), which scores the previous day. ``context -> validate_serving ->
score -> validate_scores -> publish``: the champion scores each user from the context as of the
date (never from its training tables), nothing is visible to analysts until the scores pass their
suite, and the publish swaps the date's partition in atomically.
"""

from __future__ import annotations

from datetime import UTC, datetime

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, dag, get_current_context, task

from infra.orchestration import CHAMPION_ASSET, data_date, default_args
from infra.settings import load_settings

SETTINGS = load_settings()
CFG = SETTINGS.airflow


def _date():
    return data_date(get_current_context())


@task
def context() -> dict:
    from infra.spark import get_spark
    from jobs.context import run_context

    s = load_settings()
    r = run_context(get_spark(s), s, _date())
    return {"ds": _date().isoformat(), "users": r.users, "items": r.items}


@task
def score() -> dict:
    from training.score import run_score

    s = load_settings()
    spark = None
    if s.scoring.path == "spark":
        from infra.spark import get_spark

        spark = get_spark(s)
    result = run_score(s, _date(), spark=spark)
    return {"ds": _date().isoformat(), "version": result["champion"]["version"], "rows": result["rows"]}


def _validate(table: str):
    @task(task_id=f"validate_{table}")
    def validate() -> dict:
        from infra.spark import get_spark
        from validation.stage import run_validate

        s = load_settings()
        summary = run_validate(get_spark(s), s, table, _date())
        return {"success": summary["success"]}

    return validate()


@task
def publish() -> dict:
    from jobs.publish import run_publish

    return run_publish(load_settings(), _date())


@dag(
    dag_id="funnelrec_scoring",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(CFG.scoring_schedule, timezone="UTC"), assets=[Asset(CHAMPION_ASSET)]
    ),
    start_date=datetime.combine(CFG.start_date, datetime.min.time(), tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(SETTINGS),
    tags=["funnelrec"],
    doc_md=__doc__,
)
def funnelrec_scoring():
    context() >> _validate("serving") >> score() >> _validate("scores") >> publish()


funnelrec_scoring()
