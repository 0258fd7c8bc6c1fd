"""Trained models on disk: ``warehouse/models/ds=<ds>/<model>/``, published atomically.

The directory's files and the ``model.json`` and ``metrics.json`` documents are declared in the
catalogue (``infra.tables``: ``MODEL_FILES``, ``ModelMeta``, ``ModelMetrics``). A model is rebuilt
from its config and the training tables (graphs, visited sets), then its state dict is loaded, so
nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from infra import atomic
from infra.tables import (
    MODEL_HISTORY,
    MODEL_META,
    MODEL_STATE,
    MODEL_VALIDATION_STATE,
    TRAINING,
    File,
    ModelMeta,
    model_dir,
    read_meta,
    write_meta,
)
from training.data import TrainingData, load_training_data
from training.models import build_model
from training.models.base import Recommender
from training.trainer import FitResult, pick_device


def training_dir(warehouse_root: Path, ds: str) -> Path:
    return TRAINING.dir(warehouse_root, ds)


def save_trained(
    warehouse_root: Path,
    ds: str,
    fit: FitResult,
    data: TrainingData,
    seed: int,
    run_id: str | None = None,
    documents: dict[File, dict] | None = None,
) -> Path:
    """Publish a trained model (both fits) atomically, with any other JSON ``documents`` of its
    folder (``infra.tables.MODEL_FILES``); returns its directory."""
    first, model = fit.validation, fit.final.model
    target = model_dir(warehouse_root, ds, model.config["name"])
    meta = ModelMeta(
        name=model.config["name"],
        model_class=model.name,
        config=model.config,
        seed=seed,
        ds=ds,
        training_dir=str(training_dir(warehouse_root, ds).relative_to(warehouse_root)),
        training_checksums=data.manifest.checksums,
        split_protocol=data.manifest.protocol,
        eval_mask=data.manifest.eval_mask,
        refitted=fit.refitted,
        n_users=data.n_users,
        n_items=data.n_items,
        device=first.device,
        best_epoch=first.best_epoch,
        best_validation_metric=first.best_metric,
        epochs_run=first.epochs_run,
        refit_epochs=fit.final.epochs_run if fit.refitted else None,
        seconds=first.seconds + (fit.final.seconds if fit.refitted else 0.0),
        seconds_per_epoch=first.seconds_per_epoch,
        peak_rss_mb=max(first.peak_rss_mb, fit.final.peak_rss_mb),
        peak_cuda_mb=max(
            (r.peak_cuda_mb for r in (first, fit.final) if r.peak_cuda_mb is not None), default=None
        ),
        mlflow_run_id=run_id,
    )

    def state(m: Recommender) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in m.state_dict().items()}

    with atomic.staged_dir(target) as staged:
        staged.mkdir(parents=True)
        torch.save(state(model), staged / MODEL_STATE.name)
        if fit.refitted:
            torch.save(state(first.model), staged / MODEL_VALIDATION_STATE.name)
        write_meta(staged, meta)
        (staged / MODEL_HISTORY.name).write_text(json.dumps(first.history, indent=2) + "\n")
        for file, doc in (documents or {}).items():
            (staged / file.name).write_text(json.dumps(doc, indent=2, default=float) + "\n")
    return target


def load_trained(
    warehouse_root: Path,
    ds: str,
    name: str,
    device: str | None = None,
    data: TrainingData | None = None,
    view: str = "full",
) -> tuple[Recommender, TrainingData, ModelMeta]:
    """Rebuild a trained model from its config and tables, then load its weights: the refit for
    ``view="full"``, the validation fit for ``view="validation"``."""
    target = model_dir(warehouse_root, ds, name)
    if not (target / MODEL_META.name).is_file():
        raise FileNotFoundError(
            f"no trained model {name!r} for {ds} at {target}: run `funnelrec train` first"
        )
    meta = read_meta(target)
    data = data or load_training_data(Path(warehouse_root) / meta.training_dir, view)
    return load_model_dir(target, data, device), data, meta


def load_model_dir(path: Path, data: TrainingData, device: str | None = None) -> Recommender:
    """The model saved in ``path`` (state dict + model.json), rebuilt over ``data``: the validation
    fit when ``data`` is a bundle's validation view and the model has one, else the refit.

    Refuses tables whose checksums differ from the ones the model was trained on.
    """
    meta = read_meta(path)
    if data.manifest.checksums != meta.training_checksums:
        raise RuntimeError(
            f"training tables at {data.root} differ from the ones {meta.name} was trained on "
            "(checksums differ); retrain"
        )
    model = build_model(meta.name, data, meta.config)
    dev = pick_device(device)
    state = MODEL_VALIDATION_STATE if data.view == "validation" and data.refit else MODEL_STATE
    file = Path(path) / state.name
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: retrain {meta.name}")
    model.load_state_dict(torch.load(file, map_location=dev, weights_only=True))
    model.to(dev)
    model.eval()
    return model
