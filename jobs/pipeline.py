"""The Spark jobs' stages, as the pipeline declares them (``infra/pipeline.py``).

Each function here is what the CLI command, the DAG task and the test fixtures call: it starts what
the stage needs (the SparkSession), calls the job and says what it wrote. The job modules are
imported inside the functions, so declaring the stages imports no Spark.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

from infra.pipeline import DATE, Name, Option, Outcome, Stage, Step
from infra.settings import Settings
from infra.tables import SERVING, SESSIONIZED, TRAINING


def ingest(settings: Settings, date: date, source: list[str] | None = None) -> Outcome:
    """Raw logs of each source -> events and quarantine.

    Read the raw logs of each configured source (paths.data_root + its mapping) and write the
    canonical `events` table (warehouse/events/source=S/event_date=D) and refused rows to
    `quarantine` (quarantine_root/source=S/run_date=D).
    """
    from infra.spark import get_spark
    from jobs.ingest import run_ingest, summary_json

    results = run_ingest(get_spark(settings), settings, date, source or None)
    return Outcome(summary_json(results), {"ds": date.isoformat(), "sources": [r.to_dict() for r in results]})


def sessionize(settings: Settings, date: date) -> Outcome:
    """Events of the history window -> sessions.

    Read `events` of the history window ending on --date and write `sessions` and `session_events`
    (warehouse/sessionized/ds=D).
    """
    from infra.spark import get_spark
    from jobs.sessionize import run_sessionize

    r = run_sessionize(get_spark(settings), settings, date)
    target = SESSIONIZED.dir(settings.paths.warehouse_root, date)
    return Outcome(
        f"sessions: {r.sessions} over {r.events} events of {r.users} users -> {target}",
        {"ds": date.isoformat(), "sessions": r.sessions, "events": r.events, "users": r.users},
    )


def split(
    settings: Settings, date: date | None = None, benchmark: str | None = None, name: str | None = None
) -> Outcome:
    """Sessions -> training tables and held-out purchases.

    Read `session_events` of --date and write the training tables: interactions, visited sets, held-
    out purchases labelled visited/unvisited, id maps and a manifest (warehouse/training/ds=D). With
    --benchmark FOLDER, read an MBGCN/MEMBER benchmark folder instead and reproduce MEMBER's split
    (warehouse/training/ds=NAME).
    """
    import json

    from infra.spark import get_spark

    spark = get_spark(settings)
    if benchmark:
        from jobs.benchmarks import run_benchmark_split

        manifest = run_benchmark_split(spark, settings, Path(benchmark), name)
    else:
        from jobs.split import run_split

        manifest = run_split(spark, settings, date)
    target = TRAINING.dir(settings.paths.warehouse_root, manifest["ds"])
    return Outcome(f"{json.dumps(manifest['stats'], indent=2)}\ntraining tables -> {target}", manifest)


def context(settings: Settings, date: date) -> Outcome:
    """Events up to the date -> serving context and catalogue.

    Build what scoring of --date reads from the events up to it: each active user's context (visited
    set and purchases of the last split.observation_days days, last scoring.history_length events)
    and the date's catalogue (items with an event in the last scoring.catalogue_days days, by
    popularity), written to warehouse/serving/ds=D.
    """
    from infra.spark import get_spark
    from jobs.context import run_context

    r = run_context(get_spark(settings), settings, date)
    target = SERVING.dir(settings.paths.warehouse_root, date)
    return Outcome(
        f"context of {r.users} active users, catalogue of {r.items} items -> {target}",
        {"users": r.users, "items": r.items},
    )


def publish(settings: Settings, date: date) -> Outcome:
    """Validated scores -> published scores, DuckDB marts, report.

    Move the validated scores of --date into warehouse/scores/ds=D atomically, rebuild the analysts'
    DuckDB file (warehouse/analytics/funnelrec.duckdb: fct_recommendations, recommendations_latest,
    dim_items, dim_users, agg_item_exposure, agg_catalog_coverage, model_runs, decisions, outcomes)
    and write warehouse/reports/ds=D/report.html.
    """
    from jobs.publish import run_publish

    out = run_publish(settings, date)
    lines = [f"{out['rows']} recommendations for {out['users']} users published for {date}:"]
    lines += [f"  {key:<8} {out[key]}" for key in ("scores", "duckdb", "report")]
    return Outcome("\n".join(lines), {k: str(v) for k, v in out.items()})


def forget(
    settings: Settings, user: list[str] | None = None, file: str | None = None, source: str | None = None
) -> Outcome:
    """Remove users' rows from every table, on request.

    Record the request (warehouse/forget_requests, so ingest drops the users' rows from now on),
    then rewrite, each atomically, every partition and bundle holding one of the --user ids (or
    those in --file, one per line): events, quarantine, sessions, training tables (the user_map row
    keeps its index under a tombstone id), serving context, scores; rebuild the analysts' DuckDB
    file. With --source, only that source's ids. Models trained on the old tables age out with
    retention.
    """
    import json

    from jobs.forget import read_user_list, run_forget

    users = list(user or []) if file is None else read_user_list(Path(file))
    r = run_forget(settings, users, source)
    removed = ", ".join(f"{k} {v}" for k, v in sorted(r.removed.items())) or "nothing (no table held them)"
    text = (
        f"forgot {r.users} users (request {r.request_id}): removed {removed}; "
        f"{len(r.rewritten)} folders rewritten"
        + ("; analysts' database rebuilt" if r.analytics_rebuilt else "")
    )
    return Outcome(text, json.loads(json.dumps(r.to_dict())))


def sql(settings: Settings, query: str | None = None, file: str | None = None, limit: int = 100) -> Outcome:
    """Query the analysts' marts read-only.

    Run --query (or the SQL in --file) on warehouse/analytics/funnelrec.duckdb through the analysts'
    connection: the file opened read-only, only queries (SELECT, FROM, DESCRIBE, SHOW, SUMMARIZE),
    files readable only under the published tables; print at most --limit rows as tab-separated
    text with a header.
    """
    from jobs.publish import run_query

    text = query if query is not None else Path(file).read_text()
    columns, rows = run_query(settings, text, limit if limit > 0 else None)
    lines = ["\t".join(columns), *("\t".join("" if v is None else str(v) for v in row) for row in rows)]
    return Outcome("\n".join(lines), {"columns": columns, "rows": len(rows)})


def synth(
    settings: Settings,
    events: int,
    seed: int = 0,
    out: str | None = None,
    end_date: date = date(2017, 12, 3),
    days: int = 9,
    plant_sequence: float = 0.0,
    p_follow: float = 0.8,
    p_buy_follow: float = 0.3,
    facets: int = 0,
    facet_values: int = 8,
    values_per_user: int = 2,
    p_facet: float = 0.7,
    long_tail: float = 0.0,
    p_buy_unseen: float = 0.0,
) -> Outcome:
    """Write a seeded synthetic log (Taobao format).

    Write a seeded synthetic log in the Taobao UserBehavior format (power-law items, sessions, view
    -> fav/cart -> purchase funnels, daily rhythm), streamed to part-NNNNN.csv files under --out
    (default <data_root>/synthetic). Reads nothing. Optionally plant structure for sequence models:
    successor items (--plant-sequence), faceted items and users (--facets), long-tail users with 1-3
    events (--long-tail), sessions that end in a buy of an item not viewed in them, drawn from the
    user's preferred facet values when --facets is on (--p-buy-unseen); then the ground truth goes to
    planted/ beside the log (planted.json, planted_items.csv, planted_users.csv), which the
    `synthetic` mapping does not read.
    """
    from infra.logs import stage
    from jobs.synth import SynthParams, generate

    folder = Path(out) if out else settings.paths.data_root / "synthetic"
    params = SynthParams(
        events=events,
        seed=seed,
        end_date=end_date,
        days=days,
        plant_sequence=plant_sequence,
        p_follow=p_follow,
        p_buy_follow=p_buy_follow,
        facets=facets,
        facet_values=facet_values,
        values_per_user=values_per_user,
        p_facet=p_facet,
        long_tail=long_tail,
        p_buy_unseen=p_buy_unseen,
    )
    with stage("synth", events=events, seed=seed) as counts:
        result = generate(folder, params)
        counts.update(users=result.users, files=len(result.files), **result.counts, **result.planted_counts)
    planted = f"; ground truth in {result.planted}" if result.planted else ""
    return Outcome(
        f"{result.events} events of {result.users} users in {len(result.files)} file(s) under {folder} "
        f"(Taobao format; ingest with the `synthetic` mapping){planted}",
        {
            "events": result.events,
            "users": result.users,
            "files": len(result.files),
            "planted": str(result.planted) if result.planted else None,
            **result.planted_counts,
        },
    )


STAGES: tuple[Stage, ...] = (
    Stage(
        "ingest",
        ingest,
        options=(
            DATE,
            Option(
                "source",
                list,
                "source mapping name or YAML path (repeatable); default: pipeline.sources",
                metavar="SOURCE",
            ),
        ),
        steps=(Step(reads=("raw_logs",), writes=("events", "quarantine"), group="etl"),),
        submit=True,
    ),
    Stage(
        "sessionize",
        sessionize,
        options=(DATE,),
        steps=(Step(reads=("events",), writes=("sessionized",), group="etl"),),
        submit=True,
    ),
    Stage(
        "split",
        split,
        options=(
            Option("date", date, "run date (UTC day)", metavar="YYYY-MM-DD"),
            Option("benchmark", str, "benchmark folder (user item files per behaviour)", metavar="FOLDER"),
            Option("name", Name, "name of the benchmark's tables (default: the folder name)"),
        ),
        one_of=(("date", "benchmark"),),
        steps=(Step(reads=("sessionized",), writes=("training",), group="etl"),),
        submit=True,
    ),
    Stage(
        "context",
        context,
        options=(DATE,),
        steps=(Step(reads=("events",), writes=("serving",), dag="scoring"),),
        spark=True,
    ),
    Stage(
        "publish",
        publish,
        options=(DATE,),
        steps=(
            Step(
                reads=("scores_staged", "serving", "events", "decisions", "model_runs"),
                writes=("scores", "analytics", "report"),
                dag="scoring",
            ),
        ),
    ),
    Stage(
        "forget",
        forget,
        options=(
            Option("user", list, "a user id to forget (repeatable)", metavar="ID"),
            Option("file", str, "a file of user ids, one per line (# comments)", metavar="PATH"),
            Option("source", Name, "only ids of this source mapping (default: every source)"),
        ),
        one_of=(("user", "file"),),
        spark=True,
    ),
    Stage(
        "sql",
        sql,
        options=(
            Option("query", str, "the SQL query", metavar="SQL"),
            Option("file", str, "a file holding the SQL query", metavar="PATH"),
            Option("limit", int, "rows printed at most (0: all)", default=100),
        ),
        one_of=(("query", "file"),),
    ),
    Stage(
        "synth",
        synth,
        options=(
            Option("events", int, "number of events (1e5 .. 1e8)", required=True),
            Option("seed", int, "seed of the generator", default=0),
            Option("out", str, "output folder (default <data_root>/synthetic)"),
            Option("end_date", date, "last day of the log", default=date(2017, 12, 3), metavar="YYYY-MM-DD"),
            Option("days", int, "days the log spans", default=9),
            Option(
                "plant_sequence",
                float,
                "share of items given a successor item (0: off)",
                default=0.0,
                metavar="SHARE",
            ),
            Option(
                "p_follow",
                float,
                "chance the view after a view of such an item is its successor",
                default=0.8,
                metavar="P",
            ),
            Option(
                "p_buy_follow",
                float,
                "chance a successor view is bought, on top of the funnel",
                default=0.3,
                metavar="P",
            ),
            Option("facets", int, "facets of items and users (0: off)", default=0, metavar="N"),
            Option("facet_values", int, "values of each facet", default=8, metavar="N"),
            Option("values_per_user", int, "values of each facet a user prefers", default=2, metavar="N"),
            Option(
                "p_facet",
                float,
                "chance a fresh item comes from the user's preferred values of their dominant facet",
                default=0.7,
                metavar="P",
            ),
            Option(
                "long_tail",
                float,
                "share of users with only 1-3 events (0: off)",
                default=0.0,
                metavar="SHARE",
            ),
            Option(
                "p_buy_unseen",
                float,
                "chance a session (not a long-tail user's) ends in a lone buy of an item not viewed in it, "
                "drawn from the user's preferred facet values with --facets, else by popularity (0: off)",
                default=0.0,
                metavar="P",
            ),
        ),
    ),
)
