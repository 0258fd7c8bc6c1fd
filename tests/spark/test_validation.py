"""Great Expectations gates on real Spark: good tables pass; each broken fixture fails on exactly the
expectations it should, with a message a person can act on; a failed gate stops the nightly run."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta

import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

from infra.tables import (
    EVENTS,
    HELDOUT,
    INTERACTIONS,
    SESSION_EVENTS,
    SESSIONIZED,
    SESSIONS,
    TRAINING,
    USER_MAP,
    events_dir,
)
from jobs.sessionize import run_sessionize
from jobs.split import run_split
from tests.conftest import settings_under
from validation.runner import ValidationFailed
from validation.validate import result_path, run_validate

pytestmark = pytest.mark.spark
RUN = date(2020, 1, 3)


def _t(day, hour):
    return datetime(2020, 1, day, hour)


ROWS = [  # (user, item, behavior, time, price)
    ("u1", "A", "view", _t(1, 8), 1.0),
    ("u1", "A", "purchase", _t(1, 9), 1.0),
    ("u1", "B", "view", _t(2, 8), 2.0),
    ("u1", "C", "purchase", _t(2, 9), 3.0),
    ("u1", "D", "view", _t(2, 10), 4.0),
    ("u1", "D", "purchase", _t(3, 9), 4.0),
    ("u2", "X", "view", _t(1, 8), 1.0),
    ("u2", "X", "purchase", _t(1, 9), 1.0),
    ("u2", "Y", "purchase", _t(2, 9), 2.0),
    ("u2", "C", "view", _t(2, 13), 3.0),
    ("u2", "D", "view", _t(2, 14), 4.0),
    ("u2", "B", "purchase", _t(3, 9), 2.0),
]
LOOSE = T.StructType([T.StructField(f.name, f.dataType, True) for f in EVENTS.spark_schema().fields])


def _write_events(spark, settings, rows):
    # A 6th element overrides the partition date (a row filed under the wrong day).
    data = [
        (r[3], r[0], r[1], r[2], None, None, r[4], None, "hand", r[5] if len(r) > 5 else r[3].date())
        for r in rows
    ]
    (
        spark.createDataFrame(data, LOOSE)
        .write.partitionBy("source", "event_date")
        .mode("overwrite")
        .parquet(str(events_dir(settings.paths.warehouse_root)))
    )


@pytest.fixture(scope="module")
def good(spark, tmp_path_factory):
    settings = settings_under(
        tmp_path_factory.mktemp("gx"),
        {
            "pipeline": {"sources": ["hand"]},
            "split": {"test_days": 1, "val_user_fraction": 1.0, "min_users": 1, "min_items": 1},
        },
    )
    _write_events(spark, settings, ROWS)
    run_sessionize(spark, settings, RUN)
    run_split(spark, settings, RUN)
    return settings


def _failed_column(failure) -> str:
    kw = failure.kwargs
    return str(kw.get("column") or kw.get("column_list") or kw.get("column_A") or "")


def _failed(excinfo) -> set[tuple[str, str]]:
    return {(f.expectation, _failed_column(f)) for f in excinfo.value.failures}


def test_good_tables_pass_and_results_and_docs_are_written(spark, good):
    documented: set[str] = set()
    for table in ("events", "sessions", "training"):
        summary = run_validate(spark, good, table, RUN)
        assert summary["success"]
        saved = json.loads(result_path(good, table, RUN.isoformat()).read_text())
        assert saved["success"] and saved["suites"]
        documented.update(saved["suites"])
    docs = good.validation.data_docs_dir
    index = (docs / "index.html").read_text()
    # Every suite of every table has its validation page, linked from the index.
    for suite in documented:
        pages = list((docs / "validations" / suite).rglob("*.html"))
        assert pages, suite
        assert f"validations/{suite}/" in index, suite


EVENT_FAULTS = [
    (
        "nulls",
        lambda r: [*r, (None, "A", "view", _t(2, 1), 1.0)],
        {("expect_column_values_to_not_be_null", "user_id")},
    ),
    (
        "behaviour set",
        lambda r: [*r, ("u1", "A", "refund", _t(2, 1), 1.0)],
        {("expect_column_values_to_be_in_set", "behavior")},
    ),
    (
        "after run date",
        lambda r: [*r, ("u1", "A", "view", _t(3, 23) + timedelta(hours=2), 1.0, RUN)],
        {("expect_column_values_to_be_between", "event_time")},
    ),
    (
        "duplicates",
        lambda r: [*r, r[0]],
        {
            (
                "expect_compound_columns_to_be_unique",
                "['event_time', 'user_id', 'item_id', 'behavior', 'category_id', "
                "'brand', 'price', 'source_session_id', 'source']",
            )
        },
    ),
    (
        "negative price",
        lambda r: [*r, ("u1", "Z", "view", _t(2, 1), -5.0)],
        {("expect_column_values_to_be_between", "price")},
    ),
]


@pytest.mark.parametrize("family, change, expected", EVENT_FAULTS)
def test_broken_events_fail_on_exactly_their_expectation(spark, tmp_path, family, change, expected):
    settings = settings_under(tmp_path, {"pipeline": {"sources": ["hand"]}})
    _write_events(spark, settings, change(ROWS))
    with pytest.raises(ValidationFailed) as exc:
        run_validate(spark, settings, "events", RUN)
    assert _failed(exc) == expected
    msg = str(exc.value)
    assert "unexpected=" in msg and "samples=" in msg and "guards:" in msg and "result.json" in msg


def test_event_row_count_bounds_come_from_config(spark, tmp_path):
    settings = settings_under(
        tmp_path, {"pipeline": {"sources": ["hand"]}, "validation": {"events_max_rows": 5}}
    )
    _write_events(spark, settings, ROWS)
    with pytest.raises(ValidationFailed) as exc:
        run_validate(spark, settings, "events", RUN)
    assert _failed(exc) == {("expect_table_row_count_to_be_between", "")}


def _rewrite(spark, path, table, df):
    tmp = path.parent / (path.name + ".new")
    df.select(*table.column_names).write.parquet(str(tmp))
    import shutil

    shutil.rmtree(path)
    tmp.rename(path)
    # Cached reads of the old files would otherwise answer for the new ones (same plan, same path).
    spark.catalog.clearCache()


@pytest.fixture
def copy_of(good, tmp_path):
    """A private copy of the good warehouse, to break."""
    import shutil

    def make():
        wh = tmp_path / "warehouse"
        shutil.copytree(good.paths.warehouse_root, wh, ignore=shutil.ignore_patterns("gx", "validation"))
        return settings_under(
            tmp_path, {"pipeline": {"sources": ["hand"]}, "split": {"min_users": 1, "min_items": 1}}
        )

    return make


@pytest.mark.parametrize(
    "family, expected",
    [
        ("end before start", {("expect_column_pair_values_a_to_be_greater_than_b", "session_end")}),
        ("count mismatch", {("expect_column_pair_values_to_be_equal", "event_count")}),
        ("duplicate id", {("expect_compound_columns_to_be_unique", "['user_id', 'session_id']")}),
        ("long gap", {("expect_column_values_to_be_between", "max_gap_seconds")}),
    ],
)
def test_broken_sessions_fail_on_exactly_their_expectation(spark, copy_of, family, expected):
    settings = copy_of()
    bundle = SESSIONIZED.dir(settings.paths.warehouse_root, RUN)
    sessions = spark.read.parquet(str(bundle / SESSIONS.name)).cache()
    first = sessions.orderBy("session_id").first()["session_id"]
    if family == "end before start":
        broken = sessions.withColumn(
            "session_end",
            F.when(
                F.col("session_id") == first, F.col("session_start") - F.expr("INTERVAL 1 HOUR")
            ).otherwise(F.col("session_end")),
        )
    elif family == "count mismatch":
        broken = sessions.withColumn(
            "event_count",
            F.when(F.col("session_id") == first, F.col("event_count") + 1).otherwise(F.col("event_count")),
        )
    elif family == "duplicate id":
        broken = sessions.unionByName(sessions.filter(F.col("session_id") == first))
    else:
        # Merge a user's sessions into one: the events now carry one id across a day-long gap.
        ev = spark.read.parquet(str(bundle / SESSION_EVENTS.name))
        merged = ev.withColumn("session_id", F.concat(F.lit("m-"), F.col("user_id")))
        _rewrite(spark, bundle / SESSION_EVENTS.name, SESSION_EVENTS, merged.cache())
        from jobs.sessionize import sessions_of

        broken = sessions_of(spark.read.parquet(str(bundle / SESSION_EVENTS.name)))
    _rewrite(spark, bundle / SESSIONS.name, SESSIONS, broken.cache())
    with pytest.raises(ValidationFailed) as exc:
        run_validate(spark, settings, "sessions", RUN)
    assert _failed(exc) == expected


def _break_training(spark, bundle, family: str) -> None:
    """Rewrite one table of the training ``bundle`` with the fault ``family`` names."""
    if family == "visited label":
        h = spark.read.parquet(str(bundle / HELDOUT.name)).cache()
        first = h.orderBy("user_idx", "item_idx").first()
        flip = (F.col("user_idx") == first["user_idx"]) & (F.col("item_idx") == first["item_idx"])
        _rewrite(
            spark,
            bundle / HELDOUT.name,
            HELDOUT,
            h.withColumn("visited", F.when(flip, ~F.col("visited")).otherwise(F.col("visited"))),
        )
    elif family == "heldout in training":
        inter = spark.read.parquet(str(bundle / INTERACTIONS.name)).cache()
        h = spark.read.parquet(str(bundle / HELDOUT.name)).cache()
        buy = inter.filter("behavior = 'purchase'").orderBy("user_idx", "item_idx").first()
        extra = spark.createDataFrame(
            [(buy["user_idx"], buy["item_idx"], "test", _t(3, 12), False)], HELDOUT.spark_schema()
        )
        # Label it as the visited set says, so only the leakage check can object.
        from validation.suites import heldout_view

        vis = spark.read.parquet(str(bundle / "visited"))
        events = spark.read.parquet(str(bundle / "train_events"))
        labelled = heldout_view(extra, vis, inter, events).select(
            "user_idx", "item_idx", "split", "event_time", F.col("expected_visited").alias("visited")
        )
        _rewrite(spark, bundle / HELDOUT.name, HELDOUT, h.unionByName(labelled))
    elif family == "row after cutoff":
        inter = spark.read.parquet(str(bundle / INTERACTIONS.name)).cache()
        first = inter.orderBy("user_idx", "item_idx", "behavior").first()
        late = (F.col("user_idx") == first["user_idx"]) & (F.col("item_idx") == first["item_idx"])
        _rewrite(
            spark,
            bundle / INTERACTIONS.name,
            INTERACTIONS,
            inter.withColumn("last_time", F.when(late, F.lit(_t(3, 5))).otherwise(F.col("last_time"))),
        )
    elif family == "id map gap":
        um = spark.read.parquet(str(bundle / USER_MAP.name)).cache()
        last = um.agg(F.max("user_idx")).first()[0]
        _rewrite(
            spark,
            bundle / USER_MAP.name,
            USER_MAP,
            um.withColumn(
                "user_idx", F.when(F.col("user_idx") == last, F.lit(last + 5)).otherwise(F.col("user_idx"))
            ),
        )
    else:
        raise ValueError(family)


TRAINING_FAULTS = [
    ("visited label", {("expect_column_pair_values_to_be_equal", "visited")}),
    ("heldout in training", {("expect_column_values_to_be_in_set", "in_train_purchases")}),
    ("row after cutoff", {("expect_column_values_to_be_between", "last_time")}),
    ("id map gap", {("expect_column_values_to_be_between", "user_idx")}),
]


@pytest.mark.parametrize("family, expected", TRAINING_FAULTS)
def test_broken_training_tables_fail_on_exactly_their_expectation(spark, copy_of, family, expected):
    settings = copy_of()
    _break_training(spark, TRAINING.dir(settings.paths.warehouse_root, RUN), family)
    with pytest.raises(ValidationFailed) as exc:
        run_validate(spark, settings, "training", RUN)
    assert _failed(exc) == expected


def _failed_counts(excinfo) -> set[tuple[str, str, int | None]]:
    return {(f.expectation, _failed_column(f), f.unexpected_count) for f in excinfo.value.failures}


def test_the_pandas_and_the_spark_engine_fail_the_same_expectations_on_the_same_rows(
    spark, copy_of, tmp_path
):
    """Tables up to ``validation.pandas_max_rows`` rows are checked by GX's pandas engine, larger
    ones by its Spark engine: with every fault above at once, both name the same expectations with
    the same unexpected counts."""

    def both(settings, table: str) -> set:
        found = []
        for limit in (settings.validation.pandas_max_rows, 0):
            engine = settings.model_copy(
                update={"validation": settings.validation.model_copy(update={"pandas_max_rows": limit})}
            )
            with pytest.raises(ValidationFailed) as exc:
                run_validate(spark, engine, table, RUN)
            found.append(_failed_counts(exc))
        assert found[0] == found[1], table
        return {(e, c) for e, c, _ in found[0]}

    events = settings_under(tmp_path / "events", {"pipeline": {"sources": ["hand"]}})
    assert events.validation.pandas_max_rows > len(ROWS)
    rows = ROWS
    for _, change, _ in EVENT_FAULTS:
        rows = change(rows)
    _write_events(spark, events, rows)
    assert both(events, "events") == set().union(*(expected for *_, expected in EVENT_FAULTS))

    settings = copy_of()
    for family, _ in TRAINING_FAULTS:
        _break_training(spark, TRAINING.dir(settings.paths.warehouse_root, RUN), family)
    assert both(settings, "training") == set().union(*(expected for _, expected in TRAINING_FAULTS))
