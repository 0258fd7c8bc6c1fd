"""Sessionize: canonical events of the run's history window -> ``sessions`` + ``session_events``.

Per user in time order, a new session starts after an inactivity gap (``sessionize.gap_minutes``)
or, when ``sessionize.use_source_session`` is on, when the source's own session id changes.
A session id is a hash of (source, user, session start, source session id): the same events give
the same ids on every run, and a session away from the window's first day keeps its id from one
run date to the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from infra import atomic
from infra.dates import window_start
from infra.logs import stage
from infra.settings import Settings
from infra.tables import BEHAVIORS, PURCHASE, SESSION_EVENTS, SESSIONIZED, SESSIONS, read_events


def behavior_rank() -> F.Column:
    """Funnel position of each behaviour, used to order events that share a timestamp (view before buy)."""
    return F.create_map(*[F.lit(x) for i, b in enumerate(BEHAVIORS) for x in (b, i)])[F.col("behavior")]


#: A total order of a user's events, so ties never make session ids depend on the run.
EVENT_ORDER = ("event_time", "_brank", "item_id", "category_id", "brand", "price", "source_session_id")


@dataclass
class SessionizeResult:
    run_date: date
    events: int
    sessions: int
    users: int


def sessionize_events(
    events: DataFrame, gap_minutes: int, use_source_session: bool
) -> tuple[DataFrame, DataFrame]:
    """Assign sessions to events.

    Args:
        events: rows of the ``events`` table (``source`` and ``event_date`` included).
        gap_minutes: inactivity that ends a session (a gap strictly longer starts a new one).
        use_source_session: also split when ``source_session_id`` changes between consecutive events.

    Returns:
        ``(session_events, sessions)`` with the columns of ``SESSION_EVENTS`` and ``SESSIONS``.
    """
    # user_id leads: Spark's sort compares a 64-bit prefix of the first key before it reads the rows,
    # and ``source``, the same on almost every row, made every comparison read both (bench/README.md).
    user = ("user_id", "source")
    ordered = Window.partitionBy(*user).orderBy(*EVENT_ORDER)
    df = events.withColumn("_brank", behavior_rank())
    prev_time = F.lag("event_time").over(ordered)
    gap = F.col("event_time").cast("double") - prev_time.cast("double")
    new_session = prev_time.isNull() | (gap > gap_minutes * 60)
    if use_source_session:
        new_session = new_session | ~F.col("source_session_id").eqNullSafe(
            F.lag("source_session_id").over(ordered)
        )
    # Every later column is a running value over the same ordered window (sessions are contiguous
    # runs of it), so Spark sorts the events once; a window per session would sort them again.
    upto_here = ordered.rowsBetween(Window.unboundedPreceding, 0)
    opened = F.col("_new")

    def at_session_start(col):
        return F.last(F.when(opened, col), ignorenulls=True).over(upto_here)

    # The id is hashed on each session's opening row only (its time and source session id are the
    # session's start and first source id) and carried down the session.
    # (at_session_start evaluates it under ``when(opened, ...)``, so only opening rows hash.)
    opening_id = F.substring(
        F.sha2(
            F.concat_ws(
                "|",
                F.col("source"),
                F.col("user_id"),
                F.unix_micros(F.col("event_time")).cast("string"),
                # "" marks a session opened by a row without a source session id.
                F.coalesce(F.col("source_session_id"), F.lit("")),
            ),
            256,
        ),
        1,
        24,
    )
    df = df.withColumn("_new", new_session).withColumn("_rn", F.row_number().over(ordered))
    df = df.withColumns(
        {"session_id": at_session_start(opening_id), "_start_rn": at_session_start(F.col("_rn"))}
    )
    df = df.withColumn("seq_in_session", (F.col("_rn") - F.col("_start_rn") + 1).cast("int"))
    # In the window's own order already: this sort costs nothing, and keeps the files sorted.
    session_events = df.sortWithinPartitions(*user, *EVENT_ORDER).select(*SESSION_EVENTS.column_names)
    return session_events, sessions_of(session_events)


def run_sessionize(spark: SparkSession, settings: Settings, run_date: date) -> SessionizeResult:
    """Sessionize the history window ending on ``run_date`` and publish ``sessionized/ds=<date>``."""
    cfg = settings.sessionize
    with stage("sessionize", date=run_date.isoformat()) as counts:
        events = read_events(
            spark,
            settings.paths.warehouse_root,
            settings.pipeline.sources,
            window_start(run_date, cfg.history_days),
            run_date,
        )
        parts = int(settings.spark.conf.get("spark.sql.shuffle.partitions", "8"))
        # Partitioned by user once: the session windows (by source and user) reuse this layout, and
        # so does the write, so the events are shuffled once rather than twice.
        session_events, _ = sessionize_events(
            events.repartition(parts, "user_id"), cfg.gap_minutes, cfg.use_source_session
        )
        target = SESSIONIZED.dir(settings.paths.warehouse_root, run_date)
        with atomic.staged_dir(target) as staged:
            session_events.write.parquet(str(staged / SESSION_EVENTS.name))
            # Sessions are aggregated from the written events rather than recomputing the windows.
            sessions = sessions_of(SESSION_EVENTS.read_spark(spark, staged / SESSION_EVENTS.name))
            (
                sessions.repartition(parts, "user_id")
                .sortWithinPartitions("user_id", "source", "session_start")
                .write.parquet(str(staged / SESSIONS.name))
            )
            stats = (
                SESSIONS.read_spark(spark, staged / SESSIONS.name)
                .agg(
                    F.count("*").alias("sessions"),
                    F.sum("event_count").alias("events"),
                    F.countDistinct("user_id").alias("users"),
                )
                .first()
            )
        result = SessionizeResult(run_date, int(stats["events"] or 0), stats["sessions"], stats["users"])
        counts.update(events=result.events, sessions=result.sessions, users=result.users)
    return result


def sessions_of(session_events: DataFrame) -> DataFrame:
    """The ``sessions`` rows of sessionized events."""
    return (
        session_events.groupBy("session_id", "user_id", "source")
        .agg(
            F.min("event_time").alias("session_start"),
            F.max("event_time").alias("session_end"),
            F.count("*").alias("event_count"),
            *(F.count(F.when(F.col("behavior") == b, 1)).alias(f"n_{b}") for b in BEHAVIORS),
            F.max((F.col("behavior") == PURCHASE).cast("int")).cast("boolean").alias("purchased"),
        )
        .select(*SESSIONS.column_names)
    )
