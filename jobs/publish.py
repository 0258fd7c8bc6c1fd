"""The ``publish`` stage: make a date's validated scores visible, refresh the analysts' DuckDB file
and write the daily report.

1. ``scores_staged/ds=<d>`` (written by ``score``, checked by the scores suite) is swapped into
   ``scores/ds=<d>`` atomically: a reader sees the previous partition or the new one, never a mix,
   and a publish killed midway leaves the previous good partition readable.
2. ``analytics/funnelrec.duckdb`` is rebuilt beside the old file and renamed over it (readers keep
   the file they opened). Views read the published Parquet directly, so they are never stale:

   ==========================  ====================================================================
   ``fct_recommendations``     every published recommendation, all dates (view over scores/)
   ``recommendations_latest``  the latest date only (view)
   ``dim_items``               the published date's catalogue (``serving/ds=<d>/catalogue``: the
                               only items that may be recommended): category, funnel counts, popularity
   ``dim_users``               the published date's active users (``serving_context``): activity,
                               visited-set size, whether scored
   ``fct_catalogue``           every date's catalogue, with ``ds`` (view over ``serving/``)
   ``agg_item_exposure``       per date and item: users it was recommended to, mean rank (view)
   ``agg_catalog_coverage``    per date: distinct items recommended / items in that date's catalogue
                               (view; at most 1, since only catalogue items are recommended)
   ``model_runs``              every evaluated run: model, date, metrics, registered version, aliases
                               (table over ``model_runs/``, written by ``evaluate`` and ``register``)
   ``fct_promotion_gates``     every promotion decision: per date, candidate and gate (view over
                               ``decisions/``, written by ``promote``)
   ``fct_recommendation_outcomes``  every published recommendation and whether the user bought the
                               item in the ``scoring.outcome_days`` days after its date (view)
   ``agg_recommendation_outcomes``  hit rate at 10 and at K per date and serving model version:
                               overall, by item type, by expert (view)
   ==========================  ====================================================================
3. ``reports/ds=<d>/report.html``: see ``jobs.report``.

Reruns of a date give the same rows (the scores are a function of the champion and the events).
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path
from typing import Any

import duckdb

from infra import atomic
from infra.logs import stage
from infra.settings import Settings
from infra.tables import (
    CATALOGUE,
    DECISIONS,
    MODEL_RUNS,
    SCORES,
    SERVING,
    SERVING_CONTEXT,
    analytics_db,
    events_dir,
    events_query,
    model_runs_dir,
    scores_dir,
    scores_partition_dir,
    scores_staged_dir,
)

#: Table and view documentation, written into the database as COMMENTs (``duckdb_views()``,
#: ``duckdb_tables()``) so analysts can read it where they query.
DOCS = {
    "fct_recommendations": "Top-K recommendations per active user and date, all published dates. "
    "Columns as in the scores table; one row per (ds, user_id, rank).",
    "recommendations_latest": "fct_recommendations restricted to the latest published date.",
    "dim_items": "The catalogue of the latest published date: items with an event in the last "
    "scoring.catalogue_days days (the only items that may be recommended), category, "
    "view/fav/cart/purchase counts, distinct users and popularity rank (1 = most purchased).",
    "dim_users": "The active users of the latest published date (its serving context): latest event, events "
    "and distinct items bought in the context window, visited-set size (distinct items viewed, faved or "
    "carted) and whether they were scored.",
    "fct_catalogue": "Every date's catalogue (dim_items per date), with ds.",
    "agg_item_exposure": "Per date and item: users the item was recommended to, share of scored users, "
    "mean rank, visited/unvisited split.",
    "agg_catalog_coverage": "Per date: distinct items recommended, that date's catalogue size, coverage share "
    "(at most 1).",
    "model_runs": "Every evaluated training run of the experiment: model, data date, validation/test metrics "
    "per setting (HR and NDCG, and chance_HR: what a random ranking of the same candidates scores), "
    "registered version, and the aliases it held at this publish (champion: it served the latest published "
    "date; challenger: the version registered last).",
    "fct_recommendation_outcomes": "Every published recommendation with its outcome: bought (the user "
    "purchased the item on D+1..D+N, N = scoring.outcome_days), first_bought_at, days_observed (how many of "
    "those N days have events yet) and complete (all N have). Updated as later nights arrive.",
    "agg_recommendation_outcomes": "Per date, serving model version and slice (all, item_type=..., expert=...): "
    "users, hit_rate_at_10 and hit_rate_at_k (share of the slice's users with a bought item among their "
    "top 10 / all K recommendations of the slice), days_observed and complete.",
    "fct_promotion_gates": "Every promotion decision (the decisions table): per date, candidate version and "
    "gate, its status (pass, fail, not_evaluable), the candidate's and the champion's means on the same "
    "users, the relative change and its bootstrap interval, and the outcome.",
}


def publish_scores(settings: Settings, run_date: date) -> Path:
    """Swap the staged scores of ``run_date`` into ``scores/``; a rerun after publishing is a no-op."""
    wh = settings.paths.warehouse_root
    staged = scores_staged_dir(wh, run_date.isoformat())
    target = scores_partition_dir(wh, run_date.isoformat())
    if staged.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic.swap_in(staged, target)
    elif not target.exists():
        raise FileNotFoundError(
            f"no scores for {run_date} at {staged} or {target}: run `funnelrec score` first"
        )
    return target


def _sql(text: str) -> str:
    """A SQL string literal."""
    return "'" + str(text).replace("'", "''") + "'"


def _empty(table) -> str:
    """A query of no rows with ``table``'s columns and types."""
    types = table.duckdb_types()
    return "SELECT " + ", ".join(f"CAST(NULL AS {t}) AS {c}" for c, t in types.items()) + " WHERE false"


