"""The ``score`` stage: top-K for every active user of a date with ``@champion``.

It reads the date's ``serving`` bundle (``funnelrec context``): each active user's context as of the
date (visited set, purchases, recent events) and the date's catalogue. The champion's pyfunc scores
each user from that context, never from the tables it was trained on, ranks only catalogue items,
never recommends what the user bought in the context window, and gives every user K rows: users it
cannot score and ranks it leaves short come from the fallback (the catalogue's popularity order,
``expert = "fallback"``; see ``training.pyfunc``).

Two paths give the same rows: ``local`` (one process, CUDA when present; the serving context read
and scored ``scoring.batch_size`` users at a time, each batch's rows appended to the output file,
so memory holds one batch and the catalogue) and ``spark`` (the serving context read by Spark and
scored with ``mapInPandas``; the downloaded model is broadcast to the executors as a tarball and
loaded once per Python worker; no user passes through the driver). Both call ``score_frame``. Output: the ``scores`` table, written to
``scores_staged/ds=<d>`` for validation; ``publish`` moves it into ``scores/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from infra import atomic
from infra.logs import stage
from infra.settings import Settings
from infra.tables import (
    CATALOGUE,
    CONTEXT_INPUT,
    CONTEXT_OPTIONAL,
    FALLBACK,
    SCORES,
    SCORES_PREDICTED,
    SERVING,
    SERVING_CONTEXT,
    scores_staged_dir,
)
from training import tracking
from training.registry import CHAMPION, PromotionError

#: Columns the pyfunc returns, before the lineage columns are added.
PREDICTED = [c.name for c in SCORES_PREDICTED]


@dataclass(frozen=True)
class Champion:
    uri: str
    name: str
    version: int
    run_id: str
    model: str
    trained_ds: str
    #: A ranker's: the retrieval version it re-ranks (None for a retriever).
    retriever_version: int | None = None


def serving_champion(settings: Settings) -> tuple[Champion, str]:
    """What scores the date, and why: the ranker's ``@champion`` when ``ranking.model`` is set and
    that ranker was trained over the current retrieval champion (both refresh nightly, so a ranker
    of an older retriever is stale); else the retrieval ``@champion``."""
    from training.ranking import ranker_settings

    retriever = champion(settings)
    if settings.ranking.model is None:
        return retriever, "one stage (ranking.model is null): the retrieval champion's lists"
    rs = ranker_settings(settings)
    try:
        ranker = champion(rs)
    except PromotionError:
        return retriever, f"{rs.mlflow.registered_model} has no @{CHAMPION}: the retrieval champion's lists"
    if ranker.retriever_version != retriever.version:
        return retriever, (
            f"the ranker's champion, version {ranker.version}, re-ranks retrieval version "
            f"{ranker.retriever_version}, not the champion {retriever.version}: the retrieval champion's lists"
        )
    return ranker, (
        f"two stages: ranker version {ranker.version} ({ranker.model}) over retrieval version {retriever.version} "
        f"({retriever.model})"
    )


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
        int(tags["funnelrec.retriever_version"]) if "funnelrec.retriever_version" in tags else None,
    )


def serving_inputs(settings: Settings, run_date: date) -> tuple[pd.DataFrame, list[str]]:
    """The date's active users with their context (``CONTEXT_INPUT``, sorted by user) and its
    catalogue (item ids, most popular first), all in memory: for inspection and tests; scoring
    reads them in batches (``serving_batches``) or with Spark (``serving_users_spark``)."""
    bundle = SERVING.dir(settings.paths.warehouse_root, run_date)
    if not bundle.exists():
        raise FileNotFoundError(
            f"no serving context for {run_date} at {bundle}: run `funnelrec context --date {run_date}` first"
        )
    users = pd.concat(list(serving_batches(settings, run_date, 65_536)), ignore_index=True)
    return users.sort_values("user_id").reset_index(drop=True), serving_catalogue(settings, run_date)


def serving_batches(settings: Settings, run_date: date, rows: int) -> Iterator[pd.DataFrame]:
    """The date's active users with their context (``CONTEXT_INPUT``), at most ``rows`` at a time,
    file by file of the serving context: what the local path holds at once is one batch."""
    bundle = SERVING.dir(settings.paths.warehouse_root, run_date)
    files = sorted((bundle / SERVING_CONTEXT.name).glob("*.parquet"))
    for f in files:
        pf = pq.ParquetFile(f)
        columns = [c for c in CONTEXT_INPUT if c in pf.schema_arrow.names or c not in CONTEXT_OPTIONAL]
        for batch in pf.iter_batches(batch_size=rows, columns=columns):
            users = batch.to_pandas()
            for col in CONTEXT_INPUT[1:]:
                users[col] = users[col].map(list) if col in users else [[] for _ in range(len(users))]
            yield users


def serving_users_spark(spark, settings: Settings, run_date: date):
    """The date's active users with their context (``CONTEXT_INPUT``) as a Spark DataFrame: the
    Spark path reads them on the executors, never through the driver."""
    from pyspark.sql import functions as F

    bundle = SERVING.dir(settings.paths.warehouse_root, run_date)
    sdf = SERVING_CONTEXT.read_spark(spark, bundle / SERVING_CONTEXT.name)
    types = {f.name: f.dataType for f in SERVING_CONTEXT.spark_schema()}
    # A bundle built before an optional column existed reads it as null: empty lists.
    return sdf.select(*(F.coalesce(F.col(c), F.array().cast(types[c])).alias(c) if c != "user_id" else c
                        for c in CONTEXT_INPUT))  # fmt: skip


def score_frame(model, users: pd.DataFrame, catalogue: list[str], k: int, batch_size: int) -> pd.DataFrame:
    """Top-``k`` rows (``PREDICTED`` columns) for ``users`` (``CONTEXT_INPUT``): the one scoring function."""
    if users.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in PREDICTED})
    recs = model.predict(
        users[list(CONTEXT_INPUT)], params={"k": k, "batch_size": batch_size, "catalogue": catalogue}
    )
    # A champion registered before a column existed does not return it: null (SCORES_ADDED_LATER).
    recs = recs.assign(**{c: None for c in PREDICTED if c not in recs.columns})
    return recs[PREDICTED].reset_index(drop=True)


def _lineage(frame: pd.DataFrame, champ: Champion) -> pd.DataFrame:
    out = frame.copy()
    out["rank"] = out["rank"].astype("int32")
    out["model"] = champ.model
    out["model_name"] = champ.name
    out["model_version"] = np.int32(champ.version)
    out["retriever_version"] = champ.retriever_version
    out["run_id"] = champ.run_id
    out["trained_ds"] = champ.trained_ds
    return out.sort_values(["user_id", "rank"]).reset_index(drop=True)


def serving_catalogue(settings: Settings, run_date: date) -> list[str]:
    """The date's catalogue, most popular first (what may be recommended; the fallback's order)."""
    bundle = SERVING.dir(settings.paths.warehouse_root, run_date)
    items = pq.read_table(bundle / CATALOGUE.name, columns=["item_id", "popularity_rank"]).to_pandas()
    return items.sort_values("popularity_rank")["item_id"].tolist()


def _score_local(
    model, champ: Champion, batches: Iterable[pd.DataFrame], catalogue: list[str], target: Path, cfg
) -> tuple[int, int, int, int]:
    """Score batch after batch, appending each batch's rows to one file (staged, then swapped in).
    Returns (active users, rows, users scored, fallback rows)."""
    active = rows = scored = fallback = 0
    with atomic.staged_dir(target) as staged:
        staged.mkdir(parents=True)
        with pq.ParquetWriter(staged / "part-00000.parquet", SCORES.arrow_schema()) as out:
            for users in batches:
                frame = _lineage(score_frame(model, users, catalogue, cfg.k, cfg.batch_size), champ)
                out.write_table(
                    pa.Table.from_pandas(frame, schema=SCORES.arrow_schema(), preserve_index=False)
                )
                active += len(users)
                rows += len(frame)
                scored += frame["user_id"].nunique()
                fallback += int((frame["expert"] == FALLBACK).sum())
    return active, rows, scored, fallback


def run_score(settings: Settings, run_date: date, path: str | None = None, spark=None) -> dict[str, Any]:
    """Score every active user of ``run_date`` with ``@champion`` (the ranker's, over the retrieval
    champion it was trained on, when there is one: ``serving_champion``) into ``scores_staged/ds=<date>``."""
    from training.pyfunc import load_for_scoring

    path = path or settings.scoring.path
    cfg = settings.scoring
    target = scores_staged_dir(settings.paths.warehouse_root, run_date.isoformat())
    with stage("score", ds=run_date.isoformat(), path=path) as counts:
        champ, served = serving_champion(settings)
        if path not in ("local", "spark"):
            raise ValueError(f"unknown scoring path {path!r}: local | spark")
        if path == "spark" and spark is None:
            raise ValueError("the spark scoring path needs a SparkSession")
        model = load_for_scoring(champ.uri)  # refuses a wrong signature before any scoring starts
        bundle = SERVING.dir(settings.paths.warehouse_root, run_date)
        if not bundle.exists():
            raise FileNotFoundError(
                f"no serving context for {run_date} at {bundle}: run `funnelrec context --date {run_date}` first"
            )
        catalogue = serving_catalogue(settings, run_date)
        if path == "local":
            active, rows, scored, fallback = _score_local(
                model, champ, serving_batches(settings, run_date, cfg.batch_size), catalogue, target, cfg
            )
        else:
            users = serving_users_spark(spark, settings, run_date)
            active = users.count()
            rows, scored, fallback = spark_score(
                spark, champ, users, catalogue, target, cfg.k, cfg.batch_size
            )
        counts.update(
            model=champ.model,
            version=champ.version,
            active_users=active,
            scored_users=scored,
            rows=rows,
            fallback_rows=fallback,
        )
    return {
        "path": str(target),
        "champion": champ.__dict__,
        "served": served,
        "active_users": active,
        "scored_users": scored,
        "rows": rows,
        "fallback_rows": fallback,
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
    spark, champ: Champion, users, catalogue: list[str], target: Path, k: int, batch_size: int
) -> tuple[int, int, int]:
    """Score ``users`` (a Spark DataFrame of ``CONTEXT_INPUT``) on the executors; write the
    partition with Spark. Nothing per user passes through the driver. Returns (rows, users scored,
    fallback rows)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    blob = spark.sparkContext.broadcast(_model_blob(champ.uri))
    items = spark.sparkContext.broadcast(catalogue)
    schema = T.StructType([f for f in SCORES.spark_schema() if f.name in PREDICTED])

    def score_partition(batches):
        model = _executor_model(blob.value)
        for pdf in batches:
            for col in CONTEXT_INPUT[1:]:
                pdf[col] = pdf[col].map(list)
            yield score_frame(model, pdf, items.value, k, batch_size)

    parallelism = max(spark.sparkContext.defaultParallelism, 1)
    sdf = users.select(*CONTEXT_INPUT).repartition(parallelism, "user_id")
    out = (
        sdf.mapInPandas(score_partition, schema)
        .withColumn("rank", F.col("rank").cast("int"))
        .withColumn("model", F.lit(champ.model))
        .withColumn("model_name", F.lit(champ.name))
        .withColumn("model_version", F.lit(champ.version).cast("int"))
        .withColumn("retriever_version", F.lit(champ.retriever_version).cast("int"))
        .withColumn("run_id", F.lit(champ.run_id))
        .withColumn("trained_ds", F.lit(champ.trained_ds))
        .select(*SCORES.data_columns)
        .sortWithinPartitions("user_id", "rank")
    )
    with atomic.staged_dir(target) as staged:
        out.write.parquet(str(staged))
    written = spark.read.parquet(str(target))
    stats = written.agg(
        F.count("*").alias("rows"),
        F.countDistinct("user_id").alias("users"),
        F.count(F.when(F.col("expert") == FALLBACK, 1)).alias("fallback"),
    ).first()
    blob.unpersist()
    items.unpersist()
    return int(stats["rows"]), int(stats["users"]), int(stats["fallback"])


def summary_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, default=str)
