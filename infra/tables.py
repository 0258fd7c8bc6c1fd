"""The table catalogue: every table stages exchange, its columns, location and partitioning.

This module is the one place a schema is written down. Stages talk to each other only through
these tables (Parquet under the warehouse), never through each other's modules. Column types are
declared once in a neutral form and rendered for Spark (``spark_schema``), Arrow (``arrow_schema``)
or DuckDB (``duckdb_types``) on demand, so importing this module needs none of them.

Layout under ``paths.warehouse_root``:

- ``events/source=<s>/event_date=<d>/``      canonical events, one partition per source and day
- ``quarantine/source=<s>/run_date=<d>/``     rows ingest could not accept (under ``quarantine_root``)
- ``sessionized/ds=<d>/{sessions,session_events}/``  the run's sessionized window
- ``training/ds=<d>/{interactions,visited,heldout,user_map,item_map,train_events}/`` + ``manifest.json``
- ``serving/ds=<d>/{serving_context,catalogue}/``  what scoring of the date reads: users' context, items
- ``models/ds=<d>/<model>/``                  a trained model: ``MODEL_FILES``, ``model.json``, ``metrics.json``
- ``model_runs/ds=<d>/run=<run_id>/``         one evaluated training run (``evaluate``, ``register``)
- ``decisions/ds=<d>/``                       the date's promotion decision (``promote``)
- ``scores_staged/ds=<d>/``, ``scores/ds=<d>/``  a date's recommendations, staged then published
- ``forget_requests/``                        users forgotten on request (``forget``), one file per request

A *bundle* (``sessionized``, ``training``) is the set of tables one stage writes for one date; it
is published as a unit (see ``infra.atomic``), so readers never mix tables of two runs. The JSON
documents stages exchange (a bundle's manifest, a model's ``model.json`` and ``metrics.json``) are
declared here too, key by key, with one function pair each to write and read them.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, dataclass, field, fields
from datetime import date, datetime
from pathlib import Path
from typing import Any

#: Canonical behaviours in funnel order (earlier stage first).
BEHAVIORS: tuple[str, ...] = ("view", "fav", "cart", "remove_from_cart", "purchase")
PURCHASE = "purchase"
#: Behaviours that make an item *visited* for a user: everything but the purchase itself.
VISIT_BEHAVIORS: tuple[str, ...] = tuple(b for b in BEHAVIORS if b != PURCHASE)
#: ``scores.expert`` of the rows the champion could not score, served by the catalogue's popularity.
FALLBACK = "fallback"


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str  # string | int | long | double | bool | timestamp | date | array<string> | array<long>
    nullable: bool
    doc: str


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    doc: str
    partition_by: tuple[str, ...] = ()

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def data_columns(self) -> list[str]:
        """Columns stored inside the Parquet files (partition columns live in the path)."""
        return [c.name for c in self.columns if c.name not in self.partition_by]

    def read_spark(self, spark, path: Path, missing: str = ""):
        """Spark: the table's Parquet files under ``path`` with the declared schema. The one Spark
        reader of every table (``read_events`` adds the events' window); ``missing`` says what to run
        when the folder is not there."""
        if not Path(path).exists():
            raise FileNotFoundError(f"no {self.name} table at {path}{': ' + missing if missing else ''}")
        return spark.read.schema(self.spark_schema()).parquet(str(path))

    def spark_schema(self, include_partitions: bool = True):
        from pyspark.sql import types as T

        kinds = {
            "string": T.StringType(),
            "int": T.IntegerType(),
            "long": T.LongType(),
            "double": T.DoubleType(),
            "bool": T.BooleanType(),
            "timestamp": T.TimestampType(),
            "date": T.DateType(),
            "array<string>": T.ArrayType(T.StringType(), containsNull=False),
            "array<long>": T.ArrayType(T.LongType(), containsNull=False),
        }
        return T.StructType(
            [
                T.StructField(c.name, kinds[c.dtype], c.nullable)
                for c in self.columns
                if include_partitions or c.name not in self.partition_by
            ]
        )

    def duckdb_types(self) -> dict[str, str]:
        """Column -> DuckDB type, every column (an empty table of the same columns, a cast)."""
        kinds = {
            "string": "VARCHAR",
            "int": "INTEGER",
            "long": "BIGINT",
            "double": "DOUBLE",
            "bool": "BOOLEAN",
            "timestamp": "TIMESTAMP WITH TIME ZONE",
            "date": "DATE",
            "array<string>": "VARCHAR[]",
            "array<long>": "BIGINT[]",
        }
        return {c.name: kinds[c.dtype] for c in self.columns}

    def arrow_schema(self, include_partitions: bool = False):
        import pyarrow as pa

        kinds = {
            "string": pa.string(),
            "int": pa.int32(),
            "long": pa.int64(),
            "double": pa.float64(),
            "bool": pa.bool_(),
            "timestamp": pa.timestamp("us", tz="UTC"),
            "date": pa.date32(),
            "array<string>": pa.list_(pa.field("element", pa.string(), nullable=False)),
            "array<long>": pa.list_(pa.field("element", pa.int64(), nullable=False)),
        }
        return pa.schema(
            [
                pa.field(c.name, kinds[c.dtype], c.nullable)
                for c in self.columns
                if include_partitions or c.name not in self.partition_by
            ]
        )


def column(name: str, dtype: str, doc: str, nullable: bool = False) -> Column:
    return Column(name, dtype, nullable, doc)


_EVENT_COLUMNS = (
    column("event_time", "timestamp", "when the event happened, UTC"),
    column(
        "user_id", "string", "the source's user id (float-looking ids normalised, e.g. 266079.0 -> 266079)"
    ),
    column("item_id", "string", "the source's item id, normalised like user_id"),
    column("behavior", "string", f"one of {', '.join(BEHAVIORS)}"),
    column("category_id", "string", "item category, when the source has one", nullable=True),
    column("brand", "string", "item brand, when the source has one", nullable=True),
    column("price", "double", "price at event time, >= 0, when the source has one", nullable=True),
    column("source_session_id", "string", "the source's own session id, when it has one", nullable=True),
)

EVENTS = Table(
    "events",
    (
        *_EVENT_COLUMNS,
        column("source", "string", "name of the source mapping that produced the row"),
        column("event_date", "date", "UTC date of event_time"),
    ),
    "Canonical behaviour events, exact duplicates removed. Written by `ingest`.",
    partition_by=("source", "event_date"),
)

QUARANTINE = Table(
    "quarantine",
    (
        column("file", "string", "input file the row came from"),
        column("line_number", "long", "1-based line number in that file (header included)"),
        column("raw_line", "string", "the line as read, without its line ending"),
        column("reason", "string", "why it was refused: see jobs.ingest.REASONS"),
        column("detail", "string", "the offending value or a short explanation", nullable=True),
        column("source", "string", "source mapping name"),
        column("run_date", "date", "run date of the ingest that refused it"),
    ),
    "Input rows ingest refused, with the reason. Nothing is dropped silently.",
    partition_by=("source", "run_date"),
)

SESSIONS = Table(
    "sessions",
    (
        column(
            "session_id", "string", "stable id: hash of source, user, session start and source session id"
        ),
        column("user_id", "string", "user"),
        column("source", "string", "source mapping name"),
        column("session_start", "timestamp", "first event time"),
        column("session_end", "timestamp", "last event time"),
        column("event_count", "long", "events in the session"),
        *(column(f"n_{b}", "long", f"{b} events in the session") for b in BEHAVIORS),
        column("purchased", "bool", "whether the session has a purchase"),
    ),
    "Sessions of the run's history window. Written by `sessionize`.",
)

SESSION_EVENTS = Table(
    "session_events",
    (
        *_EVENT_COLUMNS,
        column("source", "string", "source mapping name"),
        column("event_date", "date", "UTC date of event_time"),
        column("session_id", "string", "the session the event belongs to (sessions.session_id)"),
        column("seq_in_session", "int", "1-based position of the event in its session"),
    ),
    "Events of the run's history window, each with its session. Written by `sessionize`.",
)

INTERACTIONS = Table(
    "interactions",
    (
        column("user_idx", "int", "contiguous user index (user_map)"),
        column("item_idx", "int", "contiguous item index (item_map)"),
        column("behavior", "string", "canonical behaviour"),
        column("count", "long", "events of this behaviour for the pair in the training period"),
        column(
            "last_time",
            "timestamp",
            "last such event in the training period (null for benchmarks)",
            nullable=True,
        ),
    ),
    "Training-period interactions per (user, item, behaviour). Held-out purchases are absent.",
)

VISITED = Table(
    "visited",
    (
        column("user_idx", "int", "contiguous user index"),
        column("item_idx", "int", "an item the user reached through a non-purchase behaviour in training"),
    ),
    "Each user's visited set: items with any non-purchase behaviour in the training period.",
)

HELDOUT = Table(
    "heldout",
    (
        column("user_idx", "int", "contiguous user index"),
        column("item_idx", "int", "the purchased item"),
        column("split", "string", "validation | test"),
        column("event_time", "timestamp", "purchase time (null for benchmarks without times)", nullable=True),
        column(
            "visited",
            "bool",
            "whether the item is in the user's visited set of the data its model saw: the validation "
            "fit's (validation), every training event's (test)",
        ),
    ),
    "Held-out purchases. Validation purchases are training purchases that the validation fit did "
    "not see; test is after the cutoff.",
)

USER_MAP = Table(
    "user_map",
    (column("user_id", "string", "source user id"), column("user_idx", "int", "0..n_users-1")),
    "User id to contiguous index, one-to-one.",
)

ITEM_MAP = Table(
    "item_map",
    (
        column("item_id", "string", "source item id"),
        column("item_idx", "int", "0..n_items-1"),
        column("category_id", "string", "most frequent category seen for the item", nullable=True),
    ),
    "Item id to contiguous index, one-to-one; the catalogue every model ranks over.",
)

TRAIN_EVENTS = Table(
    "train_events",
    (
        column("user_idx", "int", "contiguous user index"),
        column("item_idx", "int", "contiguous item index"),
        column("behavior", "string", "canonical behaviour"),
        column("event_time", "timestamp", "event time (benchmarks without times: null)", nullable=True),
        column("session_id", "string", "session id (null for benchmarks)", nullable=True),
        column(
            "event_seq",
            "int",
            "the event's position among its user's training events, from 0, in time order; events of "
            "one second by funnel stage, then a hash of (user, item, behaviour), as the serving "
            "context orders history (null for benchmarks without times)",
            nullable=True,
        ),
        column(
            "validation_fit",
            "bool",
            "the validation fit sees this row: it comes before its user's validation purchase "
            "(leave_last_purchase) or the validation window (global_time); always true for benchmarks",
        ),
    ),
    "Training-period events in time order per user, for sequence models. The refit that is tested "
    "and served sees every row; the validation fit only the rows with validation_fit.",
)


SERVING_CONTEXT = Table(
    "serving_context",
    (
        column(
            "user_id", "string", "an active user of the date: any event in the last scoring.active_days days"
        ),
        column(
            "visited",
            "array<string>",
            "the user's visited set as of the date: items with a non-purchase event in the last "
            "split.observation_days days (sorted)",
        ),
        column("bought", "array<string>", "items the user bought in that window (sorted); never recommended"),
        column(
            "history_items",
            "array<string>",
            "the user's last scoring.history_length events' items, oldest first (the split's event order)",
        ),
        column("history_behaviors", "array<string>", "the behaviour of each of those events"),
        column("history_times", "array<long>", "the time of each of those events, in epoch seconds"),
        column("events", "long", "the user's events in the window"),
        column("last_event", "timestamp", "the user's latest event"),
    ),
    "Each active user's context as of the date, which the champion scores from (`context`): not the "
    "tables the champion was trained on.",
)
#: The ``serving_context`` columns the champion's pyfunc takes as input, in its input order.
CONTEXT_INPUT: tuple[str, ...] = (
    "user_id",
    "visited",
    "bought",
    "history_items",
    "history_behaviors",
    "history_times",
)
#: Context columns a model registered before they existed lacks (its signature does not ask for
#: them; the scorer passes them and MLflow drops them for that model): ``history_times``.
CONTEXT_OPTIONAL: tuple[str, ...] = ("history_times",)

CATALOGUE = Table(
    "catalogue",
    (
        column("item_id", "string", "an item with any event in the last scoring.catalogue_days days"),
        column("category_id", "string", "most frequent category of its events", nullable=True),
        *(
            column(f"n_{b}s", "long", f"{b} events in the window")
            for b in ("view", "fav", "cart", "purchase")
        ),
        column("n_users", "long", "distinct users with an event on it"),
        column("first_seen", "timestamp", "first event in the window"),
        column("last_seen", "timestamp", "last event in the window"),
        column(
            "popularity_rank",
            "int",
            "1..n: most purchased first, then most events, then item id (the scoring fallback's order)",
        ),
    ),
    "The date's catalogue: the only items the scorer may recommend, and what dim_items and "
    "coverage count (`context`).",
)

#: The columns of a ``scores`` row the champion's pyfunc returns, in its output order (its output
#: signature); ``score`` adds the lineage columns of ``SCORES`` after them.
SCORES_PREDICTED: tuple[Column, ...] = (
    column("user_id", "string", "an active user (any event in the last scoring.active_days days)"),
    column("rank", "int", "1 = best; 1..K without gaps"),
    column("item_id", "string", "recommended item; never one the user bought"),
    column("score", "double", "the model's score (comparable within a user and model version only)"),
    column(
        "item_type", "string", "visited (in the user's visited set as of ds: serving_context) | unvisited"
    ),
    column(
        "expert",
        "string",
        "the expert behind the score (MoE models), 'fallback' for rows the champion could not score "
        "(the catalogue's popularity order), null for single-tower models' own rows",
        nullable=True,
    ),
    column("expert_weights", "string", "JSON object expert -> gate weight, {} for single-tower models"),
    column(
        "retriever_rank",
        "int",
        "two-stage champions: the item's rank in the retriever's candidates (1 = its best); null otherwise",
        nullable=True,
    ),
    column(
        "retriever_score", "double", "two-stage champions: the retriever's score of the item", nullable=True
    ),
    column(
        "ranker_score",
        "double",
        "two-stage champions: the ranker's score of the item (the list's order)",
        nullable=True,
    ),
)
#: Output columns of ``SCORES_PREDICTED`` that a model registered before they existed does not
#: return; the scorer fills them with nulls.
SCORES_ADDED_LATER: frozenset[str] = frozenset({"retriever_rank", "retriever_score", "ranker_score"})

SCORES = Table(
    "scores",
    (
        *SCORES_PREDICTED,
        column("model", "string", "model configuration that produced it, e.g. member"),
        column("model_name", "string", "registered model name"),
        column("model_version", "int", "registered model version (the champion when scored)"),
        column(
            "retriever_version",
            "int",
            "two-stage lists: the retrieval champion version whose candidates the ranker re-ranked "
            "(model_name is then the ranker's registry); null for one-stage lists",
            nullable=True,
        ),
        column("run_id", "string", "MLflow run of that version"),
        column(
            "trained_ds", "string", "the training tables the model learned from (training/ds=<trained_ds>)"
        ),
        column("ds", "date", "scoring date"),
    ),
    "Top-K recommendations per active user and date. Written by `score`, published by `publish`.",
    partition_by=("ds",),
)


DECISIONS = Table(
    "decisions",
    (
        column("ds", "string", "the date whose held-out purchases every candidate was measured on"),
        column("decided_at", "string", "when promote ran (UTC, ISO 8601)"),
        column("version", "int", "candidate registered version"),
        column("model", "string", "candidate model configuration", nullable=True),
        column(
            "kind",
            "string",
            "first (no champion yet) | refresh (the champion's own model and config) | challenge",
        ),
        column("candidate_value", "double", "candidate's primary metric on the date's split", nullable=True),
        column("outcome", "string", "promoted | refused | not_reached (a better candidate passed first)"),
        column("champion_before", "int", "champion when promote ran", nullable=True),
        column("champion_after", "int", "champion after it", nullable=True),
        column(
            "gate",
            "string",
            "gate name (min_users, floor, min_relative_gain, refresh_non_inferiority, "
            "max_drop_<setting>, primary_metric, champion_measured)",
        ),
        column(
            "status",
            "string",
            "pass | fail | not_evaluable (too few users to judge; neither passes nor refuses)",
        ),
        column("setting", "string", "evaluation setting the gate reads", nullable=True),
        column("users", "long", "users both were measured on", nullable=True),
        column("value", "double", "candidate's mean over those users", nullable=True),
        column("champion_value", "double", "champion's mean over the same users", nullable=True),
        column("change", "double", "relative change value / champion_value - 1", nullable=True),
        column("change_low", "double", "bootstrap interval of the change: low end", nullable=True),
        column("change_high", "double", "bootstrap interval of the change: high end", nullable=True),
        column("threshold", "double", "the policy's threshold for this gate", nullable=True),
        column("detail", "string", "the gate in words, with its numbers"),
    ),
    "Promotion decisions: one row per candidate version and gate, per date (`promote`). "
    "The report and analysts read it.",
)


def decisions_dir(warehouse_root: Path, ds: date | str) -> Path:
    """``decisions/ds=<d>/``: the promotion decision of a date (replaced as a whole on a rerun)."""
    return Path(warehouse_root) / DECISIONS.name / f"ds={ds}"


#: The evaluation metrics a model run keeps (``model_runs``): per split and setting, HR, NDCG and
#: chance_HR at each K, users and candidates (``training.evaluate`` computes more; MLflow has all).
RUN_SPLITS: tuple[str, ...] = ("validation", "test")
RUN_SETTINGS: tuple[str, ...] = ("standard", "visited", "unvisited", "long_tail", "tail_items")
RUN_METRICS_AT_K: tuple[str, ...] = ("HR", "NDCG", "chance_HR")
RUN_KS: tuple[int, ...] = (10, 20, 50)
RUN_COUNTS: tuple[str, ...] = ("users", "candidates")


def run_metric_column(split: str, setting: str, metric: str) -> str:
    """``model_runs`` column of a metric as ``training.evaluate`` names it: ``HR@10`` of the test
    split's standard setting is ``test_standard_HR_at_10`` (MLflow: ``test.standard.HR_at_10``)."""
    return f"{split}_{setting}_{metric.replace('@', '_at_')}"


def run_metrics() -> list[tuple[str, str, str]]:
    """``(split, setting, metric)`` of every metric column of ``model_runs``, in column order."""
    at_k = [
        (split, setting, f"{m}@{k}")
        for split in RUN_SPLITS
        for setting in RUN_SETTINGS
        for m in RUN_METRICS_AT_K
        for k in RUN_KS
    ]
    counts = [(split, setting, c) for split in RUN_SPLITS for setting in RUN_SETTINGS for c in RUN_COUNTS]
    return at_k + counts


MODEL_RUNS = Table(
    "model_runs",
    (
        column("run_id", "string", "MLflow run of the training"),
        column("model", "string", "model configuration, e.g. als_multi"),
        column("model_family", "string", "model family, e.g. als", nullable=True),
        column(
            "data_ds", "string", "the training bundle it learned from and was evaluated on (training/ds=)"
        ),
        column("status", "string", "MLflow status of the run when evaluated (FINISHED)"),
        column("started_at", "timestamp", "when the training run started"),
        column(
            "registered_version",
            "long",
            "its version in registered_model, once `register` ran (null before)",
            nullable=True,
        ),
        *(
            column(
                run_metric_column(split, setting, metric),
                "double",
                f"{metric} of the {setting} setting on the {split} split (null: no users in the setting)",
                nullable=True,
            )
            for split, setting, metric in run_metrics()
        ),
        column("experiment", "string", "MLflow experiment of the run"),
        column("evaluated_at", "timestamp", "when `evaluate` last wrote the row"),
        column("registered_model", "string", "registered model it was registered in", nullable=True),
        column(
            "registered_at",
            "timestamp",
            "when `register` last ran for it (it set @challenger)",
            nullable=True,
        ),
    ),
    "One row per evaluated training run, at ``model_runs/ds=<data_ds>/run=<run_id>/``: written by "
    "`evaluate`, completed by `register`; `publish` and the report read it (never MLflow).",
)


def model_runs_dir(warehouse_root: Path) -> Path:
    return Path(warehouse_root) / MODEL_RUNS.name


def model_run_dir(warehouse_root: Path, ds: date | str, run_id: str) -> Path:
    """``model_runs/ds=<d>/run=<run_id>/``: one run's row (replaced as a whole when it changes)."""
    return model_runs_dir(warehouse_root) / f"ds={ds}" / f"run={run_id}"


@dataclass(frozen=True)
class Bundle:
    """Tables one stage publishes together for one date, under ``<root>/<name>/ds=<date>/``."""

    name: str
    tables: tuple[Table, ...]

    def dir(self, warehouse_root: Path, ds: date | str) -> Path:
        return Path(warehouse_root) / self.name / f"ds={ds}"

    def table_dir(self, warehouse_root: Path, ds: date | str, table: Table) -> Path:
        if table not in self.tables:
            raise KeyError(f"{table.name} is not part of bundle {self.name}")
        return self.dir(warehouse_root, ds) / table.name


SESSIONIZED = Bundle("sessionized", (SESSIONS, SESSION_EVENTS))
SERVING = Bundle("serving", (SERVING_CONTEXT, CATALOGUE))
TRAINING = Bundle("training", (INTERACTIONS, VISITED, HELDOUT, USER_MAP, ITEM_MAP, TRAIN_EVENTS))
MANIFEST_FILE = "manifest.json"


# -- JSON documents ------------------------------------------------------------------------------
# A document is a dataclass whose fields are its keys, each with ``key(...)`` as its metadata: JSON
# type, meaning and, for keys only some kinds of the document hold, those kinds. ``document_json`` and
# ``document_from_json`` are the only way between a document and its JSON, so a key written under
# one name is never read under another, and a file with an undeclared or mistyped key is refused.
_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "int": int,
    "number": (int, float),
    "bool": bool,
    "object": dict,
    "array": list,
}


