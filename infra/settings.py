"""One typed settings object for every stage.

Layers, last wins (pydantic-settings sources): ``infra/defaults.yaml`` (commented, shipped with the
code) < a user YAML (``--config`` or ``$FUNNELREC_CONFIG``) < environment variables
``FUNNELREC__SECTION__KEY`` < the ``overrides`` mappings of ``load_settings``. Sections merge key by
key across layers. A key no section knows, in any layer, is refused with ``UnknownSettingError``,
which names the key, where it came from and the nearest valid key. Relative paths are resolved
against the working directory at load time.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from infra.keys import UnknownSettingError, unknown_key_hint, unknown_keys

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")
#: The checkout's promotion policy; `mlflow/` is configuration only (never an importable package).
DEFAULT_PROMOTION_POLICY = Path(__file__).resolve().parents[1] / "mlflow" / "promotion.yaml"
ENV_PREFIX = "FUNNELREC__"
ENV_DELIMITER = "__"
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
    future_margin_minutes: int = Field(ge=0)


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
    pandas_max_rows: int = Field(ge=0)


class TrainingSettings(_Section):
    models: list[str]
    max_epochs: int | None = Field(default=None, gt=0)
    #: model name -> keys of its ``training/models/<name>.yaml`` to override (checked against the
    #: model's own schema when it is trained).
    model_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    device: str | None = None
    eval_batch_size: int = Field(gt=0)
    processes: int = Field(default=1, gt=0)


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


class RankingSettings(_Section):
    model: str | None = None
    registered_model: str
    candidates: int = Field(ge=2)


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
    gpu_queue: str | None = None
    promote_pool: str
    api_port: int = Field(gt=0, lt=65536)
    failure_webhook: str | None = None
    spark_submit_conn_id: str | None = None


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]
    format: Literal["logfmt", "json"]


class Settings(BaseSettings):
    """Every section; ``load_settings`` builds it (``Settings()`` alone layers the same sources over
    ``os.environ``, its keyword arguments on top, but resolves no paths)."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        # _Environment lower-cases the names itself, all but a Spark conf key's.
        case_sensitive=True,
    )

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
    ranking: RankingSettings
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

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env files or secrets directories: the layers are the ones the module docstring lists.
        return (init_settings, *_layers(settings_cls, os.environ, None, ()))


def _holds(data: Any, loc: Sequence[str | int]) -> bool:
    for key in loc:
        if not isinstance(data, Mapping) or key not in data:
            return False
        data = data[key]
    return True


