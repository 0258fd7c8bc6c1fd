"""Hostile input (issue #25): a corpus of broken files built here. Each gives quarantine rows with
reasons or one clear error line, never a traceback, and every good row of a file still lands."""

from __future__ import annotations

import gzip
import os
import random
from datetime import date
from pathlib import Path

import pytest
import yaml

from infra.tables import events_dir
from jobs import ingest
from jobs.ingest import BadInputError, ingest_source

pytestmark = pytest.mark.spark

DAY = date(2020, 1, 2)
T = 1577923200  # 2020-01-02 00:00 UTC
COLUMNS = ["uid", "iid", "cat", "act", "ts", "price"]


def _mapping(header: bool) -> dict:
    m = {
        "name": "hostile",
        "path": "hostile/*",
        "format": {"delimiter": ",", "header": header},
        "columns": {
            "user_id": "uid",
            "item_id": "iid",
            "category_id": "cat",
            "behavior": "act",
            "event_time": "ts",
            "price": "price",
        },
        "time": {"unit": "s"},
        "behaviors": {"click": "view", "buy": "purchase"},
    }
    if not header:
        m["format"]["columns"] = COLUMNS
    return m


def _good(user: str, n: int = 2) -> list[str]:
    """``n`` good rows of ``user``: distinct items, times on DAY."""
    return [f"{user},{100 + i},5,click,{T + 20 * i},1.5" for i in range(n)]


def _text(rows: list[str], end: str = "\n") -> str:
    return end.join(rows) + end


def _source(tmp_path: Path, header: bool, files: dict[str, bytes]) -> Path:
    root = tmp_path / "raw"
    (root / "hostile").mkdir(parents=True)
    (root / "sources").mkdir()
    (root / "sources" / "hostile.yaml").write_text(yaml.safe_dump(_mapping(header)))
    for name, body in files.items():
        (root / "hostile" / name).write_bytes(body)
    return root


def _quarantine(spark, settings) -> dict[str, set[str]]:
    """File name -> the reasons its rows were quarantined for."""
    q = spark.read.parquet(str(settings.paths.quarantine_root / "source=hostile" / f"run_date={DAY}"))
    out: dict[str, set[str]] = {}
    for r in q.collect():
        out.setdefault(r["file"].rsplit("/", 1)[-1], set()).add(r["reason"])
    return out


def _users(spark, settings) -> set[str]:
    events = spark.read.parquet(str(events_dir(settings.paths.warehouse_root)))
    return {r["user_id"] for r in events.select("user_id").distinct().collect()}


