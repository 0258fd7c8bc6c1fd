"""Split: sessionized events of a date -> leak-free training tables (the ``training`` bundle).

Protocols (``split.protocol``):

- ``global_time`` (default): one cutoff for everybody at the start of the last ``test_days`` of
  the observation window. Training is everything before it; test is the purchases after it.
- ``leave_last_purchase``: each user's last purchase is the test item; training is that user's
  events before it.

Events are ordered by time, then by funnel stage (a view at the same second as a purchase comes
before it), then by a hash of (user, item, behaviour): never by item id, which would make the
"last" purchase depend on how a shop numbers its items.

Validation is time-clean: it is measured by a *validation fit* that never saw anything at or after
a validation purchase, and the model that is tested and served is refitted on all the training
events (``training/README.md``). Which training events the validation fit sees is the
``validation_fit`` column of ``train_events``:

- ``global_time``: validation is every purchase in the last ``validation_days`` before the cutoff;
  the validation fit sees the events before that window.
- ``leave_last_purchase``: for a seeded sample of users (``split.val_user_fraction``, users with at
  least two purchased items) the last training purchase is the validation item; the validation fit
  sees those users' events before it, and every event of the other users.

The validation purchases stay in the training events (the refit learns from them), so the test
pairs and their visited labels are the same with validation on or off. A held-out pair already
among its user's earlier purchases (a repeat purchase) is dropped and counted, as is one whose user
or item the model that is evaluated on it never saw (the models rank a fixed catalogue). After
that, a test pair among the training purchases, a training row at or after the cutoff, or a row of
the validation fit after its user's validation purchase is a bug: the job fails
(``LeakageError``) and publishes nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from infra import atomic
from infra.dates import window_start
from infra.logs import stage
from infra.settings import Settings
from infra.tables import (
    BEHAVIORS,
    EVENTS_BUNDLE,
    HELDOUT,
    INTERACTIONS,
    ITEM_MAP,
    PURCHASE,
    REFIT,
    SESSION_EVENTS,
    SESSIONIZED,
    TRAIN_EVENTS,
    TRAINING,
    USER_MAP,
    VISITED,
    Table,
    TrainingManifest,
    document_json,
    write_manifest,
)

#: Funnel stage of each behaviour, the second key of the event order.
FUNNEL_RANK = {b: i for i, b in enumerate(BEHAVIORS)}


class LeakageError(RuntimeError):
    """Held-out data reached the training tables."""


class SplitError(RuntimeError):
    """The training tables are too small or otherwise unusable."""


@dataclass
class SplitParams:
    protocol: str
    cutoff: datetime | None  # global_time only
    seed: int
    val_user_fraction: float  # leave_last_purchase only
    validation_start: datetime | None = None  # global_time only: start of the validation window


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


def funnel_rank(behavior: str = "behavior") -> F.Column:
    """The behaviour's position in the funnel (view 0 ... purchase last)."""
    rank = F.lit(None).cast("int")
    for b, i in reversed(FUNNEL_RANK.items()):
        rank = F.when(F.col(behavior) == b, F.lit(i)).otherwise(rank)
    return rank


def tie_hash() -> F.Column:
    """The last key of the event order: a hash of (user, item, behaviour)."""
    return F.xxhash64("user_id", "item_id", "behavior")


def _with_order(df: DataFrame) -> DataFrame:
    """``df`` with the event order's keys ``_rank`` and ``_hash`` (kept when it has them)."""
    if "_hash" in df.columns:
        return df
    return df.withColumn("_rank", funnel_rank()).withColumn("_hash", tie_hash())


def _before(prefix: str) -> F.Column:
    """Whether a row (``event_time``, ``_rank``, ``_hash``) comes strictly before the row whose keys
    are the columns ``<prefix>time``, ``<prefix>rank`` and ``<prefix>hash`` in the event order."""
    t, r, h = F.col(f"{prefix}time"), F.col(f"{prefix}rank"), F.col(f"{prefix}hash")
    same_time = F.col("event_time") == t
    return (F.col("event_time") < t) | (
        same_time & ((F.col("_rank") < r) | ((F.col("_rank") == r) & (F.col("_hash") < h)))
    )


