"""The `validate` stage: one GX checkpoint per table and date (what the CLI and the DAG call).

Tables: ``events`` (the history window ending on the date), ``sessions``, ``training``,
``serving`` (the context and catalogue scoring reads), ``scores`` (checked against ``serving``). Results land
in ``<warehouse>/validation/<table>/ds=<date>/result.json`` (for MLflow to attach) and in the Data
Docs site at ``validation.data_docs_dir``. A failed suite raises ``ValidationFailed``.

Tables read from Parquet go to GX as they are (each metric re-reads only its columns); the joined
views are cached here, once, since GX would otherwise recompute their joins for every metric. The
runner unpersists each after its checkpoint.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

from infra.dates import window_start
from infra.logs import stage
from infra.settings import Settings
from infra.tables import (
    CATALOGUE,
    HELDOUT,
    INTERACTIONS,
    ITEM_MAP,
    SCORES,
    SERVING,
    SERVING_CONTEXT,
    SESSION_EVENTS,
    SESSIONIZED,
    SESSIONS,
    TRAIN_EVENTS,
    TRAINING,
    USER_MAP,
    VISITED,
    Table,
    published_dates,
    read_events,
    read_manifest,
    scores_partition_dir,
    scores_staged_dir,
    validation_result_path,
)
from validation import suites
from validation.runner import run_checkpoint

TABLES = ("events", "sessions", "training", "serving", "scores")


def result_path(settings: Settings, table: str, ds: str) -> Path:
    return validation_result_path(settings.paths.warehouse_root, table, ds)


def _read(spark: SparkSession, table: Table, path: Path):
    return table.read_spark(spark, path, "nothing to validate")


def _serving(spark: SparkSession, wh: Path, run_date: date):
    bundle = SERVING.dir(wh, run_date)
    return (
        _read(spark, SERVING_CONTEXT, bundle / SERVING_CONTEXT.name),
        _read(spark, CATALOGUE, bundle / CATALOGUE.name),
    )


def _scores_pair(spark: SparkSession, settings: Settings, run_date: date):
    """The scores of a date (staged by `score`, else already published) and its suite, checked
    against the date's serving bundle (the context the champion scored from)."""
    wh, ds = Path(settings.paths.warehouse_root), run_date.isoformat()
    path = scores_staged_dir(wh, ds)
    if not path.exists():
        path = scores_partition_dir(wh, ds)
    scores = _read(spark, SCORES, path).drop("ds")
    context, catalogue = _serving(spark, wh, run_date)
    active = context.count()
    view = suites.scores_view(scores, context, catalogue)
    cfg = settings.validation
    drift = _previous_night(spark, settings, run_date, scores, catalogue.count())
    if drift is not None:
        previous, prev_scores, coverage_ratio = drift
        view = suites.with_drift(view, prev_scores, settings.scoring.k, coverage_ratio)
    suite = suites.scores_suite(settings.scoring.k, active, cfg.scores_max_fallback_share)
    if drift is not None:
        suite.checks += suites.drift_checks(previous, cfg.scores_min_overlap, cfg.scores_min_coverage_ratio)
    return suite, view.persist()


def _previous_night(spark: SparkSession, settings: Settings, run_date: date, scores, items: int):
    """``(date, its scores, coverage over its coverage)`` of the previous published date, or None
    (the first date, or no user scored both nights)."""
    wh = Path(settings.paths.warehouse_root)
    before = [d for d in published_dates(wh) if d < run_date]
    if not before:
        return None
    previous = before[-1]
    prev = _read(spark, SCORES, scores_partition_dir(wh, previous)).select("user_id", "item_id")
    if prev.join(scores.select("user_id").distinct(), "user_id", "left_semi").limit(1).count() == 0:
        return None
    prev_catalogue = SERVING.dir(wh, previous) / CATALOGUE.name
    # A pruned serving bundle leaves the previous catalogue unknown: today's stands in for it.
    prev_items = _read(spark, CATALOGUE, prev_catalogue).count() if prev_catalogue.exists() else items
    coverage = scores.select("item_id").distinct().count() / max(items, 1)
    prev_coverage = prev.select("item_id").distinct().count() / max(prev_items, 1)
    return previous, prev, coverage / prev_coverage if prev_coverage else 1.0


def _serving_pairs(spark: SparkSession, settings: Settings, run_date: date):
    """The serving bundle's suites: the context against the date's events, the catalogue on its own."""
    wh, cfg = Path(settings.paths.warehouse_root), settings.scoring
    context, catalogue = _serving(spark, wh, run_date)
    active_from = window_start(run_date, cfg.active_days)
    events = read_events(spark, wh, settings.pipeline.sources, active_from, run_date)
    active = events.select("user_id").distinct().count()
    items = catalogue.count()
    return [
        (
            suites.serving_context_suite(active_from, run_date, active, cfg.history_length),
            suites.serving_context_view(context),
        ),
        (suites.catalogue_suite(window_start(run_date, cfg.catalogue_days), run_date, items), catalogue),
    ]


def run_validate(spark: SparkSession, settings: Settings, table: str, run_date: date) -> dict[str, Any]:
    """Validate ``table`` for ``run_date``; raise ``ValidationFailed`` listing each failed expectation."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; one of {', '.join(TABLES)}")
    wh, cfg, ds = Path(settings.paths.warehouse_root), settings.validation, run_date.isoformat()
    if table == "events":
        first = window_start(run_date, settings.sessionize.history_days)
        df = read_events(spark, wh, settings.pipeline.sources, first, run_date)
        pairs = [
            (suites.events_suite(first, run_date, cfg.events_min_rows, cfg.events_max_rows), df),
            suites.events_unique(df),
        ]
    elif table == "sessions":
        bundle = SESSIONIZED.dir(wh, run_date)
        sessions = _read(spark, SESSIONS, bundle / SESSIONS.name)
        events = _read(spark, SESSION_EVENTS, bundle / SESSION_EVENTS.name)
        pairs = [
            (
                suites.sessions_suite(settings.sessionize.gap_minutes),
                suites.sessions_view(sessions, events).persist(),
            ),
            suites.sessions_unique(sessions),
        ]
    elif table == "serving":
        pairs = _serving_pairs(spark, settings, run_date)
    elif table == "scores":
        pairs = [_scores_pair(spark, settings, run_date)]
    else:
        bundle = TRAINING.dir(wh, run_date)
        t = {
            x.name: _read(spark, x, bundle / x.name)
            for x in (HELDOUT, VISITED, INTERACTIONS, USER_MAP, ITEM_MAP, TRAIN_EVENTS)
        }
        manifest = read_manifest(bundle)
        sizes = manifest.stats
        pairs = [
            (
                suites.heldout_suite(),
                suites.heldout_view(
                    t[HELDOUT.name], t[VISITED.name], t[INTERACTIONS.name], t[TRAIN_EVENTS.name]
                ).persist(),
            ),
            (suites.interactions_suite(manifest.cutoff_time), t[INTERACTIONS.name]),
            (suites.id_map_suite("user", sizes["users"], settings.split.min_users), t[USER_MAP.name]),
            (suites.id_map_suite("item", sizes["items"], settings.split.min_items), t[ITEM_MAP.name]),
        ]
    with stage("validate", table=table, date=ds) as counts:
        summary = run_checkpoint(
            table,
            ds,
            pairs,
            wh / "gx",
            Path(cfg.data_docs_dir),
            result_path(settings, table, ds),
            pandas_max_rows=cfg.pandas_max_rows,
        )
        counts.update(suites=len(pairs), expectations=sum(len(s.checks) for s, _ in pairs))
    return summary