def key(
    json_type: str,
    doc: str,
    *,
    nullable: bool = False,
    kinds: tuple[str, ...] = (),
    optional: bool = False,
    json_name: str | None = None,
) -> dict[str, Any]:
    """A JSON document key's declaration, the metadata of its dataclass field. ``kinds``: the
    document kinds that write it (every kind when empty); ``optional``: left out, not null, when
    it has no value; ``json_name``: the key in the file when it is not the field's name."""
    return {
        "json": json_type,
        "doc": doc,
        "nullable": nullable or optional,
        "kinds": kinds,
        "optional": optional,
        "json_name": json_name,
    }


def _json_name(f: Any) -> str:
    return f.metadata["json_name"] or f.name


def document_json(doc: Any) -> dict[str, Any]:
    """The JSON object of a document: its keys, less those its kind does not write."""
    kind = getattr(doc, "kind", None)
    return {
        _json_name(f): getattr(doc, f.name)
        for f in fields(doc)
        if (not f.metadata["kinds"] or kind in f.metadata["kinds"])
        and not (f.metadata["optional"] and getattr(doc, f.name) is None)
    }


def document_from_json(cls: type, raw: Any, where: Path | str) -> Any:
    """The ``cls`` document of a JSON object, checked against its declared keys and types."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a {cls.__name__} is a JSON object, got {type(raw).__name__}")
    declared = {_json_name(f): f for f in fields(cls)}
    unknown = sorted(set(raw) - set(declared))
    if unknown:
        raise ValueError(f"{where}: keys {unknown} are not declared for {cls.__name__} (infra/tables.py)")
    missing = sorted(
        n
        for n, f in declared.items()
        if n not in raw and f.default is MISSING and f.default_factory is MISSING
    )
    if missing:
        raise ValueError(f"{where}: {cls.__name__} lacks the keys {missing}")
    for name, value in raw.items():
        meta = declared[name].metadata
        want = _JSON_TYPES[meta["json"]]
        if value is None and meta["nullable"]:
            continue
        if not isinstance(value, want) or (isinstance(value, bool) and meta["json"] in ("int", "number")):
            raise ValueError(f"{where}: {cls.__name__}.{name} must be {meta['json']}, got {value!r}")
    return cls(**{declared[name].name: value for name, value in raw.items()})


#: ``TrainingManifest.kind``: who wrote the bundle.
EVENTS_BUNDLE, BENCHMARK_BUNDLE, FRAMES_BUNDLE = "events", "benchmark", "frames"
#: ``TrainingManifest.validation_design``: ``refit`` (a time-clean validation fit, then a refit on
#: every training event) or ``holdout`` (validation purchases removed from training; one fit).
REFIT, HOLDOUT = "refit", "holdout"
#: What evaluation masks per split (``training.data.TrainingData.mask_for``), in the key order a
#: manifest is written in (sorted), so it reads back as it was declared.
EVAL_MASK = {"test": "train_purchases", "validation": "validation_fit_purchases"}


@dataclass
class TrainingManifest:
    """``training/ds=<d>/manifest.json``: how a training bundle was built and what it holds.

    Written with the bundle (``jobs.split``, ``jobs.benchmarks``, ``training.data.write_training_bundle``);
    read by training, evaluation, tracking, the registry's pyfunc and the training suite.
    """

    ds: str = field(metadata=key("string", "the bundle's name: its run date, or the benchmark's name"))
    kind: str = field(
        metadata=key(
            "string",
            f"who built it: {EVENTS_BUNDLE} (split, from sessionized events), {BENCHMARK_BUNDLE} (split "
            f"--benchmark), {FRAMES_BUNDLE} (tables given in memory: tests, benchmarks of the code)",
        )
    )
    protocol: str = field(
        metadata=key("string", "split protocol: global_time | leave_last_purchase | member_tmall | ...")
    )
    validation_design: str = field(
        metadata=key(
            "string",
            f"{REFIT} (a time-clean validation fit, then a refit on every training event) | {HOLDOUT} "
            "(validation purchases removed from training; one fit)",
        )
    )
    cutoff: str | None = field(
        default=None,
        metadata=key("string", "global_time: the test window's start (ISO 8601, UTC)", nullable=True),
    )
    seed: int | None = field(
        default=None, metadata=key("int", "seed of the validation-user sample", nullable=True)
    )
    val_user_fraction: float | None = field(
        default=None,
        metadata=key("number", "share of eligible users given a validation purchase", nullable=True),
    )
    stats: dict[str, Any] = field(
        default_factory=dict,
        metadata=key(
            "object",
            "users, items, train_events, visited_pairs, interaction_pairs_by_behavior {behaviour: pairs}, "
            "heldout {split: {pairs, visited, unvisited, users}}",
        ),
    )
    leakage: dict[str, int] = field(
        default_factory=dict,
        metadata=key("object", "leakage symptom -> count (split publishes only when all are 0)"),
    )
    dropped: dict[str, int] = field(
        default_factory=dict, metadata=key("object", "reason -> held-out pairs dropped for it")
    )
    checksums: dict[str, str] = field(
        default_factory=dict,
        metadata=key(
            "object",
            "table -> '<order-independent content hash, hex>-<rows>'; a model refuses tables whose "
            "checksums differ from those it was trained on",
        ),
    )
    eval_mask: dict[str, str] = field(
        default_factory=lambda: dict(EVAL_MASK), metadata=key("object", "split -> what evaluation masks")
    )
    observation_window: list[str] | None = field(
        default=None,
        metadata=key(
            "array", "[first day, run date] of the events read", nullable=True, kinds=(EVENTS_BUNDLE,)
        ),
    )
    sources: list[str] | None = field(
        default=None,
        metadata=key(
            "array",
            "the source mappings (or, for frames, the data set) the tables came from",
            nullable=True,
            kinds=(EVENTS_BUNDLE, FRAMES_BUNDLE),
        ),
    )
    validation_start: str | None = field(
        default=None,
        metadata=key(
            "string",
            "global_time: the validation window's start (ISO 8601, UTC)",
            nullable=True,
            kinds=(EVENTS_BUNDLE,),
        ),
    )
    benchmark: str | None = field(
        default=None,
        metadata=key("string", "the benchmark folder's name", nullable=True, kinds=(BENCHMARK_BUNDLE,)),
    )
    split_rule: str | None = field(
        default=None,
        metadata=key(
            "string",
            "which files are training, validation and test, in words",
            nullable=True,
            kinds=(BENCHMARK_BUNDLE,),
        ),
    )
    auxiliary_behaviors: dict[str, str] | None = field(
        default=None,
        metadata=key(
            "object", "benchmark file stem -> canonical behaviour", nullable=True, kinds=(BENCHMARK_BUNDLE,)
        ),
    )
    declared_size: dict[str, int] | None = field(
        default=None,
        metadata=key(
            "object", "{users, items} of the folder's data_size.txt", nullable=True, kinds=(BENCHMARK_BUNDLE,)
        ),
    )

    @property
    def cutoff_time(self) -> datetime | None:
        return datetime.fromisoformat(self.cutoff) if self.cutoff else None


def write_manifest(bundle_dir: Path, manifest: TrainingManifest) -> Path:
    """Write ``manifest.json`` into a (staged) bundle directory."""
    path = Path(bundle_dir) / MANIFEST_FILE
    path.write_text(json.dumps(document_json(manifest), indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(bundle_dir: Path) -> TrainingManifest:
    path = Path(bundle_dir) / MANIFEST_FILE
    return document_from_json(TrainingManifest, json.loads(path.read_text()), path)


# -- trained models ------------------------------------------------------------------------------
@dataclass(frozen=True)
class File:
    """A file of a directory the catalogue lays out, with what it holds."""

    name: str
    doc: str


MODELS = "models"
MODEL_STATE = File(
    "state_dict.pt",
    "state dict of the model that is tested and served: the refit on every training event (loaded "
    "with weights_only=True)",
)
MODEL_VALIDATION_STATE = File(
    "validation_fit.pt",
    "state dict of the validation fit (trained on the bundle's validation view; its validation "
    "metrics chose the refit's epochs); absent for bundles with one view",
)
MODEL_META = File("model.json", "what the model is and how it was trained (ModelMeta), written by `train`")
MODEL_HISTORY = File("history.json", "per-epoch losses and validation metric of the validation fit")
MODEL_METRICS = File("metrics.json", "the model's metrics (ModelMetrics), written by `evaluate`")
MODEL_RANKER = File(
    "ranker.json",
    "a ranker's lineage (rankers only, written by `rank`): the retriever version and fits its labels, "
    "candidates, early stopping and test came from, the label leak check, and the two stages' metrics "
    "side by side (training.ranking)",
)
#: What ``models/ds=<d>/<model>/`` holds; ``train`` publishes it atomically, ``evaluate`` adds metrics.
MODEL_FILES: tuple[File, ...] = (
    MODEL_STATE,
    MODEL_VALIDATION_STATE,
    MODEL_META,
    MODEL_HISTORY,
    MODEL_METRICS,
    MODEL_RANKER,
)


def models_dir(warehouse_root: Path, ds: date | str) -> Path:
    """``models/ds=<d>/``: the models trained on ``training/ds=<d>``."""
    return Path(warehouse_root) / MODELS / f"ds={ds}"


def model_dir(warehouse_root: Path, ds: date | str, name: str) -> Path:
    """``models/ds=<d>/<model>/``: one trained model (``MODEL_FILES``)."""
    return models_dir(warehouse_root, ds) / name


def checkpoint_dir(warehouse_root: Path, ds: date | str, name: str) -> Path:
    """``models/ds=<d>/.checkpoints/<model>/``: the trainer's own checkpoints while a model trains
    (read by nothing else), outside the model's directory, which is published whole at the end."""
    return models_dir(warehouse_root, ds) / ".checkpoints" / name


