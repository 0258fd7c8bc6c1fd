"""The `validate` stage, as the pipeline declares it (``infra/pipeline.py``): one step per table it
checks, each a gate that every reader of that table waits for."""

from __future__ import annotations

from datetime import date

from infra.pipeline import DATE, Option, Outcome, Stage, Step
from infra.settings import Settings

#: ``--table`` -> (the catalogue entries the suite reads, the one it checks, DAG, task group).
TABLES: dict[str, tuple[tuple[str, ...], str, str, str | None]] = {
    "events": (("events",), "events", "nightly", "etl"),
    "sessions": (("sessionized",), "sessionized", "nightly", "etl"),
    "training": (("training",), "training", "nightly", "etl"),
    "serving": (("serving",), "serving", "scoring", None),
    "scores": (("scores_staged", "serving"), "scores_staged", "scoring", None),
}


def validate(settings: Settings, date: date, table: str) -> Outcome:
    """Validate a table of a date with its Great Expectations suite.

    Validate a table of --date with its Great Expectations suite, run as a GX checkpoint on the
    Spark DataFrame: events (the history window), sessions (sessionized/ds=D), training
    (training/ds=D), serving (serving/ds=D) or scores (the staged or published scores of D, against
    serving/ds=D). Writes warehouse/validation/TABLE/ds=D/result.json and the Data Docs site
    (validation.data_docs_dir); exits 1 listing each failed expectation.
    """
    from infra.spark import get_spark
    from validation.validate import result_path, run_validate

    summary = run_validate(get_spark(settings), settings, table, date)
    ds = date.isoformat()
    return Outcome(
        f"{table} {ds}: all expectations passed; results {result_path(settings, table, ds)}\n"
        f"Data Docs: {summary['data_docs']}",
        {"ds": ds, "success": summary["success"], "data_docs": str(summary.get("data_docs"))},
    )


STAGES: tuple[Stage, ...] = (
    Stage(
        "validate",
        validate,
        options=(DATE, Option("table", str, "the table to validate", required=True, choices=tuple(TABLES))),
        steps=tuple(
            Step(
                reads=reads,
                checks=(checked,),
                writes=(f"validation/{table}",),
                dag=dag,
                group=group,
                task=f"validate_{table}",
                options={"table": table},
            )
            for table, (reads, checked, dag, group) in TABLES.items()
        ),
        spark=True,
    ),
)
