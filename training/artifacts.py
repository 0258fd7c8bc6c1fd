"""Trained models on disk: ``warehouse/models/ds=<ds>/<model>/``, published atomically.

- ``state_dict.pt``: the model's state dict (loaded with ``weights_only=True``);
- ``model.json``: name, resolved config, seed, the training bundle it was trained on (path relative
  to the warehouse, plus the bundle's checksums), device, epochs and timings;
- ``history.json``: per-epoch losses and validation metric;
- ``metrics.json``: written by ``evaluate``: metrics per split, setting and K.

A model is rebuilt from its config and the training tables (graphs, visited sets), then its state
dict is loaded, so nothing is pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from infra import publish
from infra.tables import TRAINING
from training.data import TrainingData, load_training_data
from training.models import build_model
from training.models.base import Recommender
from training.trainer import TrainResult, pick_device

STATE = "state_dict.pt"
META = "model.json"
HISTORY = "history.json"
METRICS = "metrics.json"


def model_dir(warehouse_root: Path, ds: str, name: str) -> Path:
    return Path(warehouse_root) / "models" / f"ds={ds}" / name


def training_dir(warehouse_root: Path, ds: str) -> Path:
    return TRAINING.dir(warehouse_root, ds)


def save_trained(
    warehouse_root: Path,
    ds: str,
    result: TrainResult,
    data: TrainingData,
    seed: int,
    run_id: str | None = None,
) -> Path:
    """Publish a trained model atomically; returns its directory."""
    model = result.model
    target = model_dir(warehouse_root, ds, model.config["name"])
    meta = {
        "name": model.config["name"],
        "class": model.name,
        "config": model.config,
        "seed": seed,
        "ds": ds,
        "training_dir": str(training_dir(warehouse_root, ds).relative_to(warehouse_root)),
        "training_checksums": data.manifest.get("checksums", {}),
        "split_protocol": data.manifest.get("protocol"),
        "eval_mask": data.manifest.get("eval_mask"),
        "n_users": data.n_users,
        "n_items": data.n_items,
        "device": result.device,
        "best_epoch": result.best_epoch,
        "best_validation_metric": result.best_metric,
        "epochs_run": result.epochs_run,
        "seconds": result.seconds,
        "seconds_per_epoch": result.seconds_per_epoch,
        "peak_rss_mb": result.peak_rss_mb,
        "peak_cuda_mb": result.peak_cuda_mb,
        "mlflow_run_id": run_id,
    }
    with publish.staged_dir(target) as staged:
        staged.mkdir(parents=True)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, staged / STATE)
        (staged / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        (staged / HISTORY).write_text(json.dumps(result.history, indent=2) + "\n")
    return target


def load_trained(
    warehouse_root: Path, ds: str, name: str, device: str | None = None, data: TrainingData | None = None
) -> tuple[Recommender, TrainingData, dict[str, Any]]:
    """Rebuild a trained model from its config and tables, then load its weights."""
    target = model_dir(warehouse_root, ds, name)
    if not (target / META).is_file():
        raise FileNotFoundError(
            f"no trained model {name!r} for {ds} at {target}: run `funnelrec train` first"
        )
    meta = read_meta(target)
    data = data or load_training_data(Path(warehouse_root) / meta["training_dir"])
    return load_model_dir(target, data, device), data, meta


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / META).read_text())


def load_model_dir(path: Path, data: TrainingData, device: str | None = None) -> Recommender:
    """The model saved in ``path`` (state dict + model.json), rebuilt over ``data``.

    Refuses tables whose checksums differ from the ones the model was trained on.
    """
    meta = read_meta(path)
    if data.manifest.get("checksums", {}) != meta.get("training_checksums", {}):
        raise RuntimeError(
            f"training tables at {data.root} differ from the ones {meta['name']} was trained on "
            "(checksums differ); retrain"
        )
    model = build_model(meta["name"], data, meta["config"])
    dev = pick_device(device)
    state = torch.load(Path(path) / STATE, map_location=dev, weights_only=True)
    model.load_state_dict(state)
    model.to(dev)
    model.eval()
    return model


def write_metrics(warehouse_root: Path, ds: str, name: str, metrics: dict[str, Any]) -> Path:
    path = model_dir(warehouse_root, ds, name) / METRICS
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, path)
    return path