def floor_metrics_path(warehouse_root: Path, ds: date | str, name: str) -> Path:
    """``models/ds=<d>/.floor/<model>.json``: the promotion floor's metrics on the date's tables,
    written by the first ``evaluate`` of the date and read by the others (keyed by the tables'
    checksums)."""
    return models_dir(warehouse_root, ds) / ".floor" / f"{name}.json"


@dataclass(kw_only=True)
class ModelMeta:
    """``models/ds=<d>/<model>/model.json``: what a trained model is and how it was trained. Written
    by ``train``; read by ``evaluate``, ``register`` and the pyfunc, which rebuild the model from its
    config and training tables. Keys other than name, config and training_dir may be null or absent
    (models trained before the key was added)."""

    name: str = field(metadata=key("string", "model configuration (training/models/<name>.yaml)"))
    model_class: str | None = field(
        default=None,
        metadata=key(
            "string", "model family (the Recommender's name, e.g. als)", nullable=True, json_name="class"
        ),
    )
    config: dict[str, Any] = field(metadata=key("object", "the resolved configuration it was built with"))
    seed: int | None = field(default=None, metadata=key("int", "training seed", nullable=True))
    ds: str | None = field(default=None, metadata=key("string", "the bundle's name", nullable=True))
    training_dir: str = field(
        metadata=key("string", "its training bundle, relative to the warehouse (training/ds=<ds>)")
    )
    training_checksums: dict[str, str] = field(
        default_factory=dict,
        metadata=key("object", "that bundle manifest's checksums: the model refuses other tables"),
    )
    split_protocol: str | None = field(
        default=None, metadata=key("string", "the manifest's protocol", nullable=True)
    )
    eval_mask: dict[str, str] | None = field(
        default=None, metadata=key("object", "the manifest's eval_mask", nullable=True)
    )
    refitted: bool | None = field(
        default=None,
        metadata=key(
            "bool", "whether a refit on every training event followed the validation fit", nullable=True
        ),
    )
    n_users: int | None = field(default=None, metadata=key("int", "users it ranks for", nullable=True))
    n_items: int | None = field(default=None, metadata=key("int", "items it ranks", nullable=True))
    device: str | None = field(
        default=None, metadata=key("string", "where it trained: cpu | cuda", nullable=True)
    )
    best_epoch: int | None = field(
        default=None, metadata=key("int", "the validation fit's best epoch", nullable=True)
    )
    best_validation_metric: float | None = field(
        default=None, metadata=key("number", "the early-stopping metric at that epoch", nullable=True)
    )
    epochs_run: int | None = field(
        default=None, metadata=key("int", "epochs of the validation fit", nullable=True)
    )
    refit_epochs: int | None = field(default=None, metadata=key("int", "epochs of the refit", nullable=True))
    seconds: float | None = field(
        default=None, metadata=key("number", "training time of both fits", nullable=True)
    )
    seconds_per_epoch: float | None = field(
        default=None, metadata=key("number", "of the validation fit", nullable=True)
    )
    peak_rss_mb: float | None = field(
        default=None, metadata=key("number", "peak resident memory while training", nullable=True)
    )
    peak_cuda_mb: float | None = field(
        default=None, metadata=key("number", "peak CUDA memory while training (null on CPU)", nullable=True)
    )
    mlflow_run_id: str | None = field(
        default=None, metadata=key("string", "the MLflow run that tracked the training", nullable=True)
    )