def _last_per_user(df: DataFrame, prefix: str) -> DataFrame:
    """Each user's last row of ``df`` (ordered rows), as ``user_id`` and ``<prefix>item``,
    ``<prefix>time``, ``<prefix>rank``, ``<prefix>hash``."""
    w = Window.partitionBy("user_id").orderBy(
        F.col("event_time").desc(), F.col("_rank").desc(), F.col("_hash").desc()
    )
    return (
        df.withColumn("_r", F.row_number().over(w))
        .filter("_r = 1")
        .select(
            "user_id",
            F.col("item_id").alias(f"{prefix}item"),
            F.col("event_time").alias(f"{prefix}time"),
            F.col("_rank").alias(f"{prefix}rank"),
            F.col("_hash").alias(f"{prefix}hash"),
        )
    )


def _counted(df: DataFrame) -> tuple[DataFrame, int]:
    """Cache ``df``, fill the cache now and return its rows: joins planned after this see its real
    size (not the size of the events it came from) and broadcast it when it is under
    ``spark.sql.autoBroadcastJoinThreshold``, instead of shuffling the other side."""
    df = df.persist()
    return df, df.count()


def _materialized(df: DataFrame) -> DataFrame:
    return _counted(df)[0]


def contiguous_index(df: DataFrame, key: str, name: str, cached: list[DataFrame]) -> DataFrame:
    """``df`` (one row per distinct ``key``) with ``name`` = 0..n-1 in ``key`` order, without a
    global window (which orders every row in one task): the rows are range-partitioned and sorted
    by ``key``; each row's position in its partition comes from ``monotonically_increasing_id``
    (the partition id in the upper bits, the position in the lower ones) and is offset by the row
    counts of the partitions before it (one row per partition reaches the driver). The numbered
    rows are cached (added to ``cached``) so that the counts and the index read the same rows; the
    counts' job fills the cache."""
    parts = max(int(df.sparkSession.conf.get("spark.sql.shuffle.partitions")), 1)
    ranged = (
        df.repartitionByRange(parts, key)
        .sortWithinPartitions(key)
        .withColumn("_part", F.spark_partition_id())
        .withColumn("_pos", F.monotonically_increasing_id() - F.shiftleft(F.col("_part").cast("long"), 33))
    )
    ranged = ranged.persist()
    cached.append(ranged)
    counts = sorted((r["_part"], r["count"]) for r in ranged.groupBy("_part").count().collect())
    offsets, total = [], 0
    for part, n in counts:
        offsets.append((part, total))
        total += n
    offset = df.sparkSession.createDataFrame(offsets, "_part int, _offset long")
    return (
        ranged.join(F.broadcast(offset), "_part")
        .withColumn(name, (F.col("_offset") + F.col("_pos")).cast("int"))
        .drop("_part", "_offset", "_pos")
    )


@dataclass
class Split:
    """What ``split_events`` returns.

    ``train``: the training events (the events' columns plus ``validation_fit``); ``validation`` and
    ``test``: ``user_id, item_id, event_time``, one row per pair; ``dropped``: reason -> held-out
    pairs dropped for it; ``pairs``: split -> pairs kept.
    """

    train: DataFrame
    validation: DataFrame
    test: DataFrame
    dropped: dict[str, int]
    pairs: dict[str, int]


