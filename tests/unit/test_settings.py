from pathlib import Path

import pytest
from pydantic import ValidationError

from infra.settings import load_settings


def test_defaults_load_and_resolve_relative_paths_against_cwd(tmp_path):
    s = load_settings(environ={}, cwd=tmp_path)
    assert s.paths.warehouse_root == tmp_path / "warehouse"
    assert s.paths.data_root == tmp_path / "jobs" / "sample_data"
    assert s.spark.conf["spark.sql.session.timeZone"] == "UTC"
    assert s.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'warehouse' / 'mlflow' / 'mlflow.db'}"


def test_user_yaml_then_env_override_defaults(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("spark:\n  master: spark://example:7077\nsplit:\n  observation_days: 7\n")
    env = {"FUNNELREC__SPLIT__OBSERVATION_DAYS": "14", "FUNNELREC__PIPELINE__SOURCES": "[a, b]"}
    s = load_settings(cfg, environ=env, cwd=tmp_path)
    assert s.spark.master == "spark://example:7077"  # from the YAML
    assert s.split.observation_days == 14  # env beats YAML, and is typed
    assert s.pipeline.sources == ["a", "b"]
    assert s.split.protocol == "global_time"  # untouched default


def test_config_env_variable_names_the_user_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("paths:\n  warehouse_root: /srv/wh\n")
    s = load_settings(environ={"FUNNELREC_CONFIG": str(cfg)}, cwd=tmp_path)
    assert s.paths.warehouse_root == Path("/srv/wh")


@pytest.mark.parametrize(
    "yaml_text",
    [
        "split:\n  protocl: global_time\n",  # typo'd key
        "split:\n  protocol: random\n",  # not a protocol
        "ingest:\n  max_bad_fraction: 2\n",  # not a fraction
    ],
)
def test_invalid_settings_are_refused(tmp_path, yaml_text):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ValidationError):
        load_settings(cfg, environ={}, cwd=tmp_path)


def test_missing_user_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="settings file not found"):
        load_settings(tmp_path / "nope.yaml", environ={})
