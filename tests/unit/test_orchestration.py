"""The data date of a DAG run, from each kind of trigger (asset-triggered runs have no logical date)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from types import SimpleNamespace

import pytest

from infra.orchestration import data_date, data_dates


def ctx(**kw):
    base = {"dag_run": SimpleNamespace(conf={}, run_after=None)}
    base.update(kw)
    return base


def at(*a):
    return datetime(*a, tzinfo=UTC)


def test_conf_wins_over_everything():
    c = ctx(dag_run=SimpleNamespace(conf={"ds": "2015-09-18"}), data_interval_start=at(2020, 1, 1))
    assert data_date(c) == date(2015, 9, 18)


def test_asset_triggered_run_takes_the_date_the_promote_task_carried():
    old = SimpleNamespace(extra={"ds": "2015-09-16"}, timestamp=at(2015, 9, 17, 2))
    new = SimpleNamespace(extra={"ds": "2015-09-17"}, timestamp=at(2015, 9, 18, 2))
    c = ctx(triggering_asset_events={"funnelrec_champion": [new, old]})
    assert data_date(c) == date(2015, 9, 17)


def test_batched_asset_events_give_every_date_oldest_first():
    """A backfill promoted three dates before one scoring run started: all three are scored."""
    events = [
        SimpleNamespace(extra={"ds": d}, timestamp=at(2015, 9, 20, h))
        for h, d in ((3, "2015-09-17"), (1, "2015-09-15"), (2, "2015-09-16"), (4, "2015-09-16"))
    ]
    c = ctx(triggering_asset_events={"funnelrec_champion": events})
    assert data_dates(c) == [date(2015, 9, 15), date(2015, 9, 16), date(2015, 9, 17)]
    assert data_date(c) == date(2015, 9, 16)  # the latest event's date, for single-date callers
    by_hand = ctx(dag_run=SimpleNamespace(conf={"dates": ["2015-09-18", "2015-09-12"]}))
    assert data_dates(by_hand) == [date(2015, 9, 12), date(2015, 9, 18)]
    assert data_dates(ctx(data_interval_start=at(2015, 9, 18), data_interval_end=at(2015, 9, 19))) == [
        date(2015, 9, 18)
    ]


def test_cron_data_interval_gives_the_day_it_starts():
    c = ctx(data_interval_start=at(2015, 9, 18, 2), data_interval_end=at(2015, 9, 19, 2))
    assert data_date(c) == date(2015, 9, 18)


def test_a_trigger_timetable_run_scores_the_previous_day():
    c = ctx(data_interval_start=at(2015, 9, 19, 3, 30), data_interval_end=at(2015, 9, 19, 3, 30))
    c["logical_date"] = at(2015, 9, 19, 3, 30)
    assert data_date(c) == date(2015, 9, 18)


def test_no_date_anywhere_is_a_clear_error():
    with pytest.raises(ValueError, match="data date"):
        data_date(ctx())