def write_meta(model_path: Path, meta: ModelMeta) -> Path:
    """Write ``model.json`` into a (staged) model directory."""
    path = Path(model_path) / MODEL_META.name
    path.write_text(json.dumps(document_json(meta), indent=2, default=str) + "\n")
    return path


def read_meta(model_path: Path) -> ModelMeta:
    path = Path(model_path) / MODEL_META.name
    return document_from_json(ModelMeta, json.loads(path.read_text()), path)


@dataclass
class ModelMetrics:
    """``models/ds=<d>/<model>/metrics.json``: a trained model's metrics on its bundle's held-out
    purchases (``training.evaluate``). Written by ``evaluate``; read by ``register`` (only an
    evaluated model is registered) and ``status``."""

    model: str = field(metadata=key("string", "model configuration, e.g. als_multi"))
    ds: str = field(metadata=key("string", "the training bundle's name (training/ds=<ds>)"))
    eval_mask: dict[str, str] | None = field(
        default=None, metadata=key("object", "the manifest's eval_mask: what each split masks", nullable=True)
    )
    validation: dict[str, dict[str, float | None]] | None = field(
        default=None,
        metadata=key(
            "object",
            "the validation fit on the validation split: setting -> {HR@K, NDCG@K, Recall@K, "
            "chance_HR@K for each K, users, candidates}; a setting without users has users 0 and "
            "every other value null; absent when the bundle has no validation pairs",
            optional=True,
        ),
    )
    test: dict[str, dict[str, float | None]] | None = field(
        default=None,
        metadata=key(
            "object", "the refit on the test split, as validation; absent without test pairs", optional=True
        ),
    )

    def splits(self) -> dict[str, dict[str, dict[str, float | None]]]:
        """Split -> setting -> metrics, for the splits evaluated."""
        return {s: v for s, v in (("validation", self.validation), ("test", self.test)) if v is not None}


