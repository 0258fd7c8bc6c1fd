"""Split: sessionized events of a date -> leak-free training tables (the ``training`` bundle).

Protocols (``split.protocol``):

- ``global_time`` (default): one cutoff for everybody at the start of the last ``test_days`` of
  the observation window. Training is everything before it; test is the purchases after it.
- ``leave_last_purchase``: each user's last purchase (by time) is the test item; training is that
  user's events before it (a non-purchase event at the same second counts as before).

Validation is carved out of the training purchases: for a seeded sample of users
(``split.val_user_fraction``, users with at least two purchased items), the last training
purchase is held out and every training purchase of that (user, item) pair is removed.

A held-out pair that is already among the user's training purchases (a repeat purchase) is
dropped and counted, as is one whose user or item never appears in training (the models rank a
fixed catalogue). After that, any held-out pair among training purchases, or any training row at
or after the cutoff, is a bug: the job fails (``LeakageError``) and publishes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from infra import publish
from infra.dates import window_start
from infra.logs import stage
from infra.settings import Settings
from infra.tables import (
    HELDOUT,
    INTERACTIONS,
    ITEM_MAP,
    MANIFEST_FILE,
    PURCHASE,
    SESSION_EVENTS,
    SESSIONIZED,
    TRAIN_EVENTS,
    TRAINING,
    USER_MAP,
    VISITED,
    Table,
)

#: What evaluation must mask, recorded in the manifest and later as MLflow tags.
EVAL_MASK = {"validation": "train_purchases", "test": "train_and_validation_purchases"}


class LeakageError(RuntimeError):
    """Held-out data reached the training tables."""


class SplitError(RuntimeError):
    """The training tables are too small or otherwise unusable."""


@dataclass
class SplitParams:
    protocol: str
    cutoff: datetime | None  # global_time only
    seed: int
    val_user_fraction: float


@dataclass
class TrainingTables:
    """The training bundle as DataFrames (``tables``) plus what was dropped on the way."""

    tables: dict[str, DataFrame]
    dropped: dict[str, int] = field(default_factory=dict)
    #: Intermediate frames cached while building; ``release()`` frees them once published.
    cached: list[DataFrame] = field(default_factory=list)

    def release(self) -> None:
        # Newest first: unpersisting a frame before the caches built from it makes Spark rebuild them.
        for df in reversed(self.cached):
            df.unpersist()


def seeded_sample(col: str, seed: int, fraction: float) -> F.Column:
    # A hash of the id, not rand(): the sample does not depend on partitioning or row order.
    return (F.abs(F.xxhash64(F.col(col), F.lit(seed))) % 1_000_000) < round(fraction * 1_000_000)


def _last_per_user(df: DataFrame) -> DataFrame:
    w = Window.partitionBy("user_id").orderBy(F.col("event_time").desc(), F.col("item_id").desc())
    return df.withColumn("_r", F.row_number().over(w)).filter("_r = 1").drop("_r")


def _counted(df: DataFrame) -> tuple[DataFrame, int]:
    """Cache ``df``, fill the cache now and return its rows: joins planned after this see its real
    size (not the size of the events it came from) and broadcast it when it is under
    ``spark.sql.autoBroadcastJoinThreshold``, instead of shuffling the other side."""
    df = df.persist()
    return df, df.count()


def _materialized(df: DataFrame) -> DataFrame:
    return _counted(df)[0]


def split_events(
    events: DataFrame, params: SplitParams, cached: list[DataFrame]
) -> tuple[DataFrame, DataFrame, DataFrame, dict[str, int], dict[str, int]]:
    """Split events into training events, validation pairs and test pairs (by source ids).

    Returns:
        ``(train_events, validation, test, dropped, pairs)``: training events with the events'
        columns; validation and test as ``user_id, item_id, event_time`` (one row per pair);
        ``dropped`` maps a reason to the number of held-out pairs dropped for it, ``pairs`` a
        split to its number of pairs. The frames this caches
        (``validation`` and ``test`` among them, counted so that joins with them broadcast them)
        are appended to ``cached``.
    """
    # Purchases are a few percent of the events: everything about held-out pairs is derived from
    # one cached scan of them, and only ``train`` reads all the events again.
    purchases = _materialized(
        events.filter(F.col("behavior") == PURCHASE).select("user_id", "item_id", "behavior", "event_time")
    )
    cached.append(purchases)
    if params.protocol == "global_time":
        cutoff = F.lit(params.cutoff)

        def training(df: DataFrame) -> DataFrame:
            return df.filter(F.col("event_time") < cutoff)

        test = purchases.filter(F.col("event_time") >= cutoff)
    elif params.protocol == "leave_last_purchase":
        last = _last_per_user(purchases).select(
            "user_id", F.col("item_id").alias("_t_item"), F.col("event_time").alias("_t_time")
        )
        last = _materialized(last)
        cached.append(last)

        def training(df: DataFrame) -> DataFrame:
            joined = df.join(last, "user_id", "left")
            before = (F.col("event_time") < F.col("_t_time")) | (
                (F.col("event_time") == F.col("_t_time")) & (F.col("behavior") != PURCHASE)
            )
            return joined.filter(F.col("_t_time").isNull() | before).drop("_t_item", "_t_time")

        test = last.select("user_id", F.col("_t_item").alias("item_id"), F.col("_t_time").alias("event_time"))
    else:
        raise ValueError(f"unknown split protocol {params.protocol!r}")

    test = test.groupBy("user_id", "item_id").agg(F.min("event_time").alias("event_time"))

    # Validation: the last training purchase of a seeded sample of users with >= 2 purchased items.
    train_buys = training(purchases)
    eligible = (
        train_buys.groupBy("user_id")
        .agg(F.countDistinct("item_id").alias("_n"))
        .filter("_n >= 2")
        .select("user_id")
    )
    eligible = eligible.filter(seeded_sample("user_id", params.seed, params.val_user_fraction))
    validation = _last_per_user(train_buys.join(eligible, "user_id")).select(
        "user_id", "item_id", "event_time"
    )
    validation, n_validation = _counted(validation)
    cached.append(validation)
    val_pairs = validation.select("user_id", "item_id")
    train = (
        training(events)
        .join(val_pairs.withColumn("_val", F.lit(True)), ["user_id", "item_id"], "left")
        .filter(~(F.col("_val").isNotNull() & (F.col("behavior") == PURCHASE)))
        .drop("_val")
    )

    bought = train_buys.join(val_pairs, ["user_id", "item_id"], "left_anti").select("user_id", "item_id")
    known_before_test = bought.unionByName(val_pairs).distinct()
    test, n_test = _counted(test)
    kept, n_kept = _counted(test.join(known_before_test, ["user_id", "item_id"], "left_anti"))
    cached += [test, kept]  # test stays cached while kept is (see build_training_tables on item_cats)
    counts = {"validation": n_validation, "test": n_kept}
    return train, validation, kept, {"test_repeat_purchase": n_test - n_kept}, counts


def build_training_tables(events: DataFrame, params: SplitParams) -> TrainingTables:
    """The pure transform: sessionized events -> the ``training`` bundle's tables.

    Args:
        events: ``session_events`` rows of the observation window.
        params: protocol, cutoff and validation sampling.
    """
    cached: list[DataFrame] = []
    train, validation, test, dropped, n_pairs = split_events(events, params, cached)
    # ``train`` is not cached: the maps read two or three of its columns straight from Parquet,
    # and caching every column of every training event cost more (29 s of 10M events' ~170 s)
    # than those column-pruned rereads. ``train_idx`` below is the one large cache.

    users = train.select("user_id").distinct()
    user_map = users.withColumn("user_idx", (F.row_number().over(Window.orderBy("user_id")) - 1).cast("int"))
    # One pass over the events for the items and their categories (a null category counts too, so
    # an item seen only without one still gets an index).
    item_cats = _materialized(train.groupBy("item_id", "category_id").count())
    top_cat = (
        item_cats.filter(F.col("category_id").isNotNull())
        .withColumn(
            "_r",
            F.row_number().over(Window.partitionBy("item_id").orderBy(F.col("count").desc(), "category_id")),
        )
        .filter("_r = 1")
        .select("item_id", "category_id")
    )
    item_map = (
        item_cats.select("item_id")
        .distinct()
        .withColumn("item_idx", (F.row_number().over(Window.orderBy("item_id")) - 1).cast("int"))
        .join(top_cat, "item_id", "left")
    )
    user_map, item_map = _materialized(user_map), _materialized(item_map)
    # item_cats stays cached until the bundle is published: unpersisting a frame makes Spark drop
    # the data of the caches built from it (item_map), which the next reader recomputes from events.
    cached += [item_cats, user_map, item_map]

    def to_idx(df: DataFrame) -> DataFrame:
        return df.join(user_map, "user_id").join(item_map.select("item_id", "item_idx"), "item_id")

    # interactions, visited and train_events all read it: join the events with both maps once, and
    # partition by user once. The aggregates below group by keys that start with user_idx and the
    # writer's repartition by user_idx (same count) is then already satisfied, so Spark shuffles
    # the training events once instead of once per table.
    parts = int(events.sparkSession.conf.get("spark.sql.shuffle.partitions"))
    # Only the columns the tables below read are shuffled and cached.
    train_idx = to_idx(train).select(*TRAIN_EVENTS.column_names).repartition(parts, "user_idx").persist()
    cached.append(train_idx)
    interactions = train_idx.groupBy("user_idx", "item_idx", "behavior").agg(
        F.count("*").alias("count"), F.max("event_time").alias("last_time")
    )
    visited = train_idx.filter(F.col("behavior") != PURCHASE).select("user_idx", "item_idx").distinct()

    heldout_ids = validation.withColumn("split", F.lit("validation")).unionByName(
        test.withColumn("split", F.lit("test"))
    )
    # The visited flags come from the training events of the held-out pairs only (a broadcast
    # semi-join), not from a join with the whole visited table, which would rebuild it.
    heldout_idx, n_indexed = _counted(to_idx(heldout_ids))
    cached.append(heldout_idx)
    # Both are one row per pair and split, and the maps one row per id: the difference is the
    # held-out pairs whose user or item has no index.
    dropped["cold_user_or_item"] = sum(n_pairs.values()) - n_indexed
    pairs = ["user_idx", "item_idx"]
    heldout_visited = (
        train_idx.filter(F.col("behavior") != PURCHASE)
        .select(*pairs)
        .join(F.broadcast(heldout_idx.select(*pairs).distinct()), pairs, "left_semi")
        .distinct()
        .withColumn("visited", F.lit(True))
    )
    heldout = heldout_idx.join(heldout_visited, pairs, "left").select(
        "user_idx",
        "item_idx",
        "split",
        "event_time",
        F.coalesce("visited", F.lit(False)).alias("visited"),
    )
    tables = {
        INTERACTIONS.name: interactions,
        VISITED.name: visited,
        HELDOUT.name: heldout,
        USER_MAP.name: user_map.select(*USER_MAP.column_names),
        ITEM_MAP.name: item_map.select(*ITEM_MAP.column_names),
        TRAIN_EVENTS.name: train_idx,
    }
    return TrainingTables(tables=tables, dropped=dropped, cached=cached)


@dataclass
class Inspection:
    """What ``inspect_tables`` read back from the written bundle."""

    leaks: dict[str, int]
    #: table -> (order-independent content checksum as hex, rows)
    checksums: dict[str, tuple[str, int]]
    stats: dict


def _hash_sums(df: DataFrame) -> list[F.Column]:
    # The row hashes' sum mod 2^64, as sums of their low and high 32-bit halves (exact in a long
    # up to 2^31 rows). Summing the whole hash as a decimal gives the same checksum, but took
    # 2.8-3.0 s against 1.5-1.7 s over 8.9M training events.
    h = F.xxhash64(*df.columns)
    return [
        F.sum(h.bitwiseAND(F.lit(0xFFFFFFFF))).alias("_lo"),
        F.sum(F.shiftrightunsigned(h, 32)).alias("_hi"),
        F.count("*").alias("_n"),
    ]


def _checksum(rows: list) -> tuple[str, int]:
    lo, hi = sum(r["_lo"] or 0 for r in rows), sum(r["_hi"] or 0 for r in rows)
    return f"{(lo + (hi << 32)) % (1 << 64):016x}", sum(r["_n"] for r in rows)


def inspect_tables(tables: dict[str, DataFrame], cutoff: datetime | None) -> Inspection:
    """Leakage counts, checksums and the manifest's stats, in one pass over each table.

    Leakage symptoms (all must be zero):

    - ``heldout_in_train_purchases``: a held-out pair that is also a training purchase;
    - ``train_rows_after_cutoff``: a training row at or after the global cutoff (``cutoff`` set);
    - ``train_purchase_after_test``: a training purchase at or after the user's test purchase.
    """
    inter, heldout, events = tables[INTERACTIONS.name], tables[HELDOUT.name], tables[TRAIN_EVENTS.name]
    pairs = ["user_idx", "item_idx"]
    held_pairs = heldout.select(*pairs).distinct().withColumn("_held", F.lit(True))
    late = F.col("last_time") >= F.lit(cutoff) if cutoff is not None else F.lit(False)
    by_behavior = (
        inter.join(F.broadcast(held_pairs), pairs, "left")
        .groupBy("behavior")
        .agg(
            *_hash_sums(inter),
            F.count(F.when(F.col("_held").isNotNull(), 1)).alias("_held"),
            F.count(F.when(late, 1)).alias("_late"),
        )
        .collect()
    )
    first_test = heldout.filter("split = 'test'").groupBy("user_idx").agg(F.min("event_time").alias("_t"))
    after_test = (F.col("behavior") == PURCHASE) & (F.col("event_time") >= F.col("_t"))
    events_row = (
        events.join(F.broadcast(first_test), "user_idx", "left")
        .agg(*_hash_sums(events), F.count(F.when(after_test, 1)).alias("_after"))
        .first()
    )
    by_split = {
        r["split"]: r
        for r in heldout.groupBy("split")
        .agg(
            *_hash_sums(heldout),
            F.count(F.when(F.col("visited"), 1)).alias("visited"),
            F.countDistinct("user_idx").alias("users"),
        )
        .collect()
    }
    checksums = {
        INTERACTIONS.name: _checksum(by_behavior),
        HELDOUT.name: _checksum(list(by_split.values())),
        TRAIN_EVENTS.name: _checksum([events_row]),
    }
    for name in (VISITED.name, USER_MAP.name, ITEM_MAP.name):
        checksums[name] = _checksum([tables[name].agg(*_hash_sums(tables[name])).first()])

    leaks = {"heldout_in_train_purchases": sum(r["_held"] for r in by_behavior if r["behavior"] == PURCHASE)}
    if cutoff is not None:
        leaks["train_rows_after_cutoff"] = sum(r["_late"] for r in by_behavior)
    leaks["train_purchase_after_test"] = events_row["_after"]

    def held(split: str) -> dict[str, int]:
        r = by_split.get(split)
        n, visited = (r["_n"], r["visited"]) if r else (0, 0)
        return {"pairs": n, "visited": visited, "unvisited": n - visited, "users": r["users"] if r else 0}

    stats = {
        "users": checksums[USER_MAP.name][1],
        "items": checksums[ITEM_MAP.name][1],
        "train_events": checksums[TRAIN_EVENTS.name][1],
        "interaction_pairs_by_behavior": dict(sorted((r["behavior"], r["_n"]) for r in by_behavior)),
        "visited_pairs": checksums[VISITED.name][1],
        "heldout": {split: held(split) for split in ("validation", "test")},
    }
    return Inspection(leaks, checksums, stats)


def check_leakage(tables: dict[str, DataFrame], cutoff: datetime | None) -> dict[str, int]:
    """The leakage counts of ``inspect_tables``; all must be zero."""
    return inspect_tables(tables, cutoff).leaks


def split_params(settings: Settings, run_date: date) -> SplitParams:
    cfg = settings.split
    cutoff = None
    if cfg.protocol == "global_time":
        first_test_day = run_date - timedelta(days=cfg.test_days - 1)
        cutoff = datetime.combine(first_test_day, time(0), tzinfo=UTC)
    return SplitParams(cfg.protocol, cutoff, settings.seeds.split, cfg.val_user_fraction)


def publish_training_tables(
    spark: SparkSession, settings: Settings, ds: str, built: TrainingTables, manifest: dict
) -> dict:
    """Write, check and atomically publish the training bundle; return the completed manifest."""
    target = TRAINING.dir(settings.paths.warehouse_root, ds)
    parts = int(spark.conf.get("spark.sql.shuffle.partitions"))
    sort_keys: dict[str, tuple[str, ...]] = {
        INTERACTIONS.name: ("user_idx", "item_idx", "behavior"),
        VISITED.name: ("user_idx", "item_idx"),
        HELDOUT.name: ("split", "user_idx", "item_idx"),
        USER_MAP.name: ("user_idx",),
        ITEM_MAP.name: ("item_idx",),
        TRAIN_EVENTS.name: ("user_idx", "event_time", "item_idx", "behavior"),
    }
    tables_by_name: dict[str, Table] = {t.name: t for t in TRAINING.tables}
    with publish.staged_dir(target) as staged:
        written: dict[str, DataFrame] = {}
        for name, df in built.tables.items():
            out = df.select(*tables_by_name[name].column_names)
            # Few, sorted files: reruns give identical files and the torch side reads them quickly.
            # The per-user tables are written by one task per user partition (as the events are
            # already partitioned), the small ones as one file.
            big = name in (TRAIN_EVENTS.name, INTERACTIONS.name, VISITED.name)
            out = out.repartition(parts, "user_idx") if big else out.repartition(1)
            out.sortWithinPartitions(*sort_keys[name]).write.parquet(str(staged / name))
            written[name] = spark.read.schema(tables_by_name[name].spark_schema()).parquet(str(staged / name))
        inspection = inspect_tables(written, manifest.get("cutoff_dt"))
        leaks, sums, stats = inspection.leaks, inspection.checksums, inspection.stats
        if any(leaks.values()):
            raise LeakageError(f"training tables for {ds} leak held-out data: {leaks}; nothing published")
        if stats["users"] < settings.split.min_users or stats["items"] < settings.split.min_items:
            raise SplitError(
                f"training tables for {ds} too small: {stats['users']} users, {stats['items']} items "
                f"(split.min_users={settings.split.min_users}, split.min_items={settings.split.min_items})"
            )
        manifest = {k: v for k, v in manifest.items() if k != "cutoff_dt"}
        manifest.update(
            stats=stats,
            leakage=leaks,
            dropped=dict(built.dropped),
            checksums={name: f"{h}-{n}" for name, (h, n) in sums.items()},
            eval_mask=EVAL_MASK,
        )
        (staged / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def publish_and_count(
    spark: SparkSession, settings: Settings, ds: str, built: TrainingTables, manifest: dict, counts: dict
) -> dict:
    """Publish the bundle, free its cached frames, and put its headline numbers on the stage's log line."""
    try:
        manifest = publish_training_tables(spark, settings, ds, built, manifest)
    finally:
        built.release()
    st = manifest["stats"]
    counts.update(
        users=st["users"],
        items=st["items"],
        train_events=st["train_events"],
        test_pairs=st["heldout"]["test"]["pairs"],
        test_users=st["heldout"]["test"]["users"],
        val_pairs=st["heldout"]["validation"]["pairs"],
        **{f"dropped_{k}": v for k, v in manifest["dropped"].items()},
    )
    return manifest


