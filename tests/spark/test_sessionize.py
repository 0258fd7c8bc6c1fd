"""Sessionization on real Spark: the gap and source-session rules, stable ids, and agreement with
REES46's own session ids."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from pyspark.sql import functions as F

from infra.tables import EVENTS
from jobs.ingest import ingest_source
from jobs.sessionize import run_sessionize, sessionize_events
from jobs.split import read_session_events

pytestmark = pytest.mark.spark
T0 = datetime(2020, 1, 2, 10, 0, tzinfo=UTC)


def _events(spark, rows):
    """rows: (user, minutes after T0, behavior, source_session_id)."""
    data = [
        (
            T0 + timedelta(minutes=m),
            u,
            f"i{k}",
            b,
            None,
            None,
            None,
            s,
            "src",
            (T0 + timedelta(minutes=m)).date(),
        )
        for k, (u, m, b, s) in enumerate(rows)
    ]
    return spark.createDataFrame(data, EVENTS.spark_schema())


def _sessions_by_user(session_events):
    out: dict[str, list[list[int]]] = {}
    for r in session_events.orderBy("user_id", "event_time").collect():
        minutes = int((r["event_time"].replace(tzinfo=UTC) - T0).total_seconds() // 60)
        groups = out.setdefault(r["user_id"], [])
        if not groups or groups[-1][0] != r["session_id"]:
            groups.append([r["session_id"]])
        groups[-1].append(minutes)
    return {u: [g[1:] for g in gs] for u, gs in out.items()}


def test_gap_longer_than_threshold_starts_a_new_session(spark):
    ev = _events(
        spark,
        [
            ("a", 0, "view", None),
            ("a", 30, "view", None),
            ("a", 61, "cart", None),
            ("a", 62, "purchase", None),
            ("b", 5, "view", None),
        ],
    )
    se, sessions = sessionize_events(ev, gap_minutes=30, use_source_session=True)
    # 0 -> 30 is exactly the gap (same session); 30 -> 61 is longer (new session).
    assert _sessions_by_user(se) == {"a": [[0, 30], [61, 62]], "b": [[5]]}
    bought = [r for r in sessions.collect() if r["purchased"]]
    assert len(bought) == 1 and bought[0]["n_cart"] == 1 and bought[0]["n_purchase"] == 1
    assert sessions.count() == 3


def test_source_session_change_splits_unless_disabled(spark):
    ev = _events(spark, [("a", 0, "view", "s1"), ("a", 5, "view", "s1"), ("a", 6, "view", "s2")])
    se, _ = sessionize_events(ev, 30, use_source_session=True)
    assert _sessions_by_user(se) == {"a": [[0, 5], [6]]}
    se, _ = sessionize_events(ev, 30, use_source_session=False)
    assert _sessions_by_user(se) == {"a": [[0, 5, 6]]}


def test_session_ids_are_stable_whatever_the_input_order(spark):
    rows = [("a", m, "view", None) for m in (0, 3, 50, 51, 200)] + [("b", 1, "view", None)]
    ev = _events(spark, rows)
    ids1 = {
        (r["user_id"], r["item_id"]): (r["session_id"], r["seq_in_session"])
        for r in sessionize_events(ev, 30, True)[0].collect()
    }
    shuffled = ev.repartition(3).orderBy(F.rand(7))
    ids2 = {
        (r["user_id"], r["item_id"]): (r["session_id"], r["seq_in_session"])
        for r in sessionize_events(shuffled, 30, True)[0].collect()
    }
    assert ids1 == ids2
    assert len({sid for sid, _ in ids1.values()}) == 4


def _pairwise(spark, se) -> tuple[float, float]:
    """Precision/recall of 'same session' over event pairs of the same user vs the source's ids."""

    def pairs(df, keys):
        return (
            df.groupBy(*keys).count().select(F.sum(F.col("count") * (F.col("count") - 1) / 2)).first()[0] or 0
        )

    ours = pairs(se, ["user_id", "session_id"])
    theirs = pairs(se, ["user_id", "source_session_id"])
    both = pairs(se, ["user_id", "session_id", "source_session_id"])
    return both / ours, both / theirs


def test_rees46_sessions_agree_with_the_source_ids(spark, make_settings, capsys):
    settings = make_settings({"pipeline": {"sources": ["rees46"]}})
    run_date = date(2019, 10, 1)
    ingest_source(spark, settings, "rees46", run_date)
    run_sessionize(spark, settings, run_date)
    se = read_session_events(spark, settings, run_date)
    precision, recall = _pairwise(spark, se)

    ev = se.drop("session_id", "seq_in_session")
    gap_only, _ = sessionize_events(ev, 30, use_source_session=False)
    p_gap, r_gap = _pairwise(spark, gap_only)
    with capsys.disabled():
        print(
            f"\nREES46 same-session pairs, defaults: precision={precision:.4f} recall={recall:.4f}; "
            f"gap only: precision={p_gap:.4f} recall={r_gap:.4f}"
        )
    assert precision >= 0.95 and recall >= 0.95
    # The gap rule alone never splits a source session here (REES46 rotates its ids more often than
    # every 30 idle minutes, so gap-only precision is lower: 0.89 on this slice).
    assert r_gap >= 0.95


def test_sessions_table_counts_agree_with_events(spark, make_settings):
    settings = make_settings({"pipeline": {"sources": ["taobao"]}, "sessionize": {"history_days": 30}})
    run_date = date(2017, 12, 3)
    ingest_source(spark, settings, "taobao", run_date)
    r = run_sessionize(spark, settings, run_date)
    assert r.events == 10_000 and r.users == 114
    from infra.tables import SESSIONIZED, SESSIONS

    sessions = spark.read.parquet(
        str(SESSIONIZED.table_dir(settings.paths.warehouse_root, run_date, SESSIONS))
    )
    agg = sessions.agg(
        F.sum("event_count"),
        F.sum(sum(F.col(f"n_{b}") for b in ("view", "fav", "cart", "remove_from_cart", "purchase"))),
    ).first()
    assert agg[0] == agg[1] == 10_000
    assert sessions.filter("session_start > session_end").count() == 0
    assert sessions.select("session_id").distinct().count() == sessions.count() == r.sessions