def write_metrics(model_path: Path, metrics: ModelMetrics) -> Path:
    """Write a model directory's ``metrics.json`` (replaced as a whole: readers see the old or the new)."""
    path = Path(model_path) / MODEL_METRICS.name
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document_json(metrics), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_metrics(model_path: Path) -> ModelMetrics:
    path = Path(model_path) / MODEL_METRICS.name
    return document_from_json(ModelMetrics, json.loads(path.read_text()), path)


def events_dir(warehouse_root: Path) -> Path:
    return Path(warehouse_root) / EVENTS.name


def read_events(spark, warehouse_root: Path, sources, first: date, last: date):
    """Spark: the events of ``sources`` with ``first <= event_date <= last``, every column. The one
    Spark reader of the events table."""
    from pyspark.sql import functions as F

    df = EVENTS.read_spark(spark, events_dir(warehouse_root), "run `funnelrec ingest` first")
    return df.filter(
        F.col("source").isin(list(sources))
        & (F.col("event_date") >= F.lit(first))
        & (F.col("event_date") <= F.lit(last))
    )


def events_query(events_path: Path, sources) -> str:
    """DuckDB: a query of the events of ``sources`` under ``events_path`` (``events_dir``), every
    column, ``event_date`` a DATE. The one DuckDB reader of the events table."""
    listed = ", ".join("'" + str(s).replace("'", "''") + "'" for s in sources)
    return (
        "SELECT * REPLACE (CAST(event_date AS DATE) AS event_date) "
        f"FROM read_parquet('{events_path}/source=*/event_date=*/*.parquet', hive_partitioning = true) "
        f"WHERE source IN ({listed})"
    )


