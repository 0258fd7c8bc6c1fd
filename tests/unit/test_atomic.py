import pytest

from infra import atomic


def _write(d, text):
    d.mkdir(parents=True, exist_ok=True)
    (d / "part-0.parquet").write_text(text)


def test_staged_dir_swaps_in_new_content_and_removes_staging(tmp_path):
    target = tmp_path / "t" / "ds=2015-09-18"
    _write(target, "old")
    with atomic.staged_dir(target) as staged:
        _write(staged, "new")
        assert (target / "part-0.parquet").read_text() == "old"  # readers still see the old one
    assert (target / "part-0.parquet").read_text() == "new"
    assert not any((target.parent / atomic.STAGING).iterdir())


def test_failure_inside_staged_dir_leaves_previous_content(tmp_path):
    target = tmp_path / "t" / "ds=2015-09-18"
    _write(target, "old")
    with pytest.raises(RuntimeError), atomic.staged_dir(target) as staged:
        _write(staged, "half")
        raise RuntimeError("killed mid-write")
    assert (target / "part-0.parquet").read_text() == "old"
    assert not any((target.parent / atomic.STAGING).iterdir())


def test_exchange_is_atomic_on_linux(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "A")
    _write(b, "B")
    assert atomic._exchange(a, b)
    assert (a / "part-0.parquet").read_text() == "B"
    assert (b / "part-0.parquet").read_text() == "A"


def test_recover_restores_target_after_an_interrupted_fallback_swap(tmp_path):
    target = tmp_path / "t" / "ds=1"
    _write(target, "old")
    trash = atomic._trash_path(target)
    trash.parent.mkdir(parents=True)
    target.rename(trash)  # the fallback was killed between its two renames
    atomic.recover(target)
    assert (target / "part-0.parquet").read_text() == "old"


def test_publish_partitions_replaces_only_staged_partitions(tmp_path):
    root = tmp_path / "events" / "source=x"
    _write(root / "event_date=2015-01-01", "keep")
    _write(root / "event_date=2015-01-02", "old")
    staged = tmp_path / "staged"
    _write(staged / "event_date=2015-01-02", "new")
    _write(staged / "event_date=2015-01-03", "added")
    published = atomic.publish_partitions(staged, root)
    assert [p.name for p in published] == ["event_date=2015-01-02", "event_date=2015-01-03"]
    assert (root / "event_date=2015-01-01" / "part-0.parquet").read_text() == "keep"
    assert (root / "event_date=2015-01-02" / "part-0.parquet").read_text() == "new"
    assert (root / "event_date=2015-01-03" / "part-0.parquet").read_text() == "added"


def test_outcomes_count_a_hit_exactly_when_the_item_was_bought_in_the_n_days_after_its_date(tmp_path):
    """Hand-checked: N = 7; recommendations of 2020-01-10 against purchases on other days, by other
    users, of other sources and of other behaviours."""
    from datetime import UTC, datetime

    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    from infra.tables import EVENTS, SCORES
    from jobs.publish import outcome_views

    scores, events = tmp_path / "scores", tmp_path / "events"
    recs = [  # user, rank, item, item type, expert
        ("a", 1, "i1", "visited", "visited"),
        ("a", 2, "i2", "unvisited", "unvisited"),
        ("a", 3, "i3", "unvisited", "fallback"),
        ("b", 1, "i1", "visited", "visited"),
    ]
    rows = [
        {"user_id": u, "rank": r, "item_id": i, "score": 1.0 / r, "item_type": t, "expert": e,
         "expert_weights": "{}", "model": "member", "model_name": "m", "model_version": 3, "run_id": "x",
         "trained_ds": "2020-01-09"}
        for u, r, i, t, e in recs
    ]  # fmt: skip
    (scores / "ds=2020-01-10").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, SCORES.arrow_schema()), scores / "ds=2020-01-10" / "p.parquet")
    happened = [  # source, day, user, item, behaviour
        ("shop", 10, "a", "i1", "purchase"),  # the date itself: in the context the list came from
        ("shop", 11, "a", "i2", "purchase"),  # day 1: a hit
        ("shop", 12, "a", "i3", "view"),  # not a purchase
        ("shop", 12, "c", "i1", "purchase"),  # another user
        ("other", 12, "a", "i3", "purchase"),  # a source this pipeline does not serve
        ("shop", 17, "b", "i1", "purchase"),  # day 7: a hit
        ("shop", 18, "a", "i3", "purchase"),  # day 8: too late
    ]
    for source, day, user, item, behavior in happened:
        folder = events / f"source={source}" / f"event_date=2020-01-{day:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        row = {"event_time": datetime(2020, 1, day, 12, tzinfo=UTC), "user_id": user, "item_id": item}
        row.update(behavior=behavior, category_id=None, brand=None, price=None, source_session_id=None)
        pq.write_table(
            pa.Table.from_pylist([row], EVENTS.arrow_schema()), folder / f"{user}-{item}-{behavior}.parquet"
        )
    con = duckdb.connect()
    outcome_views(con, scores, events, ["shop"], days=7)
    got = con.sql(
        "select user_id, item_id, bought, days_observed, complete from fct_recommendation_outcomes order by all"
    ).fetchall()
    assert got == [
        ("a", "i1", False, 7, True),
        ("a", "i2", True, 7, True),
        ("a", "i3", False, 7, True),
        ("b", "i1", True, 7, True),
    ]
    agg = dict(
        con.sql(
            "select slice, (users, hit_rate_at_10, hit_rate_at_k) from agg_recommendation_outcomes"
        ).fetchall()
    )
    assert agg["all"] == (2, 1.0, 1.0)
    assert agg["item_type=visited"] == (2, 0.5, 0.5) and agg["item_type=unvisited"] == (1, 1.0, 1.0)
    assert agg["expert=fallback"] == (1, 0.0, 0.0) and agg["expert=unvisited"] == (1, 1.0, 1.0)
    # One night short of N days after the date: not complete yet.
    outcome_views(con := duckdb.connect(), scores, events, ["shop"], days=9)
    assert con.sql("select distinct days_observed, complete from fct_recommendation_outcomes").fetchall() == [
        (8, False)
    ]


def test_scratch_folders_of_killed_processes_of_this_host_are_removed_and_no_other(tmp_path):
    import os
    import subprocess
    import sys

    from infra.atomic import _HOST, STAGING, scratch_dir

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    staging = tmp_path / STAGING
    orphan = staging / f"ds=2026-01-01.{_HOST}.{dead_pid}.0badf00d"
    running = staging / f"ds=2026-01-01.{_HOST}.{os.getpid()}.0badf00d"
    elsewhere = staging / f"ds=2026-01-01.other_host.{dead_pid}.0badf00d"
    previous = staging / "ds=2026-01-01.previous"  # a fallback swap's trash: recover() owns it
    for p in (orphan, running, elsewhere, previous):
        (p / "part").mkdir(parents=True)
    with scratch_dir(tmp_path, "ds=2026-01-02") as scratch:
        scratch.mkdir()
        assert sorted(p.name for p in staging.iterdir()) == sorted(
            [running.name, elsewhere.name, previous.name, scratch.name]
        )
