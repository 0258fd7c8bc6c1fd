"""Ingest on real Spark: every refused row is quarantined with its reason and line, the bad-row
threshold stops a run before anything is published, reruns write identical partitions."""

from __future__ import annotations

import filecmp
from datetime import date
from pathlib import Path

import pytest
import yaml

from infra import atomic
from infra.tables import events_dir
from jobs.ingest import BadInputError, ingest_source

pytestmark = pytest.mark.spark

DAY = "2020-01-02"
# line number -> (line, expected quarantine reason or None for a good row)
LINES = {
    1: ("uid,iid,cat,act,ts,price,sess", "header"),
    2: ("1,10,5,click,1577923200,1.5,s1", None),
    3: ("266079.0,11.0,5,buy,1577923260,2.0,s1", None),
    4: ("1,10,5,click,1577923200,1.5,s1", "duplicate"),
    5: ("1,10,5,click,1577923200", "wrong_field_count"),
    6: (",10,5,click,1577923200,1,s1", "missing_user_id"),
    7: ("1,,5,click,1577923200,1,s1", "missing_item_id"),
    8: ("1.5,10,5,click,1577923200,1,s1", "bad_id"),
    9: ("1,10,5,click,,1,s1", "missing_time"),
    10: ("1,10,5,click,notatime,1,s1", "unparseable_time"),
    11: ("1,10,5,refund,1577923200,1,s1", "unknown_behavior"),
    12: ("1,10,5,click,1577923200,abc,s1", "non_numeric_price"),
    13: ("1,10,5,click,1577923200,-1,s1", "negative_price"),
    14: ("1,10,5,click,1578096000,1,s1", "after_run_date"),
    15: ("1,10,5,click,1577836800,1,s1", "late_arrival"),
    16: ('2,12,5,click,1577923300,"3.0","s,2"', None),
    # Ids, prices and times that parse but cannot be real (issue #25's hostile input).
    17: ("-4.0,10,5,click,1577923200,1,s1", "bad_id"),  # a negative id
    18: ("1,99999999999999999999,5,click,1577923200,1,s1", "bad_id"),  # beyond a 64-bit integer
    19: ("1,10,nan,click,1577923200,1,s1", "bad_id"),  # a float word where the id should be
    20: ("1,10,Infinity,click,1577923200,1,s1", "bad_id"),
    21: ("1,10," + "c" * 65 + ",click,1577923200,1,s1", "bad_id"),  # longer than ids.max_length
    22: ("1,10,5 6,click,1577923200,1,s1", "bad_id"),  # not ids.pattern
    23: ("1,10,5,click,1577923200,NaN,s1", "non_numeric_price"),
    24: ("1,10,5,click,1577923200,-inf,s1", "non_numeric_price"),
    25: ("1,10,5,click,1577923200000,1,s1", "time_in_future"),  # milliseconds read as seconds
    26: ("1,10,5,click,4102444800,1,s1", "time_in_future"),  # 2100-01-01
    27: ("1,10,5,click,86400,1,s1", "time_out_of_range"),  # 1970-01-02: before the default not_before
    28: ("3,13,5,cl", "truncated_last_line"),
}
MAPPING = {
    "name": "drops",
    "path": "drops/{date}.csv",
    "format": {"delimiter": ",", "header": True},
    "columns": {
        "user_id": "uid",
        "item_id": "iid",
        "category_id": "cat",
        "behavior": "act",
        "event_time": "ts",
        "price": "price",
        "source_session_id": "sess",
    },
    "time": {"unit": "s"},
    "behaviors": {"click": "view", "buy": "purchase"},
    "float_ids": ["user_id", "item_id"],
}


@pytest.fixture
def drop_root(tmp_path) -> Path:
    root = tmp_path / "raw"
    (root / "drops").mkdir(parents=True)
    (root / "sources").mkdir()
    (root / "sources" / "drops.yaml").write_text(yaml.safe_dump(MAPPING))
    # CRLF endings and no newline after the cut-off last line, as in the REES46 export.
    body = "\r\n".join(line for line, _ in LINES.values())
    (root / "drops" / f"{DAY}.csv").write_bytes(body.encode())
    return root