def quarantine_dir(quarantine_root: Path) -> Path:
    return Path(quarantine_root)


FORGET_REQUESTS = Table(
    "forget_requests",
    (
        column("request_id", "string", "one `forget` request (its users share it)"),
        column("user_id", "string", "a user whose rows were removed and whom ingest drops from now on"),
        column("source", "string", "the source mapping the id belongs to; null: every source", nullable=True),
        column("requested_at", "timestamp", "when the request was recorded (UTC)"),
    ),
    "Users forgotten on request (`forget`), one file per request. `ingest` drops their rows.",
)

#: A forgotten user's ``user_map`` row keeps its index under this id plus the index, so the indices
#: stay 0..n-1 (a model's shapes); no id the default ``ids.pattern`` accepts starts with ``!``.
FORGOTTEN_ID_PREFIX = "!forgotten:"


def forget_requests_dir(warehouse_root: Path) -> Path:
    """``forget_requests/``: one Parquet file per request (``forget``), read by ``ingest``."""
    return Path(warehouse_root) / FORGET_REQUESTS.name


ALL_TABLES: tuple[Table, ...] = (
    EVENTS,
    QUARANTINE,
    SESSIONS,
    SESSION_EVENTS,
    INTERACTIONS,
    VISITED,
    HELDOUT,
    USER_MAP,
    ITEM_MAP,
    TRAIN_EVENTS,
    SERVING_CONTEXT,
    CATALOGUE,
    SCORES,
    DECISIONS,
    MODEL_RUNS,
    FORGET_REQUESTS,
)


