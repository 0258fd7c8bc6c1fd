from pathlib import Path

import pytest
from pydantic import ValidationError

from infra.settings import UnknownSettingError, load_settings


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
    "yaml_text, error",
    [
        ("split:\n  protocl: global_time\n", UnknownSettingError),  # typo'd key
        ("split:\n  protocol: random\n", ValidationError),  # not a protocol
        ("ingest:\n  max_bad_fraction: 2\n", ValidationError),  # not a fraction
    ],
)
def test_invalid_settings_are_refused(tmp_path, yaml_text, error):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(error):
        load_settings(cfg, environ={}, cwd=tmp_path)


def test_missing_user_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="settings file not found"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_misspelt_key_in_user_yaml_names_it_its_file_and_the_nearest_key(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("split:\n  observation_dayz: 7\n")
    with pytest.raises(UnknownSettingError) as err:
        load_settings(cfg, environ={}, cwd=tmp_path)
    assert str(err.value) == (
        f"unknown setting split.observation_dayz (from {cfg}); did you mean split.observation_days?"
    )
    assert isinstance(err.value, ValueError)  # the CLI's one-line error


def test_misspelt_env_variable_names_it_and_the_nearest_key(tmp_path):
    env = {"FUNNELREC__SPLIT__OBSERVATION_DAYZ": "7"}
    with pytest.raises(UnknownSettingError) as err:
        load_settings(environ=env, cwd=tmp_path)
    assert str(err.value) == (
        "unknown setting split.observation_dayz (from FUNNELREC__SPLIT__OBSERVATION_DAYZ); "
        "did you mean split.observation_days?"
    )


def test_misspelt_section_in_env_is_refused_not_ignored(tmp_path):
    with pytest.raises(UnknownSettingError) as err:
        load_settings(environ={"FUNNELREC__SCORNG__K": "10"}, cwd=tmp_path)
    assert str(err.value) == "unknown setting scorng (from FUNNELREC__SCORNG__K); did you mean scoring?"


@pytest.mark.parametrize(
    "layer",
    ["yaml", "env", "overrides"],
)
def test_misspelt_nested_key_names_the_nearest(tmp_path, layer):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("scoring:\n  kk: 10\n" if layer == "yaml" else "{}\n")
    env = {"FUNNELREC__SCORING__KK": "10"} if layer == "env" else {}
    overrides = {"scoring": {"kk": 10}} if layer == "overrides" else None
    with pytest.raises(UnknownSettingError, match=r"unknown setting scoring\.kk .*did you mean scoring\.k\?"):
        load_settings(cfg, environ=env, cwd=tmp_path, overrides=overrides)


def test_key_in_the_wrong_section_points_to_where_it_lives(tmp_path):
    with pytest.raises(
        UnknownSettingError, match=r"split\.history_days .*did you mean sessionize\.history_days\?"
    ):
        load_settings(environ={}, cwd=tmp_path, overrides={"split": {"history_days": 3}})


def test_env_values_are_typed_as_yaml_and_spark_conf_keys_keep_their_case(tmp_path):
    env = {
        "FUNNELREC__SESSIONIZE__GAP_MINUTES": "45",
        "FUNNELREC__SESSIONIZE__USE_SOURCE_SESSION": "false",
        "FUNNELREC__INGEST__MAX_BAD_FRACTION": "0.5",
        "FUNNELREC__TRAINING__MAX_EPOCHS": "3",
        "FUNNELREC__TRAINING__MODELS": "[als, member]",
        "FUNNELREC__MLFLOW__TRACKING_URI": "null",
        "FUNNELREC__SPARK__CONF__spark.sql.shuffle.partitions": "4",
        "FUNNELREC__SPARK__CONF__spark.sql.autoBroadcastJoinThreshold": "10m",
        "FUNNELREC__SPARK__CONF__spark.custom.AnyKey": "x",  # spark.conf is free-form
        "FUNNELREC_CONFIG_UNRELATED": "ignored",
        "OTHER__SPLIT__X": "ignored",
    }
    s = load_settings(environ=env, cwd=tmp_path)
    assert s.sessionize.gap_minutes == 45 and s.sessionize.use_source_session is False
    assert s.ingest.max_bad_fraction == 0.5
    assert s.training.max_epochs == 3 and s.training.models == ["als", "member"]
    assert s.mlflow.tracking_uri is None
    conf = s.spark.conf
    assert conf["spark.sql.shuffle.partitions"] == "4"
    assert conf["spark.sql.autoBroadcastJoinThreshold"] == "10m"
    assert conf["spark.custom.AnyKey"] == "x"
    assert conf["spark.sql.session.timeZone"] == "UTC"  # the other defaults of spark.conf are kept


def test_layers_merge_key_by_key_last_wins(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("split:\n  observation_days: 7\n  test_days: 2\nscoring:\n  k: 20\n")
    env = {"FUNNELREC__SPLIT__OBSERVATION_DAYS": "14", "FUNNELREC__SCORING__K": "30"}
    s = load_settings(
        cfg,
        environ=env,
        cwd=tmp_path,
        overrides=[{"scoring": {"k": 40, "batch_size": 8}}, {"scoring": {"batch_size": 16}}],
    )
    assert s.split.test_days == 2  # YAML over defaults
    assert s.split.observation_days == 14  # env over YAML
    assert s.scoring.k == 40  # overrides over env
    assert s.scoring.batch_size == 16  # a later override over an earlier one
    assert s.split.validation_days == 1 and s.scoring.active_days == 30  # the sections' other defaults


def test_an_injected_environ_is_the_only_one_read(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("split:\n  observation_days: 3\n")
    monkeypatch.setenv("FUNNELREC__SPLIT__OBSERVATION_DAYS", "99")
    monkeypatch.setenv("FUNNELREC_CONFIG", str(cfg))
    assert load_settings(environ={}, cwd=tmp_path).split.observation_days == 30
    assert load_settings(cwd=tmp_path).split.observation_days == 99


def test_a_string_setting_from_the_environment_is_the_text_as_given():
    """A cron, a date-like string or ``~`` in a variable of a string or path setting is not parsed as
    YAML (which would refuse the cron and turn the others into a date and None)."""
    env = {
        "FUNNELREC__AIRFLOW__SCHEDULE": "*/5 * * * *",
        "FUNNELREC__PIPELINE__DEMO_DATE": "2015-09-18",
        "FUNNELREC__MLFLOW__EXPERIMENT": "2024",
        "FUNNELREC__SCORING__K": "20",
    }
    s = load_settings(environ=env)
    assert s.airflow.schedule == "*/5 * * * *"
    assert s.pipeline.demo_date == "2015-09-18" and s.mlflow.experiment == "2024"
    assert s.scoring.k == 20