def _model_runs_table(settings: Settings, wh: Path) -> str:
    """``model_runs``: the ``model_runs`` rows of the configured experiment, oldest run first, with
    the version registered in ``mlflow.registered_model`` and the aliases it holds as of the latest
    published date: ``champion`` (the version that served it) and ``challenger`` (the version
    registered last). A table, not a view: the aliases are those of this publish."""
    root = model_runs_dir(wh)
    source = (
        f"SELECT * FROM read_parquet('{root}/ds=*/run=*/*.parquet', hive_partitioning = false) "
        f"WHERE experiment = {_sql(settings.mlflow.experiment)}"
        if any(root.glob("ds=*/run=*/*.parquet"))
        else _empty(MODEL_RUNS)
    )
    name = _sql(settings.mlflow.registered_model)
    mine = f"registered_model = {name}"
    columns = []
    for c in MODEL_RUNS.column_names:
        if c == "registered_version":
            columns += [
                f"CASE WHEN {mine} THEN registered_version END AS registered_version",
                "concat_ws(',', "
                f"CASE WHEN {mine} AND registered_version = (SELECT version FROM challenger) "
                "THEN 'challenger' END, "
                "CASE WHEN registered_model = (SELECT model_name FROM served) "
                "AND registered_version = (SELECT version FROM served) THEN 'champion' END) AS aliases",
            ]
        else:
            columns.append(c)
    return f"""
        CREATE TABLE model_runs AS
        WITH runs AS ({source}),
        served AS (
            SELECT any_value(model_name) AS model_name, any_value(model_version) AS version
            FROM fct_recommendations WHERE ds = (SELECT max(ds) FROM fct_recommendations)
        ),
        challenger AS (
            SELECT registered_version AS version FROM runs WHERE {mine}
            ORDER BY registered_at DESC LIMIT 1
        )
        SELECT {", ".join(columns)} FROM runs ORDER BY started_at, run_id
    """


def _decisions_view(wh: Path) -> str:
    """``fct_promotion_gates`` over ``decisions/ds=*/``; with no decision yet, an empty view of the same columns."""
    root = Path(wh) / DECISIONS.name
    if any(root.glob("ds=*/*.parquet")):
        return (
            "CREATE VIEW fct_promotion_gates AS SELECT * EXCLUDE (ds), CAST(ds AS DATE) AS ds "
            f"FROM read_parquet('{root}/ds=*/*.parquet', hive_partitioning = false)"
        )
    return f"CREATE VIEW fct_promotion_gates AS SELECT * REPLACE (CAST(ds AS DATE) AS ds) FROM ({_empty(DECISIONS)})"


