"""The nightly command end to end on a bundled slice, and a failed gate stopping everything after it."""

from __future__ import annotations

import json

import pytest
import yaml

from infra.cli import main
from infra.tables import SESSIONIZED, TRAINING, events_dir
from tests.conftest import REPO, SAMPLE_DATA

pytestmark = pytest.mark.spark
DATE = "2017-12-03"


def _config(tmp_path, **extra) -> str:
    policy = yaml.safe_load((REPO / "mlflow" / "promotion.yaml").read_text())
    policy["min_users"] = 3  # the slice is sparse: its 3-day validation window keeps 4 users
    (tmp_path / "promotion.yaml").write_text(yaml.safe_dump(policy))
    cfg = {
        "paths": {
            "data_root": str(SAMPLE_DATA),
            "warehouse_root": str(tmp_path / "wh"),
            "quarantine_root": str(tmp_path / "wh" / "quarantine"),
        },
        "pipeline": {"sources": ["taobao"]},
        "sessionize": {"history_days": 10},
        "split": {"observation_days": 10, "test_days": 2, "validation_days": 3},
        "training": {"models": ["popularity", "als_multi"]},
        "scoring": {"active_days": 10},
        "mlflow": {"promotion_policy": str(tmp_path / "promotion.yaml")},
        **extra,
    }
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_nightly_runs_every_built_stage(tmp_path, capsys):
    assert main(["--config", _config(tmp_path), "nightly", "--date", DATE]) == 0
    wh = tmp_path / "wh"
    out = capsys.readouterr().out
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
    cfg = _config(tmp_path, validation={"events_max_rows": 100})  # the slice has 10,000 events
    assert main(["--config", cfg, "nightly", "--date", DATE]) == 1
    err = capsys.readouterr().err
    assert "validation of events" in err and "expect_table_row_count_to_be_between" in err
    wh = tmp_path / "wh"
    assert any(events_dir(wh).rglob("*.parquet"))  # ingest ran before the gate
    assert not SESSIONIZED.dir(wh, DATE).exists()
    assert not TRAINING.dir(wh, DATE).exists()
    assert not (wh / "models").exists()
