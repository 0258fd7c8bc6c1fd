"""One typed settings object for every stage.

Layers, last wins: ``infra/defaults.yaml`` (commented, shipped with the code) < a user YAML
(``--config`` or ``$FUNNELREC_CONFIG``) < environment variables ``FUNNELREC__SECTION__KEY``.
Relative paths are resolved against the working directory at load time.
"""

from __future__ import annotations

import copy
import os
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")
#: The checkout's promotion policy; `mlflow/` is configuration only (never an importable package).
DEFAULT_PROMOTION_POLICY = Path(__file__).resolve().parents[1] / "mlflow" / "promotion.yaml"
ENV_PREFIX = "FUNNELREC__"
CONFIG_ENV = "FUNNELREC_CONFIG"


class _Section(BaseModel):
    # Unknown keys are typos; refusing them beats silently ignoring a setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Section):
    data_root: Path
    warehouse_root: Path
    quarantine_root: Path


class Pipeline(_Section):
    sources: list[str]
    demo_date: str


class SparkSettings(_Section):
    master: str
    app_name: str
    conf: dict[str, str] = Field(default_factory=dict)

    @field_validator("conf", mode="before")
    @classmethod
    def _stringify(cls, v: Any) -> Any:
        return {str(k): str(val) for k, val in (v or {}).items()}


class Ingest(_Section):
    max_bad_fraction: float = Field(ge=0.0, le=1.0)


class Sessionize(_Section):
    gap_minutes: int = Field(gt=0)
    use_source_session: bool
    history_days: int = Field(gt=0)


class Split(_Section):
    protocol: Literal["global_time", "leave_last_purchase"]
    observation_days: int = Field(gt=0)
    test_days: int = Field(gt=0)
    validation_days: int = Field(ge=0)
    val_user_fraction: float = Field(ge=0.0, le=1.0)
    min_users: int = Field(ge=1)
    min_items: int = Field(ge=1)


class ValidationSettings(_Section):
    data_docs_dir: Path | None = None
    events_min_rows: int = Field(ge=0)
    events_max_rows: int = Field(gt=0)
    scores_max_fallback_share: float = Field(ge=0, le=1)
    scores_min_overlap: float = Field(ge=0, le=1)
    scores_min_coverage_ratio: float = Field(ge=0)


class TrainingSettings(_Section):
    models: list[str]
    max_epochs: int | None = Field(default=None, gt=0)
    device: str | None = None
    eval_batch_size: int = Field(gt=0)


class Seeds(_Section):
    split: int
    train: int


class MlflowSettings(_Section):
    tracking_uri: str | None = None
    registry_uri: str | None = None
    experiment: str
    registered_model: str
    promotion_policy: Path | None = None
    max_retries: int = Field(ge=0, le=10)
    backoff_seconds: int = Field(ge=0)
    request_timeout_seconds: int = Field(gt=0)
    lock_timeout_seconds: float = Field(gt=0)


class ScoringSettings(_Section):
    k: int = Field(gt=0)
    active_days: int = Field(gt=0)
    catalogue_days: int = Field(gt=0)
    outcome_days: int = Field(gt=0)
    history_length: int = Field(ge=0)
    batch_size: int = Field(gt=0)
    path: Literal["local", "spark"]


class RetentionSettings(_Section):
    days: int = Field(gt=0)
    champions: int = Field(gt=0)


class AirflowSettings(_Section):
    home: Path | None = None
    schedule: str
    scoring_schedule: str | None = None
    start_date: date
    end_date: date | None = None
    retries: int = Field(ge=0)
    retry_delay_minutes: float = Field(gt=0)
    max_retry_delay_minutes: float = Field(gt=0)
    task_timeout_minutes: float = Field(gt=0)
    gpu_pool: str
    gpu_pool_slots: int = Field(gt=0)
    promote_pool: str
    failure_webhook: str | None = None
    spark_submit_conn_id: str | None = None


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]
    format: Literal["logfmt", "json"]


class Settings(_Section):
    paths: Paths
    pipeline: Pipeline
    spark: SparkSettings
    ingest: Ingest
    sessionize: Sessionize
    split: Split
    validation: ValidationSettings
    training: TrainingSettings
    seeds: Seeds
    mlflow: MlflowSettings
    scoring: ScoringSettings
    retention: RetentionSettings
    airflow: AirflowSettings
    logging: LoggingSettings

    @property
    def mlflow_tracking_uri(self) -> str:
        """The configured tracking URI, else the embedded SQLite store under the warehouse."""
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return f"sqlite:///{self.paths.warehouse_root / 'mlflow' / 'mlflow.db'}"

    @property
    def mlflow_registry_uri(self) -> str:
        return self.mlflow.registry_uri or self.mlflow_tracking_uri


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_overrides(environ: dict[str, str]) -> dict:
    """FUNNELREC__SPARK__MASTER=x -> {"spark": {"master": "x"}}; values parsed as YAML scalars."""
    out: dict = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__") if k]
        if not keys:
            continue
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        # Spark conf keys contain dots and keep their case, e.g. FUNNELREC__SPARK__CONF__spark.sql.shuffle.partitions
        last = name[len(ENV_PREFIX) :].split("__")[-1]
        node[last if keys[:2] == ["spark", "conf"] else keys[-1]] = yaml.safe_load(raw)
    return out


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"settings file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"settings file {path} must hold a mapping at the top level")
    return data


def load_settings(
    config: str | os.PathLike | None = None,
    environ: dict[str, str] | None = None,
    cwd: Path | None = None,
    overrides: dict | None = None,
) -> Settings:
    """Build the settings from defaults, an optional user YAML and the environment.

    Args:
        config: path of a user YAML; when None, ``$FUNNELREC_CONFIG`` is used if set.
        environ: environment to read overrides from (``os.environ`` when None).
        cwd: directory that relative paths are resolved against (the working directory when None).
        overrides: a nested mapping applied last (tests and DAG tasks use it instead of files).
    """
    environ = dict(os.environ if environ is None else environ)
    cwd = Path.cwd() if cwd is None else cwd
    merged = _read_yaml(DEFAULTS_FILE)
    config = config or environ.get(CONFIG_ENV)
    if config:
        merged = _deep_merge(merged, _read_yaml(Path(config)))
    merged = _deep_merge(merged, _env_overrides(environ))
    merged = _deep_merge(merged, overrides or {})
    settings = Settings.model_validate(merged)

    def resolve(p: Path) -> Path:
        return (p if p.is_absolute() else (cwd / p)).resolve()

    paths = Paths(**{name: resolve(p) for name, p in settings.paths.model_dump().items()})
    docs = settings.validation.data_docs_dir
    docs = resolve(docs) if docs else paths.warehouse_root / "gx" / "data_docs"
    validation = settings.validation.model_copy(update={"data_docs_dir": docs})
    policy = settings.mlflow.promotion_policy
    policy = resolve(policy) if policy else DEFAULT_PROMOTION_POLICY
    ml = settings.mlflow.model_copy(update={"promotion_policy": policy})
    home = settings.airflow.home
    af = settings.airflow.model_copy(
        update={"home": resolve(home) if home else paths.warehouse_root / "airflow"}
    )
    return settings.model_copy(update={"paths": paths, "validation": validation, "mlflow": ml, "airflow": af})