def split_events(events: DataFrame, params: SplitParams, cached: list[DataFrame]) -> Split:
    """Split events into training events, validation pairs and test pairs (by source ids).

    The frames this caches (the held-out pairs among them, or the cached frames they are projections
    of, counted so that joins with them broadcast them) are appended to ``cached``.
    """
    # Purchases are a few percent of the events: everything about held-out pairs is derived from
    # one cached scan of them, and only ``train`` reads all the events again.
    purchases = (
        _with_order(events.filter(F.col("behavior") == PURCHASE))
        .select("user_id", "item_id", "behavior", "event_time", "_rank", "_hash")
        .persist()  # filled by the first count below
    )
    cached.append(purchases)
    pair = ["user_id", "item_id"]
    if params.protocol == "global_time":
        cutoff = F.lit(params.cutoff)

        def training(df: DataFrame) -> DataFrame:
            return df.filter(F.col("event_time") < cutoff)

        test, n_test = _counted(
            purchases.filter(F.col("event_time") >= cutoff)
            .groupBy(*pair)
            .agg(F.min("event_time").alias("event_time"))
        )
        cached.append(test)
    elif params.protocol == "leave_last_purchase":
        last, n_test = _counted(_last_per_user(purchases, "_t_"))
        cached.append(last)

        def training(df: DataFrame) -> DataFrame:
            joined = _with_order(df).join(last.drop("_t_item"), "user_id", "left")
            kept = joined.filter(F.col("_t_time").isNull() | _before("_t_"))
            return kept.drop("_t_time", "_t_rank", "_t_hash")

        # One row per user, so one per pair.
        test = last.select("user_id", F.col("_t_item").alias("item_id"), F.col("_t_time").alias("event_time"))
    else:
        raise ValueError(f"unknown split protocol {params.protocol!r}")

    # Cached as it is first computed: the frames below read it three or four times, and under
    # leave-last each rebuild would also broadcast ``last`` again (a Spark job of its own).
    train_buys = training(purchases).persist()
    cached.append(train_buys)

    # Validation candidates, and which training events the validation fit sees (``validation_fit``).
    if params.protocol == "global_time":
        start = F.lit(params.validation_start)
        in_window = train_buys.filter(F.col("event_time") >= start)
        earlier = train_buys.filter(F.col("event_time") < start).select(*pair).distinct()
        candidates, n_candidates = _counted(
            in_window.groupBy(*pair).agg(F.min("event_time").alias("event_time"))
        )
        validation, n_validation = _counted(candidates.join(earlier, pair, "left_anti"))
        cached += [candidates, validation]

        def with_fit_flag(df: DataFrame) -> DataFrame:
            return df.withColumn("validation_fit", F.col("event_time") < start)

    else:
        eligible = (
            train_buys.groupBy("user_id")
            .agg(F.countDistinct("item_id").alias("_n"))
            .filter("_n >= 2")
            .filter(seeded_sample("user_id", params.seed, params.val_user_fraction))
            .select("user_id")
        )
        candidates, n_candidates = _counted(
            _last_per_user(train_buys.join(eligible, "user_id", "left_semi"), "_v_")
        )
        # The last purchase is a repeat when the user bought the item before.
        times = train_buys.groupBy(*pair).agg(F.count("*").alias("_buys"))
        repeats = times.filter("_buys > 1").select("user_id", F.col("item_id").alias("_v_item"))
        cut, n_validation = _counted(candidates.join(repeats, ["user_id", "_v_item"], "left_anti"))
        cached += [candidates, cut]
        validation = cut.select(
            "user_id", F.col("_v_item").alias("item_id"), F.col("_v_time").alias("event_time")
        )

        def with_fit_flag(df: DataFrame) -> DataFrame:
            joined = df.join(F.broadcast(cut.drop("_v_item")), "user_id", "left")
            return joined.withColumn("validation_fit", F.col("_v_time").isNull() | _before("_v_")).drop(
                "_v_time", "_v_rank", "_v_hash"
            )

    # The order keys stay: build_training_tables orders the training events by them (event_seq).
    train = with_fit_flag(training(events))

    known_before_test = train_buys.select(*pair).distinct()
    kept, n_kept = _counted(test.join(known_before_test, pair, "left_anti"))
    cached.append(kept)
    dropped = {
        "test_repeat_purchase": n_test - n_kept,
        "validation_repeat_purchase": n_candidates - n_validation,
    }
    return Split(train, validation, kept, dropped, {"validation": n_validation, "test": n_kept})


