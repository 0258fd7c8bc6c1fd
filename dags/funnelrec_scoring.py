"""funnelrec_scoring: build the date's serving context, score every active user with ``@champion``
from it, validate, publish.

Runs when the nightly DAG's promote task emits the ``funnelrec_champion`` asset (its extra carries
the data date: asset-triggered runs have no logical date) and, when ``airflow.scoring_schedule`` is
set, on its own daily cron, which scores the previous day. ``context -> validate_serving -> score ->
validate_scores -> publish -> prune``: the champion scores each user from the context as of the
date (never from its training tables), nothing is visible to analysts until the scores pass their
suite, and the publish swaps the date's partition in atomically.

The tasks and edges are built from the pipeline's declaration (``infra/pipeline.py``). A run scores
every date it was triggered for (``infra.orchestration.data_dates``): when the scheduler batches
several champion asset events into one run (a backfill), each task handles each date in order, so
no date goes unscored. ``prune`` applies retention (``training/retention.py``) as of each date.
"""

from __future__ import annotations

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, dag

from infra.orchestration import CHAMPION_ASSET, dag_arguments, pipeline_tasks
from infra.settings import load_settings

SETTINGS = load_settings()
CFG = SETTINGS.airflow


@dag(
    dag_id="funnelrec_scoring",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(CFG.scoring_schedule, timezone="UTC"), assets=[Asset(CHAMPION_ASSET)]
    )
    if CFG.scoring_schedule
    else [Asset(CHAMPION_ASSET)],
    **dag_arguments(SETTINGS, __doc__),
)
def funnelrec_scoring():
    pipeline_tasks("scoring", SETTINGS, batched=True)


funnelrec_scoring()
