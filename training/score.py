"""The ``score`` stage: top-K for every active user of a date with ``@champion``.

Active users are the users with any event in the last ``scoring.active_days`` days up to the date
(the ``events`` table). Each is ranked against all items by the champion's pyfunc, which excludes
the purchases its training tables know; purchases made since (in the events window) are excluded
here, by asking for K + (the user's new purchases) and dropping them, so nobody is recommended
what they already bought.

Two paths give the same rows: ``local`` (one process, batched; CUDA when present) and ``spark``
(``mapInPandas``; the downloaded model is broadcast to the executors as a tarball and loaded once
per Python worker). Both call ``score_frame``. Output: the ``scores`` table, written to
``scores_staged/ds=<d>`` for validation; ``publish`` moves it into ``scores/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from infra import publish
from infra.logs import stage
from infra.settings import Settings
from infra.tables import PURCHASE, SCORES, events_dir, scores_staged_dir
from training import tracking
from training.registry import CHAMPION, PromotionError

#: Columns the pyfunc returns, before the lineage columns are added.
PREDICTED = ["user_id", "rank", "item_id", "score", "item_type", "expert", "expert_weights"]


@dataclass(frozen=True)
class Champion:
    uri: str
    name: str
    version: int
    run_id: str
    model: str
    trained_ds: str


def champion(settings: Settings) -> Champion:
    """The registry's ``@champion`` (a clear error when there is none)."""
    from mlflow.exceptions import MlflowException

    client = tracking.connect(settings)
    name = settings.mlflow.registered_model
    try:
        mv = tracking.call(
            settings, "read champion", lambda: client.get_model_version_by_alias(name, CHAMPION)
        )
    except MlflowException as exc:
        raise PromotionError(f"{name} has no @{CHAMPION}: promote a model before scoring ({exc})") from exc
    tags = mv.tags or {}
    return Champion(
        f"models:/{name}@{CHAMPION}",
        name,
        int(mv.version),
        mv.run_id,
        tags.get("funnelrec.model", "unknown"),
        tags.get("funnelrec.ds", "unknown"),
    )


def active_users(settings: Settings, run_date: date) -> pd.DataFrame:
    """``user_id`` (sorted) and ``bought`` (sorted item ids purchased in the window) of active users."""
    first = run_date - timedelta(days=settings.scoring.active_days - 1)
    root = events_dir(settings.paths.warehouse_root)
    if not root.exists():
        raise FileNotFoundError(f"no events at {root}: run `funnelrec ingest` first")
    part = pads.partitioning(pa.schema([("source", pa.string()), ("event_date", pa.string())]), flavor="hive")
    dataset = pads.dataset(root, format="parquet", partitioning=part)
    f = pads.field
    flt = (
        f("source").isin(list(settings.pipeline.sources))
        & (f("event_date") >= first.isoformat())
        & (f("event_date") <= run_date.isoformat())
    )
    ev = dataset.to_table(columns=["user_id", "item_id", "behavior"], filter=flt).to_pandas()
    users = np.sort(ev["user_id"].unique())
    bought = (
        ev.loc[ev["behavior"] == PURCHASE, ["user_id", "item_id"]]
        .drop_duplicates()
        .sort_values(["user_id", "item_id"])
        .groupby("user_id")["item_id"]
        .agg(list)
    )
    out = pd.DataFrame({"user_id": users})
    out["bought"] = out["user_id"].map(bought).apply(lambda v: v if isinstance(v, list) else [])
    return out


def score_frame(model, users: pd.DataFrame, k: int, batch_size: int) -> pd.DataFrame:
    """Top-``k`` rows (``PREDICTED`` columns) for ``users`` (``user_id``, ``bought``): the one scoring function."""
    if users.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in PREDICTED})
    margin = int(users["bought"].map(len).max())
    recs = model.predict(users[["user_id"]], params={"k": k + margin, "batch_size": batch_size})
    if margin:
        bought = users[["user_id", "bought"]].explode("bought").dropna()
        bought = bought.rename(columns={"bought": "item_id"}).assign(_drop=True)
        recs = recs.merge(bought, on=["user_id", "item_id"], how="left")
        recs = recs[recs["_drop"].isna()].drop(columns="_drop")
        recs["rank"] = recs.groupby("user_id", sort=False).cumcount() + 1
    recs = recs[recs["rank"] <= k]
    return recs[PREDICTED].reset_index(drop=True)


