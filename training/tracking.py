"""MLflow tracking of every ``train`` and ``evaluate`` run.

One MLflow run per (date, model): ``train`` opens it (marked FAILED if training raises) and logs the
resolved hyperparameters, the data date and a checksum of each input table, per-epoch curves, a PNG
of the training curves and the GX results of its inputs; ``evaluate`` reopens the same run (its id
is in the trained model's ``model.json``) and logs metrics for every split, setting and K, the
evaluation JSON, PNGs of metric by K per setting, and the floor baseline's metrics on the same
tables (the promotion policy's absolute floor).

Metric names are ``<split>.<setting>.<metric>_at_<K>`` (``validation.standard.NDCG_at_20``):
MLflow does not allow ``@`` in a name.

Connection: ``connect`` points MLflow at the configured tracking/registry URIs (the embedded
SQLite store under the warehouse by default) and bounds MLflow's own HTTP retries (connection
errors, 408/429/5xx) from the settings, so an unreachable server fails in seconds with
``RegistryUnavailable`` instead of retrying for minutes. ``call`` retries, with the same bounds, what
MLflow's HTTP layer never sees: a store that answers ``TEMPORARILY_UNAVAILABLE`` in-process (the
SQLite store when the database stays locked).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import tenacity

from infra.logs import get_logger
from infra.settings import Settings
from infra.tables import TrainingManifest, validation_result_path

T = TypeVar("T")

ARTIFACT_DIR = "artifacts"


class RegistryUnavailable(RuntimeError):
    """The tracking/registry server could not be reached after the configured retries."""


def metric_key(split: str, setting: str, name: str) -> str:
    """``("validation", "standard", "NDCG@20")`` -> ``validation.standard.NDCG_at_20``."""
    return f"{split}.{setting}.{name.replace('@', '_at_')}"


def flat_metrics(by_split: dict[str, dict[str, dict[str, float]]], prefix: str = "") -> dict[str, float]:
    """``{split: {setting: {"HR@10": x, "users": n}}}`` -> ``{"<prefix><split>.<setting>.HR_at_10": x}``.

    ``None`` (a setting without users) is left out: MLflow has no null metric, and an absent metric
    is read as unknown, never as 0."""
    return {
        prefix + metric_key(split, setting, name): float(value)
        for split, settings in by_split.items()
        for setting, values in settings.items()
        for name, value in values.items()
        if value is not None
    }


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def connect(settings: Settings):
    """Point MLflow at the configured store; return an ``MlflowClient``.

    For the embedded default the SQLite file's folder is created and artifacts go to
    ``<warehouse>/mlflow/artifacts``; a server keeps its own artifact store.
    """
    cfg = settings.mlflow
    # MLflow reads these at request time; its own defaults retry for minutes.
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.max_retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(cfg.backoff_seconds)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.request_timeout_seconds)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars garble task logs
    import mlflow
    from mlflow import MlflowClient

    tracking, registry = settings.mlflow_tracking_uri, settings.mlflow_registry_uri
    for uri in {tracking, registry}:
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(registry)
    return MlflowClient(tracking_uri=tracking, registry_uri=registry)


def call(settings: Settings, what: str, fn: Callable[[], T]) -> T:
    """Run one tracking/registry request; a store that stays unavailable raises ``RegistryUnavailable``.

    Over HTTP, MLflow's own layer has already retried a connection failure or a transient status
    ``max_retries`` times; an in-process store's ``TEMPORARILY_UNAVAILABLE`` is retried here, as often,
    with the same exponential backoff. Any other error is raised at once.
    """
    cfg = settings.mlflow
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(cfg.max_retries + 1),
        # urllib3's schedule, which MLflow's HTTP retries follow: backoff, 2x, 4x... capped at 120 s
        wait=tenacity.wait_exponential(multiplier=cfg.backoff_seconds, max=120),
        retry=tenacity.retry_if_exception(_store_busy),
        before_sleep=lambda state: _log_retry(what, state),
        reraise=True,
    )
    try:
        return retrying(fn)
    except Exception as exc:
        if _unreachable(exc) or _store_busy(exc):
            raise _unavailable(settings, what, exc) from exc
        raise


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it was raised from or while handling: MLflow wraps HTTP failures in its own
    exception, sometimes without ``from``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _unreachable(exc: BaseException) -> bool:
    """The server could not be reached, or kept answering 408/429/5xx, after MLflow's HTTP retries."""
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from requests.exceptions import RetryError, Timeout

    return any(
        isinstance(e, RequestsConnectionError | Timeout | RetryError | ConnectionError)
        for e in exception_chain(exc)
    )