def build_training_tables(events: DataFrame, params: SplitParams) -> TrainingTables:
    """The pure transform: sessionized events -> the ``training`` bundle's tables.

    Args:
        events: ``session_events`` rows of the observation window.
        params: protocol, cutoff and validation sampling.
    """
    cached: list[DataFrame] = []
    split = split_events(events, params, cached)
    train, dropped = split.train, split.dropped
    # ``train`` is not cached: the maps reread two or three of its columns from Parquet, which costs
    # less than caching every column of every event (bench/README.md). ``train_idx`` below is the
    # one large cache.

    users = train.select("user_id").distinct()
    user_map = contiguous_index(users, "user_id", "user_idx", cached)
    # One pass over the events for the items and their categories (a null category counts too, so
    # an item seen only without one still gets an index).
    item_cats = train.groupBy("item_id", "category_id").count().persist()  # filled by the item index's job
    top_cat = (
        item_cats.filter(F.col("category_id").isNotNull())
        .withColumn(
            "_r",
            F.row_number().over(Window.partitionBy("item_id").orderBy(F.col("count").desc(), "category_id")),
        )
        .filter("_r = 1")
        .select("item_id", "category_id")
    )
    item_map = contiguous_index(item_cats.select("item_id").distinct(), "item_id", "item_idx", cached).join(
        top_cat, "item_id", "left"
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
    # event_seq: the one event order of sequence models (the serving context orders history the
    # same way); partitioned by user, so it adds a sort within partitions, not a shuffle.
    order = Window.partitionBy("user_idx").orderBy("event_time", "_rank", "_hash")
    train_idx = (
        _with_order(to_idx(train))
        .repartition(parts, "user_idx")
        .withColumn("event_seq", (F.row_number().over(order) - 1).cast("int"))
        .select(*TRAIN_EVENTS.column_names)
        .persist()
    )
    cached.append(train_idx)
    interactions = train_idx.groupBy("user_idx", "item_idx", "behavior").agg(
        F.count("*").alias("count"), F.max("event_time").alias("last_time")
    )
    visited = train_idx.filter(F.col("behavior") != PURCHASE).select("user_idx", "item_idx").distinct()

    heldout_ids = split.validation.withColumn("split", F.lit("validation")).unionByName(
        split.test.withColumn("split", F.lit("test"))
    )
    pairs = ["user_idx", "item_idx"]
    # A validation pair counts only if the validation fit saw its user and its item.
    fitted = train_idx.filter("validation_fit")
    known = F.col("split") == "test"
    heldout_idx = to_idx(heldout_ids)
    heldout_idx = (
        heldout_idx.join(
            fitted.select("user_idx").distinct().withColumn("_fu", F.lit(True)), "user_idx", "left"
        )
        .join(fitted.select("item_idx").distinct().withColumn("_fi", F.lit(True)), "item_idx", "left")
        .filter(known | (F.col("_fu").isNotNull() & F.col("_fi").isNotNull()))
        .drop("_fu", "_fi")
    )
    heldout_idx, n_indexed = _counted(heldout_idx)
    cached.append(heldout_idx)
    # Both are one row per pair and split, and the maps one row per id: the difference is the
    # held-out pairs whose user or item has no index (or, for validation, was not in its fit).
    dropped["cold_user_or_item"] = sum(split.pairs.values()) - n_indexed
    # The visited flags come from the training events of the held-out pairs only (a broadcast
    # semi-join), not from a join with the whole visited table, which would rebuild it. A test
    # item is visited with any visit in training; a validation item with one its fit saw.
    heldout_visits = (
        train_idx.filter(F.col("behavior") != PURCHASE)
        .select(*pairs, "validation_fit")
        .join(F.broadcast(heldout_idx.select(*pairs).distinct()), pairs, "left_semi")
        .groupBy(*pairs)
        .agg(F.max(F.col("validation_fit").cast("int")).alias("_fit"))
    )
    heldout = heldout_idx.join(heldout_visits, pairs, "left").select(
        "user_idx",
        "item_idx",
        "split",
        "event_time",
        F.when(known, F.col("_fit").isNotNull())
        .otherwise(F.coalesce(F.col("_fit") == 1, F.lit(False)))
        .alias("visited"),
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
    # up to 2^31 rows): the same checksum as summing whole hashes as decimals, faster (bench/README.md).
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

    - ``heldout_in_train_purchases``: a test pair that is also a training purchase;
    - ``train_rows_after_cutoff``: a training row at or after the global cutoff (``cutoff`` set);
    - ``train_purchase_after_test``: a training purchase after the user's first test purchase, or
      that purchase itself (a purchase of another item at the same second may come before it);
    - ``validation_fit_after_validation``: a row the validation fit sees after its user's first
      validation purchase, or the validation purchase itself.
    """
    inter, heldout, events = tables[INTERACTIONS.name], tables[HELDOUT.name], tables[TRAIN_EVENTS.name]
    pairs = ["user_idx", "item_idx"]
    test_pairs = heldout.filter("split = 'test'").select(*pairs).distinct().withColumn("_held", F.lit(True))
    late = F.col("last_time") >= F.lit(cutoff) if cutoff is not None else F.lit(False)
    by_behavior = (
        inter.join(F.broadcast(test_pairs), pairs, "left")
        .groupBy("behavior")
        .agg(
            *_hash_sums(inter),
            F.count(F.when(F.col("_held").isNotNull(), 1)).alias("_held"),
            F.count(F.when(late, 1)).alias("_late"),
        )
        .collect()
    )
    first_test = heldout.filter("split = 'test'").groupBy("user_idx").agg(F.min("event_time").alias("_t"))
    val = heldout.filter("split = 'validation'")
    first_val = val.groupBy("user_idx").agg(F.min("event_time").alias("_v"))
    val_pairs = val.select(*pairs, F.col("event_time").alias("_vp"))
    test_times = heldout.filter("split = 'test'").select(*pairs, F.col("event_time").alias("_tp"))
    after_test = (F.col("behavior") == PURCHASE) & (
        (F.col("event_time") > F.col("_t")) | (F.col("event_time") == F.col("_tp"))
    )
    fit_late = F.col("validation_fit") & (
        (F.col("event_time") > F.col("_v"))
        | ((F.col("behavior") == PURCHASE) & (F.col("event_time") == F.col("_vp")))
    )
    events_row = (
        events.join(F.broadcast(first_test), "user_idx", "left")
        .join(F.broadcast(first_val), "user_idx", "left")
        .join(F.broadcast(val_pairs), pairs, "left")
        .join(F.broadcast(test_times), pairs, "left")
        .agg(
            *_hash_sums(events),
            F.count(F.when(after_test, 1)).alias("_after"),
            F.count(F.when(fit_late, 1)).alias("_fit_late"),
        )
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
    # The three small tables' sums in one job instead of three.
    small = (VISITED.name, USER_MAP.name, ITEM_MAP.name)
    sums = functools.reduce(
        DataFrame.unionByName,
        [tables[n].agg(*_hash_sums(tables[n])).withColumn("_table", F.lit(n)) for n in small],
    )
    for r in sums.collect():
        checksums[r["_table"]] = _checksum([r])

    leaks = {"heldout_in_train_purchases": sum(r["_held"] for r in by_behavior if r["behavior"] == PURCHASE)}
    if cutoff is not None:
        leaks["train_rows_after_cutoff"] = sum(r["_late"] for r in by_behavior)
    leaks["train_purchase_after_test"] = events_row["_after"]
    leaks["validation_fit_after_validation"] = events_row["_fit_late"]

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
    cutoff = validation_start = None
    if cfg.protocol == "global_time":
        cutoff = datetime.combine(window_start(run_date, cfg.test_days), time(0), tzinfo=UTC)
        # The validation window is the validation_days days before the test window.
        first_validation_day = window_start(run_date, cfg.test_days + cfg.validation_days)
        validation_start = datetime.combine(first_validation_day, time(0), tzinfo=UTC)
    return SplitParams(cfg.protocol, cutoff, settings.seeds.split, cfg.val_user_fraction, validation_start)


def publish_training_tables(
    spark: SparkSession, settings: Settings, built: TrainingTables, manifest: TrainingManifest
) -> TrainingManifest:
    """Write, check and atomically publish the training bundle ``manifest.ds``; return the manifest
    completed with what the written tables hold."""
    ds = manifest.ds
    target = TRAINING.dir(settings.paths.warehouse_root, ds)
    parts = int(spark.conf.get("spark.sql.shuffle.partitions"))
    sort_keys: dict[str, tuple[str, ...]] = {
        INTERACTIONS.name: ("user_idx", "item_idx", "behavior"),
        VISITED.name: ("user_idx", "item_idx"),
        HELDOUT.name: ("split", "user_idx", "item_idx"),
        USER_MAP.name: ("user_idx",),
        ITEM_MAP.name: ("item_idx",),
        TRAIN_EVENTS.name: ("user_idx", "event_seq"),
    }
    tables_by_name: dict[str, Table] = {t.name: t for t in TRAINING.tables}
    with atomic.staged_dir(target) as staged:
        written: dict[str, DataFrame] = {}
        for name, df in built.tables.items():
            out = df.select(*tables_by_name[name].column_names)
            # Few, sorted files: reruns give identical files and the torch side reads them quickly.
            # The per-user tables are written by one task per user partition (as the events are
            # already partitioned), the small ones as one file.
            big = name in (TRAIN_EVENTS.name, INTERACTIONS.name, VISITED.name)
            out = out.repartition(parts, "user_idx") if big else out.repartition(1)
            out.sortWithinPartitions(*sort_keys[name]).write.parquet(str(staged / name))
            written[name] = tables_by_name[name].read_spark(spark, staged / name)
        inspection = inspect_tables(written, manifest.cutoff_time)
        leaks, sums, stats = inspection.leaks, inspection.checksums, inspection.stats
        if any(leaks.values()):
            raise LeakageError(f"training tables for {ds} leak held-out data: {leaks}; nothing published")
        if stats["users"] < settings.split.min_users or stats["items"] < settings.split.min_items:
            raise SplitError(
                f"training tables for {ds} too small: {stats['users']} users, {stats['items']} items "
                f"(split.min_users={settings.split.min_users}, split.min_items={settings.split.min_items})"
            )
        manifest = replace(
            manifest,
            stats=stats,
            leakage=leaks,
            dropped=dict(built.dropped),
            checksums={name: f"{h}-{n}" for name, (h, n) in sums.items()},
        )
        write_manifest(staged, manifest)
    return manifest


def publish_and_count(
    spark: SparkSession, settings: Settings, built: TrainingTables, manifest: TrainingManifest, counts: dict
) -> TrainingManifest:
    """Publish the bundle, free its cached frames, and put its headline numbers on the stage's log line."""
    try:
        manifest = publish_training_tables(spark, settings, built, manifest)
    finally:
        built.release()
    st = manifest.stats
    counts.update(
        users=st["users"],
        items=st["items"],
        train_events=st["train_events"],
        test_pairs=st["heldout"]["test"]["pairs"],
        test_users=st["heldout"]["test"]["users"],
        val_pairs=st["heldout"]["validation"]["pairs"],
        **{f"dropped_{k}": v for k, v in manifest.dropped.items()},
    )
    return manifest


def read_session_events(spark: SparkSession, settings: Settings, run_date: date) -> DataFrame:
    path = SESSIONIZED.table_dir(settings.paths.warehouse_root, run_date, SESSION_EVENTS)
    return SESSION_EVENTS.read_spark(spark, path, f"run `funnelrec sessionize --date {run_date}` first")


def run_split(spark: SparkSession, settings: Settings, run_date: date) -> dict:
    """Build and publish ``training/ds=<run_date>`` from ``sessionized/ds=<run_date>``; returns its
    manifest as written (``manifest.json``)."""
    cfg = settings.split
    params = split_params(settings, run_date)
    first_day = window_start(run_date, cfg.observation_days)
    with stage("split", date=run_date.isoformat(), protocol=cfg.protocol) as counts:
        events = read_session_events(spark, settings, run_date).filter(
            F.col("event_date") >= F.lit(first_day)
        )
        built = build_training_tables(events, params)
        manifest = TrainingManifest(
            ds=run_date.isoformat(),
            kind=EVENTS_BUNDLE,
            protocol=cfg.protocol,
            cutoff=params.cutoff.isoformat() if params.cutoff else None,
            observation_window=[first_day.isoformat(), run_date.isoformat()],
            sources=list(settings.pipeline.sources),
            seed=params.seed,
            val_user_fraction=params.val_user_fraction,
            validation_design=REFIT,
            validation_start=params.validation_start.isoformat() if params.validation_start else None,
        )
        manifest = publish_and_count(spark, settings, built, manifest, counts)
    return document_json(manifest)
