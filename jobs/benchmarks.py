"""Benchmark folders (MBGCN / MEMBER format) -> the same training tables as ``split``.

A benchmark folder holds one ``user item`` file per behaviour (0-based contiguous ids, no times,
plain or gzipped) plus ``data_size.txt`` (``n_users n_items``). For the MBGCN Tmall folder this
reproduces MEMBER's split (``../shared/notes/member.md`` §3, §6), so our test metrics are comparable
with that harness:

- training purchases = MBGCN ``train`` ∪ MBGCN ``test`` (255,586 pairs);
- test = MBGCN ``validation`` (31,572 pairs over 29,310 users);
- visited = any auxiliary behaviour (click, collect, cart) in training.

MEMBER's own "validation" is a subset of its training purchases, so it is not used for selection:
validation is carved out of the training purchases instead, for a seeded sample of users
(``split.val_user_fraction``), one seeded-random purchase each, recorded in the manifest, and
removed from training (``validation_design: holdout``: the files have no times, so the time-clean
validation fit and refit of ``split`` cannot be built; one model is fitted and both validated and
tested). The test file is never touched for selection. Every user and item id of ``data_size.txt`` stays in the
catalogue, as in MEMBER, even without training interactions.
"""

from __future__ import annotations

from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from infra.logs import stage
from infra.settings import Settings
from infra.tables import (
    BENCHMARK_BUNDLE,
    HELDOUT,
    HOLDOUT,
    INTERACTIONS,
    ITEM_MAP,
    PURCHASE,
    TRAIN_EVENTS,
    USER_MAP,
    VISITED,
    TrainingManifest,
    document_json,
)
from jobs.split import TrainingTables, publish_and_count, seeded_sample

#: Benchmark file stem -> canonical behaviour, for the auxiliary behaviours.
AUX_FILES = {"click": "view", "collect": "fav", "cart": "cart"}
#: MEMBER's re-split of the MBGCN Tmall files: which files are training purchases and which is test.
MEMBER_TMALL = {"train_purchases": ("train", "test"), "test": "validation"}


