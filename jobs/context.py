"""The ``context`` stage: what scoring of a date reads, built from the date's events.

``serving/ds=<d>`` (published as one bundle) holds:

- ``serving_context``: one row per *active* user (any event in the last ``scoring.active_days``
  days up to the date): the visited set and the purchases of the last ``split.observation_days``
  days (the window the training tables use, so a visited set at scoring means what it meant in
  training), and the last ``scoring.history_length`` events in time order (item, behaviour, time). Events at the same
  second are ordered as the split orders them (funnel stage, then a hash of user, item and
  behaviour), so history is the same on every run.
- ``catalogue``: the items with any event in the last ``scoring.catalogue_days`` days, with funnel
  counts and a popularity rank (most purchased, then most events, then item id). These are the only
  items the scorer may recommend, the items ``dim_items`` lists and coverage divides by, and the
  order of the scoring fallback for users the champion cannot score.

The champion scores from this context, not from the training tables it learned from, so a
shopper's views since the champion's training date count as visited and a shopper first seen
today is scored.
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
from infra.tables import CATALOGUE, PURCHASE, SERVING, SERVING_CONTEXT, read_events
from jobs.split import funnel_rank, tie_hash


@dataclass
class ContextResult:
    run_date: date
    users: int
    items: int


def serving_context(events: DataFrame, active_from: date, history_length: int) -> DataFrame:
    """``SERVING_CONTEXT`` rows of the users with an event on or after ``active_from``."""
    ordered = events.withColumn("_rank", funnel_rank()).withColumn("_hash", tie_hash())
    active = ordered.filter(F.col("event_date") >= F.lit(active_from)).select("user_id").distinct()
    ev = ordered.join(active, "user_id", "left_semi")
    # The last N events, newest first by the split's order, then re-sorted oldest first.
    newest = Window.partitionBy("user_id").orderBy(
        F.col("event_time").desc(), F.col("_rank").desc(), F.col("_hash").desc()
    )
    recent = (
        ev.withColumn("_n", F.row_number().over(newest))
        .filter(F.col("_n") <= history_length)
        .groupBy("user_id")
        .agg(
            F.sort_array(
                F.collect_list(
                    F.struct(
                        F.col("_n").alias("n"),
                        "item_id",
                        "behavior",
                        F.col("event_time").cast("long").alias("time"),
                    )
                ),
                False,
            ).alias("_h")
        )
        .select(
            "user_id",
            F.col("_h.item_id").alias("history_items"),
            F.col("_h.behavior").alias("history_behaviors"),
            F.col("_h.time").alias("history_times"),
        )
    )
    per_user = ev.groupBy("user_id").agg(
        F.array_sort(F.collect_set(F.when(F.col("behavior") != PURCHASE, F.col("item_id")))).alias("visited"),
        F.array_sort(F.collect_set(F.when(F.col("behavior") == PURCHASE, F.col("item_id")))).alias("bought"),
        F.count("*").alias("events"),
        F.max("event_time").alias("last_event"),
    )
    empty = F.array().cast("array<string>")
    return per_user.join(recent, "user_id", "left").select(
        "user_id",
        "visited",
        "bought",
        F.coalesce("history_items", empty).alias("history_items"),
        F.coalesce("history_behaviors", empty).alias("history_behaviors"),
        F.coalesce("history_times", F.array().cast("array<long>")).alias("history_times"),
        "events",
        "last_event",
    )


def catalogue(events: DataFrame) -> DataFrame:
    """``CATALOGUE`` rows of the items with any event in ``events``."""
    counts = events.groupBy("item_id").agg(
        F.mode("category_id", deterministic=True).alias("category_id"),
        *(
            F.count(F.when(F.col("behavior") == b, 1)).alias(f"n_{b}s")
            for b in ("view", "fav", "cart", PURCHASE)
        ),
        F.countDistinct("user_id").alias("n_users"),
        F.count("*").alias("_events"),
        F.min("event_time").alias("first_seen"),
        F.max("event_time").alias("last_seen"),
    )
    order = Window.orderBy(F.col("n_purchases").desc(), F.col("_events").desc(), F.col("item_id"))
    return counts.withColumn("popularity_rank", F.row_number().over(order).cast("int")).select(
        *CATALOGUE.column_names
    )


def run_context(spark: SparkSession, settings: Settings, run_date: date) -> ContextResult:
    """Build and publish ``serving/ds=<run_date>`` from the events up to ``run_date``."""
    cfg = settings.scoring
    context_days = max(settings.split.observation_days, cfg.active_days)
    with stage("context", date=run_date.isoformat()) as counts:
        first = min(window_start(run_date, context_days), window_start(run_date, cfg.catalogue_days))
        events = read_events(
            spark, settings.paths.warehouse_root, settings.pipeline.sources, first, run_date
        ).select("user_id", "item_id", "behavior", "event_time", "event_date", "category_id")
        users = serving_context(
            events.filter(F.col("event_date") >= F.lit(window_start(run_date, context_days))),
            window_start(run_date, cfg.active_days),
            cfg.history_length,
        )
        items = catalogue(
            events.filter(F.col("event_date") >= F.lit(window_start(run_date, cfg.catalogue_days)))
        )
        parts = int(settings.spark.conf.get("spark.sql.shuffle.partitions", "8"))
        target = SERVING.dir(settings.paths.warehouse_root, run_date)
        with atomic.staged_dir(target) as staged:
            users.repartition(parts, "user_id").sortWithinPartitions("user_id").write.parquet(
                str(staged / SERVING_CONTEXT.name)
            )
            items.coalesce(1).sortWithinPartitions("popularity_rank").write.parquet(
                str(staged / CATALOGUE.name)
            )
            n_users = SERVING_CONTEXT.read_spark(spark, staged / SERVING_CONTEXT.name).count()
            n_items = CATALOGUE.read_spark(spark, staged / CATALOGUE.name).count()
        counts.update(users=n_users, items=n_items)
    return ContextResult(run_date, n_users, n_items)