def test_a_corpus_of_broken_files_is_quarantined_and_every_good_row_lands(spark, make_settings, tmp_path):
    rng = random.Random(7)
    whole = _text(_good("g1", 3000))
    files = {
        "empty.csv": b"",
        "blank.csv": b"\n",
        "garbage.bin": bytes(rng.randrange(256) for _ in range(4000)),
        "bom.csv": ("\ufeff" + _text(_good("b1"))).encode(),
        "latin1.csv": _text([*_good("l1"), f"l2,caf\u00e9,5,click,{T},1"]).encode("latin-1"),
        "crlf.csv": _text(_good("c1"), end="\r\n").encode(),
        "quoted.csv": _text([*_good("q1"), f'q2,"a,b",5,click,{T},1', f'q3,"x\ny",5,click,{T},1']).encode(),
        "long.csv": _text([*_good("o1"), f"o2,{'x' * 1_000_000},5,click,{T},1"]).encode(),
        "numbers.csv": _text(
            [
                *_good("n1"),
                f"-3,10,5,click,{T},1",  # negative id
                f"99999999999999999999,10,5,click,{T},1",  # beyond a 64-bit integer
                f"nan,10,5,click,{T},1",
                f"inf,10,5,click,{T},1",
                f"n2,10,5,click,{T},NaN",
                f"n3,10,5,click,{T},Infinity",
            ]
        ).encode(),
        "times.csv": _text(
            [
                *_good("t1"),
                f"t2,10,5,click,{T * 1000},1",  # milliseconds read as seconds: the year 51,970
                "t3,10,5,click,4102444800,1",  # 2100-01-01
                "t4,10,5,click,-2208988800,1",  # 1900-01-01
                f"t5,10,5,click,{T + 86400},1",  # after the run date, before now: left for later
            ]
        ).encode(),
        "rows.csv": _text(
            [
                *_good("r1"),
                *_good("r1"),  # duplicated
                f"r2,10,5,refund,{T},1",  # unknown behaviour
                f"r3,10,5,click,{T}",  # a column missing
                f"r4,10,5,click,{T},1,extra",  # a column too many
            ]
        ).encode(),
        "cut.csv.gz": gzip.compress(whole.encode())[:-300],  # a copy cut off mid-stream
    }
    settings = make_settings({"ingest": {"max_bad_fraction": 1.0}}, data_root=_source(tmp_path, False, files))
    result = ingest_source(spark, settings, "hostile", DAY)

    assert result.empty_files == [str(tmp_path / "raw" / "hostile" / "empty.csv")]
    users = _users(spark, settings)
    assert {"b1", "l1", "c1", "q1", "o1", "n1", "t1", "r1"} <= users and "g1" in users
    assert not {"l2", "q2", "o2", "n2", "n3", "t2", "t3", "t4", "t5", "r2", "r3", "r4"} & users
    q = _quarantine(spark, settings)
    assert q["latin1.csv"] == {"bad_id"}  # caf\ufffd: not an id
    # A quoted delimiter parses ("a,b" is one field, but not an id); a quoted newline splits the
    # record in two lines of the wrong field count.
    assert q["quoted.csv"] == {"bad_id", "wrong_field_count"}
    assert q["long.csv"] == {"bad_id"}
    assert q["numbers.csv"] == {"bad_id", "non_numeric_price"}
    assert q["times.csv"] == {"time_in_future", "time_out_of_range"}
    assert q["rows.csv"] == {"unknown_behavior", "wrong_field_count"}
    assert q["cut.csv.gz"] >= {"truncated_file"}
    assert "wrong_field_count" in q["garbage.bin"] and "blank.csv" in q
    assert "bom.csv" not in q and "crlf.csv" not in q
    assert result.deferred == 1 and result.duplicates == 2
    # The cut-off gzip: every complete line before the cut landed, once.
    events = spark.read.parquet(str(events_dir(settings.paths.warehouse_root)))
    landed = events.filter("user_id = 'g1'").select("item_id").distinct().count()
    assert 0 < landed < 3000 and landed >= whole[: len(whole) // 2].count("\n") // 2


def test_headers_with_a_bom_or_another_encoding_are_read_and_a_garbage_one_is_one_clear_error(
    spark, make_settings, tmp_path
):
    head = ",".join(COLUMNS)
    files = {
        "bom.csv": ("\ufeff" + _text([head, *_good("b1")])).encode(),
        "latin1.csv": _text([head, *_good("l1"), f"l2,caf\u00e9,5,click,{T},1"]).encode("latin-1"),
        "empty.csv": b"",
        "header_only.csv": _text([head]).encode(),
    }
    settings = make_settings({"ingest": {"max_bad_fraction": 1.0}}, data_root=_source(tmp_path, True, files))
    ingest_source(spark, settings, "hostile", DAY)
    assert _users(spark, settings) == {"b1", "l1"}

    (tmp_path / "raw" / "hostile" / "garbage.csv").write_bytes(os.urandom(3000))
    with pytest.raises(BadInputError) as exc:
        ingest_source(spark, settings, "hostile", DAY)
    message = str(exc.value)
    assert "files disagree on their header" in message and "garbage.csv" in message
    assert len(message) < 2000 and "\n" not in message


def test_a_file_that_changes_while_it_is_read_publishes_nothing(spark, make_settings, tmp_path, monkeypatch):
    settings = make_settings(data_root=_source(tmp_path, False, {"grow.csv": _text(_good("a1")).encode()}))
    path = tmp_path / "raw" / "hostile" / "grow.csv"
    read_lines = ingest._read_lines

    def read_while_written(*args, **kwargs):
        lines = read_lines(*args, **kwargs)
        with open(path, "a") as fh:  # the writer appends after the file was listed
            fh.write(_text(_good("a2")))
        return lines

    monkeypatch.setattr(ingest, "_read_lines", read_while_written)
    with pytest.raises(BadInputError, match=r"grow\.csv changed while it was read; nothing published"):
        ingest_source(spark, settings, "hostile", DAY)
    assert not events_dir(settings.paths.warehouse_root).exists() or not any(
        events_dir(settings.paths.warehouse_root).rglob("*.parquet")
    )