def _find(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.txt", f"{stem}.txt.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _pairs(spark: SparkSession, path: Path) -> DataFrame:
    df = spark.read.csv(str(path), sep=" ", schema="user_idx int, item_idx int")
    return df.filter(F.col("user_idx").isNotNull() & F.col("item_idx").isNotNull()).dropDuplicates()


def build_benchmark_tables(
    spark: SparkSession, folder: Path, seed: int, val_user_fraction: float, name: str | None = None
) -> tuple[TrainingTables, TrainingManifest]:
    """Read a benchmark folder into the training bundle's tables (MEMBER's Tmall split) and its
    manifest (bundle name ``name``, default the folder's)."""
    folder = Path(folder)
    size = (folder / "data_size.txt").read_text().split()
    n_users, n_items = int(size[0]), int(size[1])
    missing = [
        s for s in (*MEMBER_TMALL["train_purchases"], MEMBER_TMALL["test"]) if _find(folder, s) is None
    ]
    if missing:
        raise FileNotFoundError(f"benchmark folder {folder} lacks {missing} (.txt or .txt.gz)")

    buys = None
    for stem in MEMBER_TMALL["train_purchases"]:
        df = _pairs(spark, _find(folder, stem))
        buys = df if buys is None else buys.unionByName(df)
    buys = buys.dropDuplicates()
    test = _pairs(spark, _find(folder, MEMBER_TMALL["test"]))
    aux_found = {stem: b for stem, b in AUX_FILES.items() if _find(folder, stem) is not None}
    aux = [
        _pairs(spark, _find(folder, stem)).withColumn("behavior", F.lit(b)) for stem, b in aux_found.items()
    ]

    # Validation: for a seeded sample of users with >= 2 training purchases, one seeded-random purchase.
    per_user = Window.partitionBy("user_idx").orderBy(F.xxhash64("user_idx", "item_idx", F.lit(seed)))
    n_buys = Window.partitionBy("user_idx")
    ranked = buys.withColumn("_r", F.row_number().over(per_user)).withColumn("_n", F.count("*").over(n_buys))
    validation = ranked.filter(
        (F.col("_r") == 1) & (F.col("_n") >= 2) & seeded_sample("user_idx", seed, val_user_fraction)
    ).select("user_idx", "item_idx")
    train_buys = buys.join(validation, ["user_idx", "item_idx"], "left_anti").withColumn(
        "behavior", F.lit(PURCHASE)
    )

    events = train_buys
    for df in aux:
        events = events.unionByName(df)
    events = events.persist()
    interactions = events.select(
        "user_idx",
        "item_idx",
        "behavior",
        F.lit(1).cast("long").alias("count"),
        F.lit(None).cast("timestamp").alias("last_time"),
    )
    visited = events.filter(F.col("behavior") != PURCHASE).select("user_idx", "item_idx").distinct()
    known = train_buys.select("user_idx", "item_idx").unionByName(validation)
    repeat = test.join(known, ["user_idx", "item_idx"], "left_semi")
    test = test.join(known, ["user_idx", "item_idx"], "left_anti")
    heldout = (
        validation.withColumn("split", F.lit("validation"))
        .unionByName(test.withColumn("split", F.lit("test")))
        .join(visited.withColumn("visited", F.lit(True)), ["user_idx", "item_idx"], "left")
        .select(
            "user_idx",
            "item_idx",
            "split",
            F.lit(None).cast("timestamp").alias("event_time"),
            F.coalesce("visited", F.lit(False)).alias("visited"),
        )
    )
    ids = spark.range(max(n_users, n_items)).select(F.col("id").cast("int").alias("idx"))
    user_map = ids.filter(F.col("idx") < n_users).select(
        F.col("idx").cast("string").alias("user_id"), F.col("idx").alias("user_idx")
    )
    item_map = ids.filter(F.col("idx") < n_items).select(
        F.col("idx").cast("string").alias("item_id"),
        F.col("idx").alias("item_idx"),
        F.lit(None).cast("string").alias("category_id"),
    )
    train_events = events.select(
        "user_idx",
        "item_idx",
        "behavior",
        F.lit(None).cast("timestamp").alias("event_time"),
        F.lit(None).cast("string").alias("session_id"),
        F.lit(None).cast("int").alias("event_seq"),
        F.lit(True).alias("validation_fit"),
    )
    tables = {
        INTERACTIONS.name: interactions,
        VISITED.name: visited,
        HELDOUT.name: heldout,
        USER_MAP.name: user_map,
        ITEM_MAP.name: item_map,
        TRAIN_EVENTS.name: train_events,
    }
    manifest = TrainingManifest(
        ds=name or folder.name,
        kind=BENCHMARK_BUNDLE,
        benchmark=folder.name,
        protocol="member_tmall",
        split_rule="train purchases = MBGCN train + test; test = MBGCN validation; "
        "validation = one seeded purchase of sampled users, removed from training",
        validation_design=HOLDOUT,
        auxiliary_behaviors={stem: AUX_FILES[stem] for stem in aux_found},
        cutoff=None,
        seed=seed,
        val_user_fraction=val_user_fraction,
        declared_size={"users": n_users, "items": n_items},
    )
    return TrainingTables(tables, {"test_repeat_purchase": repeat.count()}, cached=[events]), manifest


def run_benchmark_split(
    spark: SparkSession, settings: Settings, folder: Path, name: str | None = None
) -> dict:
    """Publish a benchmark folder's training tables as ``training/ds=<name>`` (default: the folder
    name); returns its manifest as written."""
    name = name or Path(folder).name
    with stage("split", benchmark=name) as counts:
        built, manifest = build_benchmark_tables(
            spark, Path(folder), settings.seeds.split, settings.split.val_user_fraction, name
        )
        manifest = publish_and_count(spark, settings, built, manifest, counts)
    return document_json(manifest)