def scores_dir(warehouse_root: Path) -> Path:
    """Published scores: ``scores/ds=<d>/`` (what analysts and the DuckDB views read)."""
    return Path(warehouse_root) / SCORES.name


def scores_partition_dir(warehouse_root: Path, ds: date | str) -> Path:
    """``scores/ds=<d>/``: the published scores of one date."""
    return scores_dir(warehouse_root) / f"ds={ds}"


def published_dates(warehouse_root: Path) -> list[date]:
    """Dates with published scores (``scores/ds=<d>``), oldest first."""
    root = scores_dir(warehouse_root)
    found = [p.name.removeprefix("ds=") for p in root.glob("ds=*") if p.is_dir()] if root.exists() else []
    return sorted(date.fromisoformat(d) for d in found)


SCORES_STAGED, REPORTS = "scores_staged", "reports"


def scores_staged_dir(warehouse_root: Path, ds: date | str) -> Path:
    """Scores of a date written by `score`, validated, then moved into ``scores/`` by `publish`."""
    return Path(warehouse_root) / SCORES_STAGED / f"ds={ds}"


def analytics_db(warehouse_root: Path) -> Path:
    """The analysts' DuckDB file (views over the published Parquet plus small dimension tables)."""
    return Path(warehouse_root) / "analytics" / "funnelrec.duckdb"


