"""Model registry: models are found by name.

``<name>.yaml`` in this folder holds a model's commented defaults; its optional ``class`` key names
the module that implements it (default: the name itself), so one implementation can back several
named configurations (``als`` and ``als_multi``). A file with ``extends: <other>`` holds only what
differs from ``<other>.yaml`` (``member_funnel``), and inherits its class.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

from training.data import TrainingData
from training.models.base import Recommender

MODELS_DIR = Path(__file__).parent


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
    """Defaults of ``name`` with ``overrides`` applied (one level deep for the ``train`` section)."""
    config = _merge(default_config(name), overrides or {})
    config["name"] = name
    return config


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