def _store_busy(exc: BaseException) -> bool:
    """MLflow's code for a store that may answer on a retry (an in-process store's locked database)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code == "TEMPORARILY_UNAVAILABLE"


def _log_retry(what: str, state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    get_logger("mlflow").warning(
        "mlflow_retry",
        request=what,
        attempt=state.attempt_number,
        wait_seconds=state.upcoming_sleep,
        error=type(exc).__name__,
        error_code=getattr(exc, "error_code", None),
    )


def _unavailable(settings: Settings, what: str, exc: BaseException) -> RegistryUnavailable:
    cfg = settings.mlflow
    return RegistryUnavailable(
        f"MLflow at {settings.mlflow_registry_uri} is unreachable ({what}) after {cfg.max_retries} "
        f"retries with exponential backoff from {cfg.backoff_seconds} s: {str(exc).splitlines()[0][:300]}"
    )


def experiment_id(settings: Settings, client) -> str:
    name = settings.mlflow.experiment
    exp = call(settings, "get experiment", lambda: client.get_experiment_by_name(name))
    if exp is not None:
        return exp.experiment_id
    location = None
    if not _is_remote(settings.mlflow_tracking_uri):
        location = (Path(settings.paths.warehouse_root) / "mlflow" / ARTIFACT_DIR).as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another task
        return client.get_experiment_by_name(name).experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return out


def run_tags(ds: str, name: str, model_class: str, manifest: TrainingManifest) -> dict[str, str]:
    return {
        "funnelrec.ds": ds,
        "funnelrec.model": name,
        "funnelrec.model_family": model_class,
        "funnelrec.dataset": ",".join(manifest.sources or []) or (manifest.benchmark or ds),
        "funnelrec.split": str(manifest.protocol),
        "eval.mask": str(manifest.eval_mask),
        "eval.split": str(manifest.protocol),
        "mlflow.source.git.commit": git_commit(),
        "mlflow.runName": f"{name} {ds}",
    }


@contextmanager
def train_run(
    settings: Settings,
    ds: str,
    name: str,
    config: dict[str, Any],
    manifest: TrainingManifest,
    model_class: str,
):
    """An MLflow run around training; yields the active run (ended FAILED if the body raises)."""
    import mlflow

    client = connect(settings)
    tags = run_tags(ds, name, model_class, manifest)
    if os.environ.get("MLFLOW_RUN_ID"):  # started by `mlflow run` (mlflow/MLproject): log into its run
        run = call(settings, "resume run", lambda: mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"]))
        mlflow.set_tags(tags)
    else:
        exp = experiment_id(settings, client)
        run = call(settings, "start run", lambda: mlflow.start_run(experiment_id=exp, tags=tags))
    try:
        mlflow.log_params(_flat_params(config))
        mlflow.log_params(
            {
                "data.ds": ds,
                **{f"data.checksum.{t}": c for t, c in sorted(manifest.checksums.items())},
                "data.protocol": str(manifest.protocol),
            }
        )
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run()


def log_training(
    run_id: str, settings: Settings, ds: str, history: list[dict[str, float]], meta: dict
) -> None:
    """Per-epoch curves, the training-curve PNG, timings and the GX results of the inputs."""
    from mlflow.entities import Metric

    from mlflow import MlflowClient

    client = MlflowClient()
    rows = []
    for row in history:
        step = int(row.get("epoch", 0))
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float):
                rows.append(Metric(f"train.{key}".replace("@", "_at_"), float(value), 0, step))
    for start in range(0, len(rows), 900):  # the store's batch limit is 1,000
        client.log_batch(run_id, metrics=rows[start : start + 900])
    summary = {
        k: meta[k]
        for k in ("best_epoch", "epochs_run", "seconds", "seconds_per_epoch", "peak_rss_mb")
        if meta.get(k) is not None
    }
    client.log_batch(run_id, metrics=[Metric(f"train.{k}", float(v), 0, 0) for k, v in summary.items()])
    client.set_tag(run_id, "funnelrec.device", str(meta.get("device")))
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "training_curves.png"
        if plot_training_curves(history, png, title=f"{meta.get('name')} {ds}"):
            client.log_artifact(run_id, str(png), "plots")
        client.log_dict(run_id, history, "training/history.json")
    for table in ("events", "sessions", "training"):
        path = validation_result_path(settings.paths.warehouse_root, table, ds)
        if path.is_file():
            client.log_artifact(run_id, str(path), f"validation/{table}")


def log_evaluation(
    run_id: str,
    metrics: dict[str, dict[str, dict[str, float]]],
    floor: dict[str, dict[str, dict[str, float]]] | None = None,
    floor_name: str | None = None,
) -> None:
    """Metrics for every split/setting/K, the evaluation JSON, metric-by-K PNGs and the floor's metrics."""
    from mlflow.entities import Metric

    from mlflow import MlflowClient

    client = MlflowClient()
    values = flat_metrics(metrics)
    if floor and floor_name:
        values.update(flat_metrics(floor, prefix=f"floor.{floor_name}."))
        client.set_tag(run_id, "funnelrec.floor_model", floor_name)
    rows = [Metric(k, v, 0, 0) for k, v in values.items()]
    for start in range(0, len(rows), 900):
        client.log_batch(run_id, metrics=rows[start : start + 900])
    client.log_dict(run_id, metrics, "evaluation/metrics.json")
    if floor and floor_name:
        client.log_dict(run_id, floor, f"evaluation/floor_{floor_name}.json")
    with tempfile.TemporaryDirectory() as tmp:
        for split, by_setting in metrics.items():
            png = Path(tmp) / f"metrics_by_k_{split}.png"
            plot_metrics_by_k(by_setting, png, title=split)
            client.log_artifact(run_id, str(png), "plots")