def outcome_views(con, scores: Path, events: Path, sources: list[str], days: int) -> None:
    """``fct_recommendation_outcomes`` and ``agg_recommendation_outcomes`` on ``con``: published
    recommendations (``scores``) joined with the purchases of the ``events`` table on the ``days``
    days after each date (the date itself excluded: it is in the context the list was made from)."""
    ev = events_query(events, sources)
    con.execute(
        f"""
        CREATE VIEW fct_recommendation_outcomes AS
        WITH recs AS (
            SELECT CAST(ds AS DATE) AS ds, user_id, rank, item_id, item_type, expert, model, model_version
            FROM read_parquet('{scores}/ds=*/*.parquet', hive_partitioning = true)
        ),
        buys AS (
            SELECT user_id, item_id, event_time, event_date FROM ({ev}) WHERE behavior = 'purchase'
        ),
        seen AS (SELECT max(event_date) AS last_day FROM ({ev})),
        hits AS (
            SELECT r.ds, r.user_id, r.item_id, min(b.event_time) AS first_bought_at
            FROM recs r JOIN buys b ON b.user_id = r.user_id AND b.item_id = r.item_id
             AND b.event_date > r.ds AND b.event_date <= r.ds + INTERVAL {days} DAY
            GROUP BY ALL
        )
        SELECT r.*, h.first_bought_at IS NOT NULL AS bought, h.first_bought_at,
               CAST(greatest(0, least({days}, date_diff('day', r.ds, (SELECT last_day FROM seen)))) AS INTEGER)
                   AS days_observed,
               date_diff('day', r.ds, (SELECT last_day FROM seen)) >= {days} AS complete
        FROM recs r LEFT JOIN hits h USING (ds, user_id, item_id);

        CREATE VIEW agg_recommendation_outcomes AS
        WITH per_user AS (
            SELECT ds, model_version, user_id,
                   CASE WHEN GROUPING(item_type) = 0 THEN 'item_type=' || item_type
                        WHEN GROUPING(expert) = 0 THEN 'expert=' || coalesce(expert, 'none')
                        ELSE 'all' END AS slice,
                   bool_or(bought AND rank <= 10) AS hit_at_10,
                   bool_or(bought) AS hit_at_k,
                   any_value(days_observed) AS days_observed,
                   any_value(complete) AS complete
            FROM fct_recommendation_outcomes
            GROUP BY GROUPING SETS ((ds, model_version, user_id), (ds, model_version, user_id, item_type),
                                    (ds, model_version, user_id, expert))
        )
        SELECT ds, model_version, slice, count(*) AS users,
               avg(CAST(hit_at_10 AS DOUBLE)) AS hit_rate_at_10,
               avg(CAST(hit_at_k AS DOUBLE)) AS hit_rate_at_k,
               any_value(days_observed) AS days_observed, bool_and(complete) AS complete
        FROM per_user GROUP BY ds, model_version, slice;
        """
    )


def build_analytics(settings: Settings, run_date: date) -> Path:
    """Rebuild the analysts' DuckDB file next to the old one, then rename it over it."""
    wh = settings.paths.warehouse_root
    target = analytics_db(wh)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        # Left by a publish that was killed before its rename (its process is gone): never read.
        pid = stale.name.rsplit(".", 2)[-2]
        if stale == tmp or not pid.isdigit() or not atomic.pid_alive(int(pid)):
            stale.unlink(missing_ok=True)
    scores = scores_dir(wh)
    serving = Path(wh) / SERVING.name
    if not SERVING.dir(wh, run_date).exists():
        raise FileNotFoundError(
            f"no serving bundle for {run_date} at {SERVING.dir(wh, run_date)}: run `funnelrec context` first"
        )
    con = duckdb.connect(str(tmp))
    try:
        # union_by_name: partitions scored before a column was added read it as null.
        con.execute(
            f"""
            CREATE VIEW fct_recommendations AS
            SELECT CAST(ds AS DATE) AS ds, {", ".join(SCORES.data_columns)}
            FROM read_parquet('{scores}/ds=*/*.parquet', hive_partitioning = true, union_by_name = true);

            CREATE VIEW recommendations_latest AS
            SELECT * FROM fct_recommendations WHERE ds = (SELECT max(ds) FROM fct_recommendations);

            CREATE VIEW fct_catalogue AS
            SELECT CAST(ds AS DATE) AS ds, {", ".join(CATALOGUE.column_names)}
            FROM read_parquet('{serving}/ds=*/{CATALOGUE.name}/*.parquet', hive_partitioning = true);

            CREATE TABLE dim_items AS
            SELECT {", ".join(CATALOGUE.column_names)}
            FROM read_parquet('{serving}/ds={run_date}/{CATALOGUE.name}/*.parquet', hive_partitioning = false);

            CREATE TABLE dim_users AS
            WITH scored AS (SELECT DISTINCT user_id FROM fct_recommendations WHERE ds = DATE '{run_date}')
            SELECT c.user_id,
                   c.last_event,
                   c.events AS n_events,
                   len(c.bought) AS bought_items,
                   len(c.visited) AS visited_set_size,
                   scored.user_id IS NOT NULL AS scored_latest
            FROM read_parquet('{serving}/ds={run_date}/{SERVING_CONTEXT.name}/*.parquet', hive_partitioning = false) c
            LEFT JOIN scored USING (user_id);

            CREATE VIEW agg_item_exposure AS
            SELECT ds, item_id,
                   count(*) AS n_users,
                   count(*) / any_value(users_of_day) AS share_of_users,
                   avg(rank) AS mean_rank,
                   count(*) FILTER (WHERE item_type = 'visited') AS n_visited,
                   count(*) FILTER (WHERE item_type = 'unvisited') AS n_unvisited
            FROM (SELECT *, count(DISTINCT user_id) OVER (PARTITION BY ds) AS users_of_day FROM fct_recommendations)
            GROUP BY ds, item_id;

            CREATE VIEW agg_catalog_coverage AS
            WITH rec AS (SELECT ds, count(DISTINCT item_id) AS items_recommended FROM fct_recommendations GROUP BY ds),
                 cat AS (SELECT ds, count(*) AS catalogue_items FROM fct_catalogue GROUP BY ds)
            SELECT rec.ds, rec.items_recommended, cat.catalogue_items,
                   rec.items_recommended / cat.catalogue_items AS coverage
            FROM rec LEFT JOIN cat USING (ds);
            """
        )
        con.execute(_model_runs_table(settings, wh))
        con.execute(_decisions_view(wh))
        outcome_views(
            con, scores, events_dir(wh), list(settings.pipeline.sources), settings.scoring.outcome_days
        )
        for name, doc in DOCS.items():
            kind = (
                "VIEW" if name.startswith(("fct_", "agg_")) or name == "recommendations_latest" else "TABLE"
            )
            con.execute(f"COMMENT ON {kind} {name} IS '{doc.replace(chr(39), chr(39) * 2)}'")
    finally:
        con.close()
    # Read-only on disk too: a plain `duckdb FILE` of another user cannot change the marts (the next
    # publish replaces the file by rename, which the folder's permission governs, not the file's).
    os.chmod(tmp, 0o444)
    os.replace(tmp, target)
    return target


