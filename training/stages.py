"""The `train` and `evaluate` stages: what the CLI and the DAG call (I/O at the edges)."""

from __future__ import annotations

from typing import Any

from infra.logs import stage
from infra.settings import Settings
from training import tracking
from training.artifacts import load_trained, model_dir, read_meta, save_trained, training_dir, write_metrics
from training.data import TrainingData, load_training_data
from training.evaluate import KS, METRICS, SETTINGS, evaluate_scores
from training.models import build_model, merged_config, model_class
from training.trainer import fit_model


def run_train(settings: Settings, ds: str, name: str, epochs: int | None = None) -> dict[str, Any]:
    """Train ``name`` on ``training/ds=<ds>`` and publish it to ``models/ds=<ds>/<name>``."""
    wh = settings.paths.warehouse_root
    data = load_training_data(training_dir(wh, ds))
    cap = epochs or settings.training.max_epochs
    overrides = {"train": {"epochs": cap}} if cap else {}
    config = {**merged_config(name, overrides), "seed": settings.seeds.train}
    family = model_class(name).name
    with (
        stage("train", ds=ds, model=name) as counts,
        tracking.train_run(settings, ds, name, config, data.manifest, family) as run,
    ):
        target = model_dir(wh, ds, name)
        result = fit_model(
            name,
            data,
            settings.seeds.train,
            overrides,
            checkpoint_dir=target.parent / ".checkpoints" / name,
            device=settings.training.device,
        )
        path = save_trained(wh, ds, result, data, settings.seeds.train, run_id=run.info.run_id)
        tracking.log_training(run.info.run_id, settings, ds, result.history, read_meta(path))
        counts["run_id"] = run.info.run_id
        counts.update(
            device=result.device,
            epochs=result.epochs_run,
            best_epoch=result.best_epoch,
            best_val=result.best_metric if result.best_metric is not None else "none",
            s_per_epoch=result.seconds_per_epoch,
            peak_rss_mb=result.peak_rss_mb,
        )
    return {
        "path": str(path),
        "device": result.device,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "seconds_per_epoch": result.seconds_per_epoch,
        "peak_rss_mb": result.peak_rss_mb,
        "run_id": run.info.run_id,
    }


def run_evaluate(
    settings: Settings, ds: str, name: str, splits: tuple[str, ...] = ("validation", "test")
) -> dict:
    """Evaluate a trained model on every held-out split; write ``metrics.json`` beside it."""
    wh = settings.paths.warehouse_root
    model, data, meta = load_trained(wh, ds, name, settings.training.device)
    out: dict[str, Any] = {}
    with stage("evaluate", ds=ds, model=name) as counts:
        for split in splits:
            if split in data.heldout:
                out[split] = evaluate_scores(
                    model.scores,
                    data,
                    split,
                    batch_size=settings.training.eval_batch_size,
                    device=model.device,
                )
                counts[f"{split}_users"] = out[split]["standard"]["users"]
                counts[f"{split}_NDCG@10"] = out[split]["standard"]["NDCG@10"]
        write_metrics(wh, ds, name, {"model": name, "ds": ds, "eval_mask": meta.get("eval_mask"), **out})
        if meta.get("mlflow_run_id"):
            floor_name = _floor_model(settings)
            floor = (
                _floor_metrics(settings, floor_name, data, splits)
                if floor_name and floor_name != name
                else None
            )
            tracking.connect(settings)
            tracking.log_evaluation(meta["mlflow_run_id"], out, floor, floor_name)
            counts["run_id"] = meta["mlflow_run_id"]
    return out


def _floor_model(settings: Settings) -> str | None:
    from training.registry import Policy

    return Policy.load(settings.mlflow.promotion_policy).floor_model


def _floor_metrics(
    settings: Settings, name: str, data: TrainingData, splits: tuple[str, ...]
) -> dict[str, dict[str, dict[str, float]]]:
    """The promotion floor (a closed-form baseline) on the same tables, fitted here in seconds."""
    floor = build_model(name, data)
    if floor.trainable:
        raise ValueError(f"the promotion floor must be a closed-form model; {name} is gradient-trained")
    floor.fit()
    return {
        split: evaluate_scores(floor.scores, data, split, batch_size=settings.training.eval_batch_size)
        for split in splits
        if split in data.heldout
    }


def format_metrics(values: dict[str, dict[str, float]], ks: tuple[int, ...] = KS) -> str:
    """A markdown table: one row per setting, columns metric@K."""
    cols = [f"{m}@{k}" for k in ks for m in METRICS]
    lines = ["| setting | users | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for setting in SETTINGS:
        if setting in values:
            v = values[setting]
            lines.append(f"| {setting} | {v['users']} | " + " | ".join(f"{v[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)
