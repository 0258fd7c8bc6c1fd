"""The work of the `train` and `evaluate` stages (declared in ``training/pipeline.py``), I/O at the
edges.

``evaluate`` writes the model's ``metrics.json`` and, for a tracked run, its ``model_runs`` row
(``record_model_run``), which ``register`` completes with the registered version
(``record_registration``, no MLflow call): what ``publish`` and the report read about runs, so they
never ask MLflow.
"""

from __future__ import annotations

import copy
import json
import os
from datetime import UTC, datetime
from typing import Any

from infra import atomic
from infra.logs import stage
from infra.settings import Settings
from infra.tables import (
    MODEL_RUNS,
    ModelMeta,
    ModelMetrics,
    checkpoint_dir,
    document_json,
    floor_metrics_path,
    model_dir,
    model_run_dir,
    read_meta,
    read_metrics,
    run_metric_column,
    run_metrics,
    write_metrics,
)
from training import tracking
from training.artifacts import load_trained, save_trained, training_dir
from training.data import TrainingData, load_training_data
from training.evaluate import evaluate_scores
from training.models import fitted_closed_form, merged_config, model_class
from training.trainer import fit_and_refit


def load_views(root) -> tuple[TrainingData, TrainingData]:
    """``(validation view, full view)`` of a bundle; one object twice when it has one view."""
    full = load_training_data(root, "full")
    return (load_training_data(root, "validation") if full.refit else full), full


def training_overrides(settings: Settings, name: str, epochs: int | None = None) -> dict[str, Any]:
    """What ``name`` is trained with over its YAML: ``training.model_overrides[name]``, its epochs
    capped by ``epochs`` (the command's) or else ``training.max_epochs``."""
    cap = epochs or settings.training.max_epochs
    overrides = copy.deepcopy(settings.training.model_overrides.get(name, {}))
    if cap:
        train = overrides.setdefault("train", {})
        train["epochs"] = min(cap, train.get("epochs", cap))
    return overrides


def run_train(
    settings: Settings, ds: str, name: str, epochs: int | None = None, processes: int | None = None
) -> dict[str, Any]:
    """Train ``name`` on ``training/ds=<ds>`` (validation fit, then refit) and publish it to
    ``models/ds=<ds>/<name>``; in ``processes`` data-parallel processes (default
    ``training.processes``) when above 1 and the model is gradient-trained."""
    if model_class(name).ranker:
        raise ValueError(
            f"{name} is a second stage: it re-ranks a retriever's candidates, so it is trained by "
            f"`funnelrec rank` (set ranking.model: {name}), not listed in training.models"
        )
    wh = settings.paths.warehouse_root
    val_data, data = load_views(training_dir(wh, ds))
    overrides = training_overrides(settings, name, epochs)
    processes = processes or settings.training.processes
    config = {**merged_config(name, overrides), "seed": settings.seeds.train}
    family = model_class(name).name
    with (
        stage("train", ds=ds, model=name) as counts,
        tracking.train_run(settings, ds, name, config, data.manifest, family) as run,
    ):
        if processes > 1 and model_class(name).trainable:
            from training.distributed import fit_distributed

            fit = fit_distributed(settings, training_dir(wh, ds), name, val_data, data, overrides, processes)
        else:  # a closed-form fit (popularity, implicit's) has nothing to share out
            fit = fit_and_refit(
                name,
                val_data,
                data,
                settings.seeds.train,
                overrides,
                checkpoint_dir=checkpoint_dir(wh, ds, name),
                device=settings.training.device,
            )
        result = fit.validation
        path = save_trained(wh, ds, fit, data, settings.seeds.train, run_id=run.info.run_id)
        tracking.log_training(run.info.run_id, settings, ds, result.history, document_json(read_meta(path)))
        counts["run_id"] = run.info.run_id
        counts.update(
            device=result.device,
            epochs=result.epochs_run,
            best_epoch=result.best_epoch,
            best_val=result.best_metric if result.best_metric is not None else "none",
            refit_epochs=fit.final.epochs_run if fit.refitted else "none",
            s_per_epoch=result.seconds_per_epoch,
            peak_rss_mb=result.peak_rss_mb,
            processes=processes if model_class(name).trainable else 1,
        )
    return {
        "path": str(path),
        "device": result.device,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "refit_epochs": fit.final.epochs_run if fit.refitted else None,
        "seconds_per_epoch": result.seconds_per_epoch,
        "peak_rss_mb": result.peak_rss_mb,
        "run_id": run.info.run_id,
    }