@contextmanager
def _figure() -> Iterator[Any]:
    import matplotlib

    matplotlib.use("Agg")  # headless: tasks run without a display
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(9, 3.2), dpi=100)
    try:
        yield fig
    finally:
        plt.close(fig)


def plot_training_curves(history: list[dict[str, float]], path: Path, title: str = "") -> bool:
    """Loss parts and the validation metric by epoch; False when there is nothing to plot."""
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(history)]
    skip = {"epoch", "seconds", "train_seconds"}
    losses = sorted({k for r in history for k in r if k not in skip and not k.startswith("val_")})
    vals = sorted({k for r in history for k in r if k.startswith("val_")})
    if not losses and not vals:
        return False
    with _figure() as fig:
        ax1, ax2 = fig.subplots(1, 2)
        for key in losses:
            ax1.plot(epochs, [r.get(key, float("nan")) for r in history], marker=".", label=key)
        ax1.set(xlabel="epoch", title=f"{title} training loss")
        if losses:
            ax1.legend(fontsize=7)
        for key in vals:
            ax2.plot(epochs, [r.get(key, float("nan")) for r in history], marker=".", label=key)
        ax2.set(xlabel="epoch", title="validation")
        if vals:
            ax2.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path)
    return True


def plot_metrics_by_k(by_setting: dict[str, dict[str, float]], path: Path, title: str = "") -> None:
    """One panel per metric (HR, NDCG, Recall), one line per setting, K on the x axis."""
    from training.evaluate import METRICS

    with _figure() as fig:
        axes = fig.subplots(1, len(METRICS))
        for ax, metric in zip(axes, METRICS, strict=True):
            for setting, values in by_setting.items():
                ks = sorted(
                    int(k.split("@")[1])
                    for k, v in values.items()
                    if k.startswith(f"{metric}@") and v is not None
                )
                if ks:
                    ax.plot(ks, [values[f"{metric}@{k}"] for k in ks], marker="o", label=setting)
            ax.set(xlabel="K", title=f"{title} {metric}@K")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path)