def test_every_refused_row_is_quarantined_with_reason_and_line(spark, make_settings, drop_root):
    settings = make_settings({"ingest": {"max_bad_fraction": 1.0}}, data_root=drop_root)
    result = ingest_source(spark, settings, "drops", date.fromisoformat(DAY))

    q = spark.read.parquet(str(settings.paths.quarantine_root / "source=drops" / f"run_date={DAY}"))
    got = {r["line_number"]: (r["reason"], r["raw_line"]) for r in q.collect()}
    expected = {
        n: (reason, line)
        for n, (line, reason) in LINES.items()
        if reason not in (None, "header", "duplicate")
    }
    assert got == expected
    assert result.rows_in == len(LINES) - 1
    assert result.duplicates == 1
    assert result.rows_out == 3
    assert result.quarantined_total == len(expected)

    events = spark.read.parquet(str(events_dir(settings.paths.warehouse_root)))
    rows = sorted(
        (r["user_id"], r["item_id"], r["behavior"], r["price"], r["source_session_id"])
        for r in events.collect()
    )
    assert rows == [
        ("1", "10", "view", 1.5, "s1"),
        ("2", "12", "view", 3.0, "s,2"),
        ("266079", "11", "purchase", 2.0, "s1"),
    ]


def test_over_threshold_fails_loudly_and_publishes_no_events(spark, make_settings, drop_root):
    settings = make_settings(data_root=drop_root)  # default max_bad_fraction 1%
    with pytest.raises(BadInputError) as exc:
        ingest_source(spark, settings, "drops", date.fromisoformat(DAY))
    msg = str(exc.value)
    refused = sum(reason not in (None, "header", "duplicate") for _, reason in LINES.values())
    assert f"{refused} of {len(LINES) - 1} rows" in msg and "no events published" in msg
    assert "unknown_behavior=1" in msg and "bad_id=7" in msg
    assert not events_dir(settings.paths.warehouse_root).exists() or not any(
        events_dir(settings.paths.warehouse_root).rglob("*.parquet")
    )
    # The quarantine is still there to inspect.
    assert (settings.paths.quarantine_root / "source=drops" / f"run_date={DAY}").is_dir()


def test_rees46_crlf_duplicates_and_cut_off_last_line(spark, make_settings):
    settings = make_settings()
    r = ingest_source(spark, settings, "rees46", date(2019, 10, 1))
    assert r.rows_in == 17_435  # 17,434 full rows + the cut-off one
    assert r.quarantined == {"truncated_last_line": 1}
    assert r.rows_out + r.duplicates == 17_434
    assert (r.users, r.items) == (4_504, 6_493)
    q = spark.read.parquet(str(settings.paths.quarantine_root)).first()
    assert q["line_number"] == 17_436 and q["raw_line"].endswith(",52040330")
    ev = spark.read.parquet(str(events_dir(settings.paths.warehouse_root)))
    assert ev.filter("source_session_id is null or price is null").count() == 0
    assert not ev.filter("source_session_id like '%\\r%'").count()


def _partition_files(root: Path) -> dict[str, Path]:
    """Partition dir -> its one data file (file names carry a per-write UUID, so key by partition)."""
    files: dict[str, Path] = {}
    for p in sorted(root.rglob("*.parquet")):
        key = str(p.parent.relative_to(root))
        assert key not in files, f"more than one file in {key}"
        files[key] = p
    return files


def test_rerun_writes_identical_partitions(spark, make_settings):
    settings = make_settings()
    run_date = date(2017, 12, 3)
    ingest_source(spark, settings, "taobao", run_date)
    root = events_dir(settings.paths.warehouse_root)
    first = {k: p.read_bytes() for k, p in _partition_files(root).items()}
    ingest_source(spark, settings, "taobao", run_date)
    second = {k: p.read_bytes() for k, p in _partition_files(root).items()}
    assert first.keys() == second.keys() and len(first) == 10
    assert first == second


def test_killed_publish_leaves_previous_partitions_readable(spark, make_settings, monkeypatch):
    settings = make_settings()
    run_date = date(2017, 12, 3)
    ingest_source(spark, settings, "taobao", run_date)
    root = events_dir(settings.paths.warehouse_root)
    before = _partition_files(root)
    snapshot = {k: p.read_bytes() for k, p in before.items()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("task killed while publishing")

    monkeypatch.setattr(atomic, "publish_partitions", killed)
    with pytest.raises(KeyboardInterrupt):
        ingest_source(spark, settings, "taobao", run_date)
    after = _partition_files(root)
    assert after.keys() == before.keys()
    assert all(filecmp.cmp(before[k], after[k], shallow=False) for k in after)
    assert {k: p.read_bytes() for k, p in after.items()} == snapshot
    assert spark.read.parquet(str(root)).count() == 10_000
    assert not any((root / atomic.STAGING).iterdir())
