from datetime import date

import pytest
import yaml
from pydantic import ValidationError

from jobs.sources import SourceMapping, load_mapping, shipped_mappings

BASE = {
    "name": "x",
    "path": "x/*.csv",
    "columns": {"user_id": "u", "item_id": "i", "behavior": "b", "event_time": "t"},
    "time": {"unit": "s"},
    "behaviors": {"click": "view"},
}


def test_every_shipped_mapping_loads():
    names = shipped_mappings()
    assert {"taobao", "rees46", "retailrocket", "retailrocket_mb"} <= set(names)
    for name in names:
        assert load_mapping(name).name == name


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"columns": {"user_id": "u", "item_id": "i", "behavior": "b"}}, "must map"),
        ({"behaviors": {"click": "clicked"}}, "unknown canonical behaviours"),
        ({"time": {"unit": "s", "format": "yyyy"}}, "exactly one"),
        ({"format": {"header": False}}, "format.columns is required"),
        ({"columns": {**BASE["columns"], "colour": "c"}}, "unknown canonical fields"),
    ],
)
def test_bad_mappings_are_refused_with_the_reason(patch, message):
    with pytest.raises(ValidationError, match=message):
        SourceMapping.model_validate({**BASE, **patch})


def test_user_mapping_folder_takes_precedence(tmp_path):
    (tmp_path / "sources").mkdir()
    (tmp_path / "sources" / "taobao.yaml").write_text(yaml.safe_dump({**BASE, "name": "taobao"}))
    assert load_mapping("taobao", tmp_path).behaviors == {"click": "view"}


def test_daily_paths_expand_the_run_date(tmp_path):
    (tmp_path / "drops").mkdir()
    (tmp_path / "drops" / "2015-09-18.csv").write_text("")
    (tmp_path / "drops" / "2015-09-17.csv").write_text("")
    m = SourceMapping.model_validate({**BASE, "path": "drops/{date}.csv"})
    assert m.is_daily
    assert [p.name for p in m.files(tmp_path, date(2015, 9, 18))] == ["2015-09-18.csv"]