def run_evaluate(
    settings: Settings, ds: str, name: str, splits: tuple[str, ...] = ("validation", "test")
) -> dict:
    """Evaluate a trained model on every held-out split (validation: its validation fit on the
    validation view; test: its refit on every training event); write ``metrics.json`` beside it."""
    wh = settings.paths.warehouse_root
    views = dict(zip(("validation", "test"), load_views(training_dir(wh, ds)), strict=True))
    out: dict[str, Any] = {}
    meta: ModelMeta | None = None
    with stage("evaluate", ds=ds, model=name) as counts:
        for split in splits:
            data = views[split]
            if split in data.heldout:
                model, _, meta = load_trained(wh, ds, name, settings.training.device, data=data)
                out[split] = evaluate_scores(
                    model.context_scorer(data),
                    data,
                    split,
                    batch_size=settings.training.eval_batch_size,
                    device=model.device,
                )
                counts[f"{split}_users"] = out[split]["standard"]["users"]
                counts[f"{split}_NDCG@10"] = out[split]["standard"]["NDCG@10"]
        eval_mask = meta.eval_mask if meta is not None else None
        write_metrics(model_dir(wh, ds, name), ModelMetrics(model=name, ds=ds, eval_mask=eval_mask, **out))
        if meta is not None and meta.mlflow_run_id:
            floor_name = _floor_model(settings)
            floor = (
                _floor_metrics(settings, ds, floor_name, views, splits)
                if floor_name and floor_name != name
                else None
            )
            tracking.connect(settings)
            tracking.log_evaluation(meta.mlflow_run_id, out, floor, floor_name)
            record_model_run(settings, ds, name)
            counts["run_id"] = meta.mlflow_run_id
    return out


def record_model_run(settings: Settings, ds: str, name: str) -> dict[str, Any]:
    """Write the ``model_runs`` row of the tracked run of ``models/ds=<ds>/<name>`` from its
    ``model.json``, ``metrics.json`` and MLflow run (``evaluate``); a registration already recorded
    for the run is kept."""
    wh = settings.paths.warehouse_root
    path = model_dir(wh, ds, name)
    meta, metrics = read_meta(path), read_metrics(path).splits()
    client = tracking.connect(settings)
    run = tracking.call(settings, "read run", lambda: client.get_run(meta.mlflow_run_id))
    experiment = tracking.call(
        settings, "read experiment", lambda: client.get_experiment(run.info.experiment_id)
    )
    target = model_run_dir(wh, ds, meta.mlflow_run_id)
    before = _read_run_row(target)
    row: dict[str, Any] = {
        "run_id": meta.mlflow_run_id,
        "model": name,
        "model_family": meta.model_class,
        "data_ds": ds,
        "status": run.info.status,
        "started_at": datetime.fromtimestamp(run.info.start_time / 1000, UTC),
        **{
            run_metric_column(split, setting, metric): metrics.get(split, {}).get(setting, {}).get(metric)
            for split, setting, metric in run_metrics()
        },
        "experiment": experiment.name,
        "evaluated_at": datetime.now(UTC),
        **{c: before.get(c) for c in ("registered_model", "registered_version", "registered_at")},
    }
    _write_run_row(target, row)
    return row


def record_registration(settings: Settings, ds: str, name: str, version: int) -> dict[str, Any]:
    """Add the version ``register`` gave the run of ``models/ds=<ds>/<name>`` to its ``model_runs``
    row (written by ``evaluate``; written now if it is missing)."""
    wh = settings.paths.warehouse_root
    target = model_run_dir(wh, ds, read_meta(model_dir(wh, ds, name)).mlflow_run_id)
    row = _read_run_row(target) or record_model_run(settings, ds, name)
    row.update(registered_model=settings.mlflow.registered_model, registered_version=version)
    row["registered_at"] = datetime.now(UTC)
    _write_run_row(target, row)
    return row


def _read_run_row(target) -> dict[str, Any]:
    import pyarrow.parquet as pq

    return pq.read_table(target).to_pylist()[0] if target.exists() else {}


def _write_run_row(target, row: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([row], schema=MODEL_RUNS.arrow_schema())
    with atomic.staged_dir(target) as staged:
        staged.mkdir(parents=True)
        pq.write_table(table, staged / "part-00000.parquet")


def _floor_model(settings: Settings) -> str | None:
    from training.registry import Policy

    return Policy.load(settings.mlflow.promotion_policy).floor_model


def _floor_metrics(
    settings: Settings, ds: str, name: str, views: dict[str, TrainingData], splits: tuple[str, ...]
) -> dict[str, dict[str, dict[str, float]]]:
    """The promotion floor (a closed-form baseline) on the same tables, fitted in seconds on the
    view each split is evaluated on.

    Every model of a date is compared with the same floor, so the first ``evaluate`` of the date
    keeps it in ``floor_metrics_path``, keyed by the tables' checksums (a rebuilt bundle gets a new
    floor), and the others read it."""
    manifest = views["test"].manifest
    key = {
        "model": name,
        "splits": list(splits),
        "checksums": manifest.checksums if manifest is not None else None,
    }
    path = floor_metrics_path(settings.paths.warehouse_root, ds, name)
    if key["checksums"]:
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return saved["metrics"]
        except (OSError, ValueError):
            pass
    out = {}
    for split in splits:
        data = views[split]
        if split not in data.heldout:
            continue
        floor = fitted_closed_form(name, data)
        out[split] = evaluate_scores(
            floor.context_scorer(data), data, split, batch_size=settings.training.eval_batch_size
        )
    if key["checksums"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "metrics": out}) + "\n")
        os.replace(tmp, path)  # parallel evaluates write the same floor: readers see a whole file
    return out