def _lineage(frame: pd.DataFrame, champ: Champion) -> pd.DataFrame:
    out = frame.copy()
    out["rank"] = out["rank"].astype("int32")
    out["model"] = champ.model
    out["model_name"] = champ.name
    out["model_version"] = np.int32(champ.version)
    out["run_id"] = champ.run_id
    out["trained_ds"] = champ.trained_ds
    return out.sort_values(["user_id", "rank"]).reset_index(drop=True)


def _write_local(frame: pd.DataFrame, target: Path) -> None:
    table = pa.Table.from_pandas(frame, schema=SCORES.arrow_schema(), preserve_index=False)
    with publish.staged_dir(target) as staged:
        staged.mkdir(parents=True)
        pq.write_table(table, staged / "part-00000.parquet")


def run_score(settings: Settings, run_date: date, path: str | None = None, spark=None) -> dict[str, Any]:
    """Score every active user of ``run_date`` with ``@champion`` into ``scores_staged/ds=<date>``."""
    from training.pyfunc import load_for_scoring

    path = path or settings.scoring.path
    cfg = settings.scoring
    target = scores_staged_dir(settings.paths.warehouse_root, run_date.isoformat())
    with stage("score", ds=run_date.isoformat(), path=path) as counts:
        champ = champion(settings)
        if path not in ("local", "spark"):
            raise ValueError(f"unknown scoring path {path!r}: local | spark")
        if path == "spark" and spark is None:
            raise ValueError("the spark scoring path needs a SparkSession")
        model = load_for_scoring(champ.uri)  # refuses a wrong signature before any scoring starts
        users = active_users(settings, run_date)
        if path == "local":
            frame = _lineage(score_frame(model, users, cfg.k, cfg.batch_size), champ)
            _write_local(frame, target)
            rows, scored = len(frame), frame["user_id"].nunique()
        else:
            rows, scored = spark_score(spark, champ, users, target, cfg.k, cfg.batch_size)
        counts.update(
            model=champ.model, version=champ.version, active_users=len(users), scored_users=scored, rows=rows
        )
    return {
        "path": str(target),
        "champion": champ.__dict__,
        "active_users": len(users),
        "scored_users": scored,
        "rows": rows,
    }


# -- the Spark path ------------------------------------------------------------------------------
_EXECUTOR_MODELS: dict[str, Any] = {}


def _model_blob(uri: str) -> bytes:
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(uri))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(local, arcname="model")
    return buf.getvalue()


def _executor_model(blob: bytes):
    """The broadcast model, unpacked and loaded once per Python worker process."""
    key = hashlib.sha256(blob).hexdigest()
    if key not in _EXECUTOR_MODELS:
        from training.pyfunc import load_for_scoring

        where = Path(tempfile.mkdtemp(prefix="funnelrec-model-"))
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(where, filter="data")
        _EXECUTOR_MODELS[key] = load_for_scoring(str(where / "model"))
    return _EXECUTOR_MODELS[key]


def spark_score(
    spark, champ: Champion, users: pd.DataFrame, target: Path, k: int, batch_size: int
) -> tuple[int, int]:
    """Score ``users`` on the executors; write the partition with Spark. Returns (rows, users scored)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    blob = spark.sparkContext.broadcast(_model_blob(champ.uri))
    schema = T.StructType([f for f in SCORES.spark_schema() if f.name in PREDICTED])

    def score_partition(batches):
        model = _executor_model(blob.value)
        for pdf in batches:
            yield score_frame(model, pdf, k, batch_size)

    parallelism = max(spark.sparkContext.defaultParallelism, 1)
    sdf = spark.createDataFrame(
        users,
        T.StructType(
            [T.StructField("user_id", T.StringType()), T.StructField("bought", T.ArrayType(T.StringType()))]
        ),
    ).repartition(parallelism, "user_id")
    out = (
        sdf.mapInPandas(score_partition, schema)
        .withColumn("rank", F.col("rank").cast("int"))
        .withColumn("model", F.lit(champ.model))
        .withColumn("model_name", F.lit(champ.name))
        .withColumn("model_version", F.lit(champ.version).cast("int"))
        .withColumn("run_id", F.lit(champ.run_id))
        .withColumn("trained_ds", F.lit(champ.trained_ds))
        .select(*SCORES.data_columns)
        .sortWithinPartitions("user_id", "rank")
    )
    with publish.staged_dir(target) as staged:
        out.write.parquet(str(staged))
    written = spark.read.parquet(str(target))
    stats = written.agg(F.count("*").alias("rows"), F.countDistinct("user_id").alias("users")).first()
    blob.unpersist()
    return int(stats["rows"]), int(stats["users"])


def summary_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, default=str)
