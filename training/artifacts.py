"""Trained models on disk: ``warehouse/models/ds=<ds>/<model>/``, published atomically.

- ``state_dict.pt``: the state dict of the model that is tested and served (the refit on every
  training event; loaded with ``weights_only=True``);
- ``validation_fit.pt``: the state dict of the validation fit (trained on the bundle's validation
  view; its validation metrics chose the refit's epochs), absent for bundles with one view;
- ``model.json``: name, resolved config, seed, the training bundle it was trained on (path relative
  to the warehouse, plus the bundle's checksums), device, epochs and timings of both fits;
- ``history.json``: per-epoch losses and validation metric of the validation fit;
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

from infra import atomic
from infra.tables import TRAINING
from training.data import TrainingData, load_training_data
from training.models import build_model
from training.models.base import Recommender
from training.trainer import FitResult, pick_device

STATE = "state_dict.pt"
VALIDATION_STATE = "validation_fit.pt"
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
    fit: FitResult,
    data: TrainingData,
    seed: int,
    run_id: str | None = None,
) -> Path:
    """Publish a trained model (both fits) atomically; returns its directory."""
    first, model = fit.validation, fit.final.model
    target = model_dir(warehouse_root, ds, model.config["name"])
    meta = {
        "name": model.config["name"],
        "class": model.name,
        "config": model.config,
        "seed": seed,
        "ds": ds,
        "training_dir": str(training_dir(warehouse_root, ds).relative_to(warehouse_root)),
        "training_checksums": data.manifest.checksums,
        "split_protocol": data.manifest.protocol,
        "eval_mask": data.manifest.eval_mask,
        "refitted": fit.refitted,
        "n_users": data.n_users,
        "n_items": data.n_items,
        "device": first.device,
        "best_epoch": first.best_epoch,
        "best_validation_metric": first.best_metric,
        "epochs_run": first.epochs_run,
        "refit_epochs": fit.final.epochs_run if fit.refitted else None,
        "seconds": first.seconds + (fit.final.seconds if fit.refitted else 0.0),
        "seconds_per_epoch": first.seconds_per_epoch,
        "peak_rss_mb": max(first.peak_rss_mb, fit.final.peak_rss_mb),
        "peak_cuda_mb": max(
            (r.peak_cuda_mb for r in (first, fit.final) if r.peak_cuda_mb is not None), default=None
        ),
        "mlflow_run_id": run_id,
    }

    def state(m: Recommender) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in m.state_dict().items()}

    with atomic.staged_dir(target) as staged:
        staged.mkdir(parents=True)
        torch.save(state(model), staged / STATE)
        if fit.refitted:
            torch.save(state(first.model), staged / VALIDATION_STATE)
        (staged / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        (staged / HISTORY).write_text(json.dumps(first.history, indent=2) + "\n")
    return target


def load_trained(
    warehouse_root: Path,
    ds: str,
    name: str,
    device: str | None = None,
    data: TrainingData | None = None,
    view: str = "full",
) -> tuple[Recommender, TrainingData, dict[str, Any]]:
    """Rebuild a trained model from its config and tables, then load its weights: the refit for
    ``view="full"``, the validation fit for ``view="validation"``."""
    target = model_dir(warehouse_root, ds, name)
    if not (target / META).is_file():
        raise FileNotFoundError(
            f"no trained model {name!r} for {ds} at {target}: run `funnelrec train` first"
        )
    meta = read_meta(target)
    data = data or load_training_data(Path(warehouse_root) / meta["training_dir"], view)
    return load_model_dir(target, data, device), data, meta


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / META).read_text())


def load_model_dir(path: Path, data: TrainingData, device: str | None = None) -> Recommender:
    """The model saved in ``path`` (state dict + model.json), rebuilt over ``data``: the validation
    fit when ``data`` is a bundle's validation view and the model has one, else the refit.

    Refuses tables whose checksums differ from the ones the model was trained on.
    """
    meta = read_meta(path)
    if data.manifest.checksums != meta.get("training_checksums", {}):
        raise RuntimeError(
            f"training tables at {data.root} differ from the ones {meta['name']} was trained on "
            "(checksums differ); retrain"
        )
    model = build_model(meta["name"], data, meta["config"])
    dev = pick_device(device)
    file = Path(path) / (VALIDATION_STATE if data.view == "validation" and data.refit else STATE)
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: retrain {meta['name']}")
    state = torch.load(file, map_location=dev, weights_only=True)
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
