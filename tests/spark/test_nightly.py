"""The nightly command end to end on a bundled slice, and a failed gate stopping everything after it."""

from __future__ import annotations

import json

import pytest

from infra.cli import main
from infra.tables import SESSIONIZED, TRAINING, events_dir
from tests.conftest import TAOBAO_DATE as DATE
from tests.conftest import taobao_config

pytestmark = pytest.mark.spark


def test_nightly_runs_every_built_stage(taobao_nightly):
    config, code, out = taobao_nightly
    assert code == 0, out
    wh = config.parent / "wh"
    assert "popularity on test" in out and "| standard |" in out
    for table in ("events", "sessions", "training"):
        assert json.loads((wh / "validation" / table / f"ds={DATE}" / "result.json").read_text())["success"]
    for model in ("popularity", "als_multi"):
        metrics = json.loads((wh / "models" / f"ds={DATE}" / model / "metrics.json").read_text())
        assert metrics["test"]["standard"]["users"] > 0
    assert "version 2: promoted" in out  # als_multi, registered after popularity
    assert json.loads((wh / "validation" / "scores" / f"ds={DATE}" / "result.json").read_text())["success"]
    assert any((wh / "scores" / f"ds={DATE}").glob("*.parquet"))
    assert (wh / "reports" / f"ds={DATE}" / "report.html").is_file()


def test_failed_gate_stops_everything_downstream(tmp_path, capsys):
    cfg = taobao_config(tmp_path, validation={"events_max_rows": 100})  # the slice has 10,000 events
    assert main(["--config", str(cfg), "nightly", "--date", DATE]) == 1
    err = capsys.readouterr().err
    assert "validation of events" in err and "expect_table_row_count_to_be_between" in err
    wh = tmp_path / "wh"
    assert any(events_dir(wh).rglob("*.parquet"))  # ingest ran before the gate
    assert not SESSIONIZED.dir(wh, DATE).exists()
    assert not TRAINING.dir(wh, DATE).exists()
    assert not (wh / "models").exists()