# -- layers -------------------------------------------------------------------------------------
class _YamlFile(YamlConfigSettingsSource):
    """One settings YAML. Unlike the library's source, a missing file is an error, not an empty layer."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path):
        if not path.is_file():
            raise FileNotFoundError(f"settings file not found: {path}")
        self.origin = str(path)
        super().__init__(settings_cls, yaml_file=path)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        data = super()._read_file(file_path)
        if not isinstance(data, dict):
            raise ValueError(f"settings file {file_path} must hold a mapping at the top level")
        return data

    def origin_of(self, loc: Sequence[str | int]) -> str | None:
        return self.origin if _holds(self.yaml_data, loc) else None


class _Overrides(InitSettingsSource):
    """A nested mapping given in code (tests, DAG tasks)."""

    def __init__(self, settings_cls: type[BaseSettings], values: Mapping[str, Any]):
        super().__init__(settings_cls, init_kwargs=dict(values))

    def origin_of(self, loc: Sequence[str | int]) -> str | None:
        return "overrides" if _holds(self.init_kwargs, loc) else None


class _Environment(EnvSettingsSource):
    """``FUNNELREC__SECTION__KEY`` variables of ``environ``, values parsed as YAML scalars or lists
    (``"30"``, ``"true"`` and ``"[a, b]"`` get their types), except for a string or path setting,
    which takes the text as given (``null`` still clears an optional one). Names are matched in lower case, except a
    Spark conf key, which keeps its case and may hold dots
    (``FUNNELREC__SPARK__CONF__spark.sql.shuffle.partitions=4``)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]):
        self._environ = environ
        self._names: dict[tuple[str, ...], str] = {}  # keys -> the variable that set them
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, Any]:
        out: dict[str, Any] = {}
        for name, raw in self._environ.items():
            if not name.startswith(ENV_PREFIX):
                continue
            parts = [p for p in name[len(ENV_PREFIX) :].split(ENV_DELIMITER) if p]
            if not parts:
                continue
            keys = [p.lower() for p in parts]
            if keys[:2] == ["spark", "conf"] and len(keys) > 2:
                keys[-1] = parts[-1]
            if self._takes_text(keys) and raw.strip() not in ("null", "~", ""):
                value = raw  # a cron ("*/5 * * * *"), a date-like name: the text as given
            else:
                try:
                    value = yaml.safe_load(raw)
                except yaml.YAMLError:
                    raise ValueError(f"{name}={raw!r} is not a YAML value") from None
            self._names[tuple(keys)] = name
            out[ENV_PREFIX + ENV_DELIMITER.join(keys)] = value
        return out

    def _takes_text(self, keys: list[str]) -> bool:
        """Whether the setting at ``keys`` is a string or a path (or None), so that its variable is
        taken as text rather than parsed as YAML."""
        model: Any = self.settings_cls
        for key in keys:
            fields = getattr(model, "model_fields", None)
            if not fields or key not in fields:
                return False
            model = fields[key].annotation
        union = typing.get_origin(model) in (typing.Union, types.UnionType)
        return set(typing.get_args(model) if union else (model,)) <= {str, Path, type(None)}

    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        # Every value was parsed as YAML when it was read; the library's JSON decoding would refuse
        # "[a, b]" and any value already parsed.
        return value

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        # The library reads the variables of known sections only; a variable naming no section is
        # kept, so that validation refuses it like any other unknown key.
        for keys in self._names:
            if keys[0] not in self.settings_cls.model_fields:
                data.setdefault(keys[0], {})
        return data

    def origin_of(self, loc: Sequence[str | int]) -> str | None:
        loc = tuple(loc)
        return next((name for keys, name in self._names.items() if keys[: len(loc)] == loc), None)


def _layers(
    settings_cls: type[BaseSettings],
    environ: Mapping[str, str],
    config: str | os.PathLike | None,
    overrides: Sequence[Mapping[str, Any]],
) -> tuple[PydanticBaseSettingsSource, ...]:
    """The sources, first wins (pydantic-settings' order)."""
    config = config or environ.get(CONFIG_ENV)
    return (
        *(_Overrides(settings_cls, o) for o in reversed(overrides)),
        _Environment(settings_cls, environ),
        *([_YamlFile(settings_cls, Path(config))] if config else []),
        _YamlFile(settings_cls, DEFAULTS_FILE),
    )


def _refuse_unknown(error: ValidationError, sources: Sequence[PydanticBaseSettingsSource]) -> None:
    """Raise ``UnknownSettingError`` for the unknown keys of ``error``, if it holds any."""
    lines = []
    for loc in unknown_keys(error):
        origin = next((o for s in sources if (o := s.origin_of(loc)) is not None), None)
        where = f" (from {origin})" if origin else ""
        path = ".".join(map(str, loc))
        lines.append(f"unknown setting {path}{where}; {unknown_key_hint(Settings, loc)}")
    if lines:
        raise UnknownSettingError("\n".join(lines)) from None


def load_settings(
    config: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    overrides: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
) -> Settings:
    """Build the settings from defaults, an optional user YAML, the environment and ``overrides``.

    Args:
        config: path of a user YAML; when None, ``$FUNNELREC_CONFIG`` is used if set.
        environ: environment to read ``FUNNELREC_CONFIG`` and ``FUNNELREC__...`` from
            (``os.environ`` when None; nothing else is read from the process environment).
        cwd: directory that relative paths are resolved against (the working directory when None).
        overrides: a nested mapping applied last, or several applied in order (tests and DAG tasks
            use them instead of files).

    Raises:
        UnknownSettingError: a key that no section knows, in any layer.
        FileNotFoundError: the user YAML does not exist.
        pydantic.ValidationError: a value of the wrong type or out of range.
    """
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    if overrides is None:
        overrides = ()
    elif isinstance(overrides, Mapping):
        overrides = (overrides,)
    sources = _layers(Settings, environ, config, overrides)
    try:
        settings = Settings(_build_sources=(sources, {}))
    except ValidationError as exc:
        _refuse_unknown(exc, sources)
        raise

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