def read_session_events(spark: SparkSession, settings: Settings, run_date: date) -> DataFrame:
    path = SESSIONIZED.table_dir(settings.paths.warehouse_root, run_date, SESSION_EVENTS)
    if not path.exists():
        raise FileNotFoundError(
            f"no sessionized events at {path}: run `funnelrec sessionize --date {run_date}` first"
        )
    return spark.read.schema(SESSION_EVENTS.spark_schema()).parquet(str(path))


def run_split(spark: SparkSession, settings: Settings, run_date: date) -> dict:
    """Build and publish ``training/ds=<run_date>`` from ``sessionized/ds=<run_date>``."""
    cfg = settings.split
    params = split_params(settings, run_date)
    first_day = window_start(run_date, cfg.observation_days)
    with stage("split", date=run_date.isoformat(), protocol=cfg.protocol) as counts:
        events = read_session_events(spark, settings, run_date).filter(
            F.col("event_date") >= F.lit(first_day)
        )
        built = build_training_tables(events, params)
        manifest = {
            "ds": run_date.isoformat(),
            "kind": "events",
            "protocol": cfg.protocol,
            "cutoff": params.cutoff.isoformat() if params.cutoff else None,
            "cutoff_dt": params.cutoff,
            "observation_window": [first_day.isoformat(), run_date.isoformat()],
            "sources": list(settings.pipeline.sources),
            "seed": params.seed,
            "val_user_fraction": params.val_user_fraction,
        }
        manifest = publish_and_count(spark, settings, run_date.isoformat(), built, manifest, counts)
    return manifest
