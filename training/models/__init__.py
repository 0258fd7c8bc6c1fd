"""Model registry: models are found by name.

``<name>.yaml`` in this folder holds a model's commented defaults; its optional ``class`` key names
the module that implements it (default: the name itself), so one implementation can back several
named configurations (``als`` and ``als_multi``). A file with ``extends: <other>`` holds only what
differs from ``<other>.yaml`` (``member_funnel``), and inherits its class. The class's ``Config``
types the keys; ``merged_config`` refuses one it does not know, naming the nearest valid key.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from infra.keys import UnknownSettingError, unknown_key_hint, unknown_keys
from training.data import TrainingData
from training.models.base import Recommender

MODELS_DIR = Path(__file__).parent
REPO = MODELS_DIR.parents[1]


def available_models() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))


def default_config(name: str) -> dict[str, Any]:
    path = MODELS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise KeyError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    config = yaml.safe_load(path.read_text()) or {}
    base = config.pop("extends", None)
    if base is None:
        return config
    merged = default_config(base)
    merged.setdefault("class", base)
    return _merge(merged, config)


def _merge(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``overrides`` applied (one level deep for dict values such as ``train``)."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def model_class(name: str) -> type[Recommender]:
    module = default_config(name).get("class", name)
    mod = importlib.import_module(f"training.models.{module}")
    for obj in vars(mod).values():
        if isinstance(obj, type) and issubclass(obj, Recommender) and obj.name == module:
            return obj
    raise KeyError(f"training.models.{module} defines no Recommender named {module!r}")


def merged_config(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults of ``name`` with ``overrides`` applied (one level deep for the ``train`` section),
    checked against the model's ``Config``; returned as the plain dict that is logged and saved.

    Raises:
        UnknownSettingError: a key the model does not know, in its YAML or in ``overrides``.
        pydantic.ValidationError: a value of the wrong type or out of range.
    """
    overrides = overrides or {}
    config = _merge(default_config(name), overrides)
    config["name"] = name
    schema = model_class(name).Config
    try:
        schema.model_validate(config)
    except ValidationError as exc:
        lines = [
            f"unknown setting {'.'.join(map(str, loc))} of model {name} "
            f"(from {'overrides' if _holds(overrides, loc) else _file_holding(name, loc)}); "
            f"{unknown_key_hint(schema, loc)}"
            for loc in unknown_keys(exc)
        ]
        if lines:
            raise UnknownSettingError("\n".join(lines)) from None
        raise
    return config


def _holds(data: Any, loc: tuple) -> bool:
    for key in loc:
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return True


def _file_holding(name: str, loc: tuple) -> str:
    """The YAML of ``name`` or of a model it extends that sets ``loc``."""
    while True:
        path = MODELS_DIR / f"{name}.yaml"
        raw = yaml.safe_load(path.read_text()) or {}
        if _holds(raw, loc) or "extends" not in raw:
            return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
        name = raw["extends"]


def build_model(name: str, data: TrainingData, overrides: dict[str, Any] | None = None) -> Recommender:
    config = merged_config(name, overrides)
    return model_class(name)(data, config)


def fitted_closed_form(name: str, data: TrainingData) -> Recommender:
    """``name`` with its defaults, fitted on ``data``: only for closed-form models (``fit()`` in
    seconds), such as the promotion floor."""
    model = build_model(name, data)
    if model.trainable:
        raise ValueError(f"{name} is gradient-trained; only a closed-form model is fitted here")
    model.fit()
    return model