class QueryError(ValueError):
    """An analyst's query that was refused or failed; the message says why, on one line."""


#: Statements an analyst may run: queries only (``DESCRIBE``, ``SHOW``, ``SUMMARIZE`` and ``FROM``
#: parse as SELECT). ``EXPLAIN ANALYZE`` would execute what it explains, so EXPLAIN is left out.
ANALYST_STATEMENTS = ("SELECT",)


def analyst_connection(settings: Settings) -> duckdb.DuckDBPyConnection:
    """The analysts' connection to the marts: the DuckDB file opened read-only, files readable only
    under the published tables the views read (scores, serving, events, decisions, model_runs), no
    extensions loaded, and the configuration locked so a query cannot lift any of it."""
    wh = Path(settings.paths.warehouse_root)
    db = analytics_db(wh)
    if not db.is_file():
        raise FileNotFoundError(f"no analysts' database at {db}: run `funnelrec publish` for a date first")
    readable = [scores_dir(wh), wh / SERVING.name, events_dir(wh), wh / DECISIONS.name, model_runs_dir(wh)]
    con = duckdb.connect(str(db), read_only=True)
    allowed = ", ".join("'" + str(p).replace("'", "''") + "/'" for p in readable)
    con.execute(f"SET allowed_directories = [{allowed}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")
    return con


def run_query(settings: Settings, sql: str, limit: int | None = None) -> tuple[list[str], list[tuple]]:
    """Run an analyst's query on the marts through ``analyst_connection``: one or more statements,
    each of which must be a query (``ANALYST_STATEMENTS``); returns the last one's columns and rows
    (at most ``limit`` rows)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(str(exc).splitlines()[0]) from None
    if not statements:
        raise ValueError("no SQL statement given")
    refused = [s.type.name for s in statements if s.type.name not in ANALYST_STATEMENTS]
    if refused:
        raise QueryError(
            f"the analysts' connection is read-only: only queries (SELECT, FROM, DESCRIBE, SHOW, "
            f"SUMMARIZE) run, not {', '.join(refused)}"
        )
    con = analyst_connection(settings)
    try:
        for statement in statements[:-1]:
            con.execute(statement)
        cur = con.execute(statements[-1])
        columns = [d[0] for d in cur.description or []]
        rows = cur.fetchmany(limit) if limit else cur.fetchall()
    except duckdb.Error as exc:
        raise QueryError(str(exc).splitlines()[0]) from None
    finally:
        con.close()
    return columns, rows


def run_publish(settings: Settings, run_date: date) -> dict[str, Any]:
    """Publish the validated scores of ``run_date``, refresh the DuckDB file and write the report."""
    from jobs.report import write_report

    with stage("publish", ds=run_date.isoformat()) as counts:
        partition = publish_scores(settings, run_date)
        db = build_analytics(settings, run_date)
        report = write_report(settings, run_date, db)
        con = duckdb.connect(str(db), read_only=True)
        try:
            rows = con.execute(
                "SELECT count(*), count(DISTINCT user_id) FROM fct_recommendations WHERE ds = ?", [run_date]
            ).fetchone()
        finally:
            con.close()
        counts.update(rows=rows[0], users=rows[1])
    return {
        "scores": str(partition),
        "duckdb": str(db),
        "report": str(report),
        "rows": rows[0],
        "users": rows[1],
    }
