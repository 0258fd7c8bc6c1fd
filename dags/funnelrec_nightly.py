"""funnelrec_nightly: the nightly pipeline for one data date.

etl:        ingest -> validate_events -> sessionize -> validate_sessions -> split -> validate_training
train_eval: per model of ``training.models``: train_<m> (pool ``airflow.gpu_pool``; CUDA when the
            worker has it) -> evaluate_<m> -> register_<m>; then promote (pool ``airflow.promote_pool``,
            one slot), which emits the ``funnelrec_champion`` asset with the data date in its extra
            (the scoring DAG runs on it).

The tasks, their groups, pools and edges are built from the pipeline's declaration
(``infra/pipeline.py``; each stage package's ``pipeline.py``): a step runs after the steps that write
or validate the tables it reads. Every task calls the same stage function as the CLI and rewrites
only its date's outputs, so a rerun or a backfill of a date is safe. The schedule is a cron data
interval (``airflow.schedule``, 02:00 UTC): the run that starts at 02:00 on D+1 processes day D.
Settings come from ``$FUNNELREC_CONFIG`` (see ``infra/defaults.yaml``); with
``airflow.spark_submit_conn_id`` set, the Spark jobs (ingest, sessionize, split) are submitted with
SparkSubmitOperator to that connection instead of running in the worker's process.
"""

from __future__ import annotations

from datetime import UTC, datetime

from airflow.sdk import CronDataIntervalTimetable, dag

from infra.orchestration import dag_arguments, pipeline_tasks
from infra.settings import load_settings

SETTINGS = load_settings()
CFG = SETTINGS.airflow


@dag(
    dag_id="funnelrec_nightly",
    schedule=CronDataIntervalTimetable(CFG.schedule, timezone="UTC"),
    end_date=datetime.combine(CFG.end_date, datetime.max.time(), tzinfo=UTC) if CFG.end_date else None,
    **dag_arguments(SETTINGS, __doc__),
)
def funnelrec_nightly():
    pipeline_tasks("nightly", SETTINGS)


funnelrec_nightly()