def report_path(warehouse_root: Path, ds: date | str) -> Path:
    return Path(warehouse_root) / REPORTS / f"ds={ds}" / "report.html"


def validation_result_path(warehouse_root: Path, table: str, ds: date | str) -> Path:
    """Where ``validate`` writes a suite's result JSON (MLflow attaches the training inputs' ones)."""
    return validation_results_dir(warehouse_root) / table / f"ds={ds}" / "result.json"


def validation_results_dir(warehouse_root: Path) -> Path:
    """``validation/<table>/ds=<d>/``: the suites' result files, one folder per table checked."""
    return Path(warehouse_root) / "validation"


#: What the pipeline's steps name in ``reads``, ``writes`` and ``checks`` (``infra/pipeline.py``)
#: besides the tables and bundles above: name -> where it is and what declares its shape.
#: ``<model>`` stands for a model's name (``{model}`` in a per-model step).
STEP_ENTRIES: dict[str, str] = {
    "raw_logs": "the sources' files under paths.data_root, read through a source mapping (jobs/sources/)",
    f"{MODELS}/<model>": "model_dir(): one trained model (MODEL_FILES, ModelMeta)",
    "metrics/<model>": "the model's metrics.json (ModelMetrics)",
    SCORES_STAGED: "scores_staged_dir(): the scores of a date before their suite (SCORES' columns)",
    "registry": "the MLflow registered model mlflow.registered_model: its versions and their tags",
    "champion": "the registry's @champion alias (what `score` serves)",
    "ranker": "the ranker's registered model ranking.registered_model: versions tagged with the retriever "
    "version they re-rank, and its @champion (served over that retriever only)",
    "analytics": "analytics_db(): the analysts' DuckDB file",
    "report": "report_path(): the daily HTML report",
    "validation/<table>": "validation_result_path(): a suite's result JSON, and the Data Docs",
}


def step_entry_names() -> set[str]:
    """Every name a pipeline step may read, write or check."""
    bundles = {b.name for b in (SESSIONIZED, SERVING, TRAINING)}
    return {t.name for t in ALL_TABLES} | bundles | set(STEP_ENTRIES)
