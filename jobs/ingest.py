"""Ingest: raw logs + a source mapping -> canonical ``events`` and ``quarantine``.

Every input line ends up in exactly one place: the events table, the quarantine (with file, line
number, raw text and reason), the duplicate count, for snapshot sources the rows dated after the
run date that a later run will publish (``deferred``), or, for users forgotten on request
(``forget``), nowhere but a count (``forgotten``). Above ``ingest.max_bad_fraction`` the
run fails and publishes no events; the quarantine partition is still written so the failure can
be inspected.

``parse_lines`` is the pure transform (lines -> parsed rows with a reason); ``run_ingest`` does the
I/O at the edges.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from infra import atomic
from infra.logs import stage
from infra.settings import Settings
from infra.tables import EVENTS, QUARANTINE, events_dir, quarantine_dir
from jobs.forget import forgotten_users
from jobs.sources import (
    CANONICAL_FIELDS,
    NOT_IDS,
    SourceMapping,
    load_mapping,
    read_first_line,
    read_header,
)

#: Quarantine reasons, in the order they are tested (the first that applies is recorded).
REASONS = {
    "wrong_field_count": "the line has a different number of fields than the header/columns",
    "truncated_last_line": "the last line of a file is incomplete (a cut-off write)",
    "missing_user_id": "user id is empty",
    "missing_item_id": "item id is empty",
    "bad_id": (
        "an id does not look like one: not the mapping's ids.pattern, longer than ids.max_length, a "
        "float word (nan, inf, null, ...), digits beyond a 64-bit integer, or, declared float-like, "
        "not a non-negative integral number"
    ),
    "missing_time": "event time is empty",
    "unparseable_time": "event time does not match the mapping's unit/format",
    "time_out_of_range": "event time is before the mapping's time.not_before",
    "time_in_future": "event time is later than the wall clock plus ingest.future_margin_minutes",
    "unknown_behavior": "behaviour value is not in the mapping's behaviors",
    "non_numeric_price": "price is not a finite number",
    "negative_price": "price is below zero",
    "after_run_date": "event time is after the end of the run date (daily sources)",
    "late_arrival": "event date is before the run date in a daily drop",
    "truncated_file": "a gzip file ends before its stream does (a cut-off copy); the lines before the cut were read",
}
DEFERRED = "deferred"  # snapshot source rows dated after the run date: published by a later run
FORGOTTEN = "forgotten"  # rows of users forgotten on request: neither published nor quarantined


class BadInputError(RuntimeError):
    """Too many rows were refused; nothing was published."""


@dataclass
class IngestResult:
    source: str
    run_date: date
    files: list[str]
    rows_in: int
    rows_out: int
    duplicates: int
    deferred: int
    quarantined: dict[str, int] = field(default_factory=dict)
    partitions: list[str] = field(default_factory=list)
    users: int = 0
    items: int = 0
    empty_files: list[str] = field(default_factory=list)
    forgotten: int = 0

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "run_date": self.run_date.isoformat(),
            "files": self.files,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "duplicates": self.duplicates,
            "deferred": self.deferred,
            "quarantined": self.quarantined,
            "partitions": self.partitions,
            "users": self.users,
            "items": self.items,
            "empty_files": self.empty_files,
            "forgotten": self.forgotten,
        }


def _blank_to_null(col):
    trimmed = F.trim(col)
    return F.when(trimmed == "", F.lit(None)).otherwise(trimmed)


def _parse_time(raw, spec) -> F.Column:
    if spec.unit is not None:
        factor = {"s": 1_000_000, "ms": 1_000, "us": 1}[spec.unit]
        micros = F.round(raw.try_cast("double") * F.lit(factor)).try_cast("long")
        return F.timestamp_micros(micros)
    ts = F.try_to_timestamp(raw, F.lit(spec.format))
    return ts if spec.zone.upper() == "UTC" else F.to_utc_timestamp(ts, spec.zone)


def _id_ok(col, spec) -> F.Column:
    """Whether a (non-null) id looks like one by ``spec`` (``IdSpec``)."""
    digits = col.rlike(r"^[0-9]+$")
    return (
        (F.length(col) <= spec.max_length)
        & col.rlike(f"^(?:{spec.pattern})$")
        & ~F.lower(col).isin(*NOT_IDS)
        & (~digits | col.try_cast("long").isNotNull())
    )


def parse_lines(
    lines: DataFrame,
    mapping: SourceMapping,
    header: list[str],
    run_date: date,
    now: datetime | None = None,
    future_margin: timedelta = timedelta(hours=1),
    forgotten: list[str] | None = None,
) -> DataFrame:
    """Parse raw text lines into canonical columns plus a ``reason`` (null when the row is good).

    Args:
        lines: rows with ``value`` (the line) and any carried columns (file, offsets).
        mapping: the source mapping.
        header: field names in file order (from the header line or ``format.columns``).
        run_date: the run date; rows after its end are ``after_run_date`` or ``deferred``.
        now: the wall clock (default: now); rows later than ``now + future_margin`` are
            ``time_in_future`` (a millisecond epoch read as seconds lands in the year 49,000), while
            rows between the run date and then stay ``deferred`` (snapshot sources: backfills).
        future_margin: clock skew allowed between the writer of the log and this machine.
        forgotten: user ids forgotten on request: their rows get the reason ``forgotten`` (before
            any other), as do refused lines that hold one of the ids as a whole token.

    Returns:
        ``lines``' columns plus the canonical event columns, ``event_date``, ``reason``, ``detail``.
    """
    fmt = mapping.format
    n = len(header)
    ddl = ", ".join(f"`f{i}` string" for i in range(n))
    fields = F.from_csv(F.col("value"), ddl, {"sep": fmt.delimiter, "quote": fmt.quote, "mode": "PERMISSIVE"})
    # from_csv pads short lines with nulls and drops extra fields, so count fields separately:
    # strip quoted sections (which may hold the delimiter), then count the delimiters left.
    q = "\\" + fmt.quote
    # (most lines hold no quote at all: only those pay for the regex)
    unquoted = F.when(
        F.col("value").contains(fmt.quote), F.regexp_replace(F.col("value"), f"{q}([^{q}]|{q}{q})*{q}", "")
    ).otherwise(F.col("value"))
    removed = F.length(unquoted) - F.length(F.replace(unquoted, F.lit(fmt.delimiter), F.lit("")))
    n_fields = (removed / len(fmt.delimiter)).cast("int") + 1

    def src(canonical: str):
        name = mapping.columns.get(canonical)
        return _blank_to_null(fields[f"f{header.index(name)}"]) if name else F.lit(None).cast("string")

    df = lines.withColumn("_n_fields", n_fields)
    raw = {c: src(c) for c in CANONICAL_FIELDS}
    df = df.select("*", *(raw[c].alias(f"_raw_{c}") for c in raw))

    ids = {}
    for c in ("user_id", "item_id", "category_id"):
        col = F.col(f"_raw_{c}")
        if c in mapping.float_ids:
            # 266079.0 -> 266079; 266079.5 is not an id.
            ids[c] = F.when(col.rlike(r"^\d+(\.0*)?$"), F.regexp_replace(col, r"\.0*$", "")).otherwise(
                F.when(col.isNull(), F.lit(None)).otherwise(F.lit("\u0000bad"))
            )
        else:
            ids[c] = col
    behavior_map = F.create_map(*[F.lit(x) for kv in mapping.behaviors.items() for x in kv])
    event_time = _parse_time(F.col("_raw_event_time"), mapping.time)
    price = F.col("_raw_price").try_cast("double")
    # try_cast reads "NaN", "Infinity" and "inf" as numbers; a price is a finite one.
    price = F.when(F.isnan(price) | F.abs(price).eqNullSafe(float("inf")), F.lit(None)).otherwise(price)
    df = df.select(
        "*",
        ids["user_id"].alias("user_id"),
        ids["item_id"].alias("item_id"),
        ids["category_id"].alias("category_id"),
        behavior_map[F.col("_raw_behavior")].alias("behavior"),
        event_time.alias("event_time"),
        price.alias("price"),
        F.col("_raw_brand").alias("brand"),
        F.col("_raw_source_session_id").alias("source_session_id"),
    ).withColumn("event_date", F.to_date("event_time"))

    end_of_run = datetime.combine(run_date + timedelta(days=1), time(0), tzinfo=UTC)
    not_before = mapping.time.not_before
    checks = [
        (
            F.col("_n_fields") != n,
            "wrong_field_count",
            F.concat(F.lit(f"expected {n} fields, got "), F.col("_n_fields").cast("string")),
        ),
        (F.col("user_id").isNull(), "missing_user_id", F.lit(None)),
        (F.col("item_id").isNull(), "missing_item_id", F.lit(None)),
        (
            (F.col("user_id") == "\u0000bad")
            | (F.col("item_id") == "\u0000bad")
            | (F.col("category_id") == "\u0000bad")
            | ~_id_ok(F.col("user_id"), mapping.ids)
            | ~_id_ok(F.col("item_id"), mapping.ids)
            | (F.col("category_id").isNotNull() & ~_id_ok(F.col("category_id"), mapping.ids)),
            "bad_id",
            F.concat_ws("|", "_raw_user_id", "_raw_item_id", "_raw_category_id"),
        ),
        (F.col("_raw_event_time").isNull(), "missing_time", F.lit(None)),
        (F.col("event_time").isNull(), "unparseable_time", F.col("_raw_event_time")),
        (
            F.col("event_time") < F.lit(datetime.combine(not_before, time(0), tzinfo=UTC))
            if not_before
            else F.lit(False),
            "time_out_of_range",
            F.col("event_time").cast("string"),
        ),
        (
            F.col("event_time") > F.lit((now or datetime.now(UTC)) + future_margin),
            "time_in_future",
            F.col("_raw_event_time"),
        ),
        (F.col("behavior").isNull(), "unknown_behavior", F.col("_raw_behavior")),
        (F.col("_raw_price").isNotNull() & F.col("price").isNull(), "non_numeric_price", F.col("_raw_price")),
        (F.col("price") < 0, "negative_price", F.col("_raw_price")),
        (
            F.col("event_time") >= F.lit(end_of_run),
            "after_run_date" if mapping.is_daily else DEFERRED,
            F.col("event_time").cast("string"),
        ),
    ]
    if mapping.is_daily:
        checks.append(
            (F.col("event_date") < F.lit(run_date), "late_arrival", F.col("event_date").cast("string"))
        )
    reason = F.lit(None).cast("string")
    detail = F.lit(None).cast("string")
    for cond, name, det in reversed(checks):
        reason = F.when(cond, F.lit(name)).otherwise(reason)
        detail = F.when(cond, det).otherwise(detail)
    if forgotten:
        from jobs.forget import token_pattern

        # A refused line may have no readable user field: its raw text is searched instead.
        gone = F.col("_raw_user_id").isin(forgotten) | F.col("user_id").isin(forgotten)
        gone = gone | (reason.isNotNull() & F.col("value").rlike(token_pattern(forgotten)))
        reason = F.when(gone, F.lit(FORGOTTEN)).otherwise(reason)
        detail = F.when(gone, F.lit(None)).otherwise(detail)
    df = df.withColumn("reason", reason).withColumn("detail", detail)
    return df.drop(*[c for c in df.columns if c.startswith("_raw_") or c == "_n_fields"])


def _is_empty(path: Path) -> bool:
    """No byte at all (after decompression): a file that was created and never written."""
    if path.stat().st_size == 0:
        return True
    if str(path).endswith(".gz"):
        try:
            with gzip.open(path, "rb") as fh:
                return fh.read(1) == b""
        except (EOFError, OSError):
            return False  # cut off or not gzip: Spark's read says so
    return False


def _shown(header: list[str]) -> str:
    """A header for an error line: garbage read as text can be thousands of characters."""
    text = repr(header)
    return text if len(text) <= 200 else text[:200] + f"... ({len(text)} characters)"


def _truncated_stream(exc: BaseException) -> bool:
    """Whether a Spark failure is Hadoop's gzip codec meeting the end of a cut-off stream."""
    text = str(exc)
    return "Unexpected end of input stream" in text or "java.io.EOFException" in text


class _ReadFiles:
    """The files of one ingest: what Spark reads for each (the file, or the readable part of a
    cut-off gzip copied to scratch), each file's size and mtime when listed, and the quarantine rows
    the files themselves earn."""

    def __init__(self, files: list[Path]):
        self.files = list(files)
        self.read_as: dict[Path, Path] = {f: f for f in files}
        self.listed = {f: _signature(f) for f in files}
        self.cut: dict[Path, int] = {}  # gzip file -> complete lines before its stream ends

    def paths(self) -> list[Path]:
        return [self.read_as[f] for f in self.files]

    def names(self) -> dict[str, str]:
        """URI Spark reports for each copy -> the file's own URI."""
        return {p.resolve().as_uri(): f.resolve().as_uri() for f, p in self.read_as.items() if p != f}

    def changed(self) -> list[str]:
        return [str(f) for f in self.files if _signature(f) != self.listed[f]]

    def unterminated(self) -> list[str]:
        """URIs of the files whose last line may have no line ending: a plain file (or a salvaged
        copy) by its last byte; a gzip always, since telling would mean decompressing it."""
        out = []
        for f in self.files:
            if str(self.read_as[f]).endswith(".gz"):
                out.append(f.resolve().as_uri())  # cannot tell without decompressing: as before
            elif self.read_as[f].stat().st_size and _last_byte(self.read_as[f]) not in (b"\n", b"\r"):
                out.append(f.resolve().as_uri())
        return out

    def salvage(self, scratch: Path) -> bool:
        """Copy the readable part of every cut-off gzip to ``scratch``; False when there is none
        left to copy (the failure was something else)."""
        found = False
        for f in self.files:
            if not str(f).endswith(".gz") or f in self.cut:
                continue
            scratch.mkdir(parents=True, exist_ok=True)
            copy = scratch / f"{len(self.cut)}-{f.name.removesuffix('.gz')}"
            lines = _gunzip_prefix(f, copy)
            if lines is None:
                copy.unlink()
                continue
            found = True
            self.read_as[f] = copy
            self.cut[f] = lines
        return found

    def truncated_rows(self) -> list[tuple]:
        """One quarantine row per cut-off gzip (file, line number after the last read, no raw
        line, reason, detail)."""
        return [
            (
                f.resolve().as_uri(),
                n + 1,
                None,
                "truncated_file",
                f"gzip stream ends after {n} complete lines",
            )
            for f, n in self.cut.items()
        ]


def _gunzip_prefix(path: Path, out: Path) -> int | None:
    """Decompress ``path`` into ``out`` as far as its stream goes (every member of a multi-member
    gzip); the complete lines written when the stream is cut off, None when it is whole."""
    lines, pending = 0, False
    decompressor = zlib.decompressobj(wbits=31)
    with open(path, "rb") as src, open(out, "wb") as dst:
        while chunk := src.read(1 << 20):
            while chunk:
                data = decompressor.decompress(chunk)
                dst.write(data)
                lines += data.count(b"\n")
                pending = not decompressor.eof
                if decompressor.eof:
                    chunk = decompressor.unused_data
                    decompressor = zlib.decompressobj(wbits=31)
                else:
                    chunk = b""
    return lines if pending else None


def _signature(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


def _read_lines(
    spark: SparkSession, files: list[Path], header_lines: set[str], names: dict[str, str] | None = None
) -> DataFrame:
    """Raw lines with file, split offset and a per-split ordinal (for line numbers later); ``names``
    maps the URI of a file read in another's place (a salvaged copy) to that file's."""
    file = F.input_file_name()
    if names:
        file = F.coalesce(F.create_map(*[F.lit(x) for kv in names.items() for x in kv])[file], file)
    lines = spark.read.text([str(f) for f in files]).select(
        file.alias("file"),
        F.input_file_block_start().alias("_block"),
        F.monotonically_increasing_id().alias("_mid"),
        F.col("value"),
    )
    lines = lines.withColumn(
        "_is_header", F.col("value").isin(list(header_lines)) if header_lines else F.lit(False)
    )
    return lines


def _line_numbers(chunks: DataFrame) -> DataFrame:
    """Per (file, split): the line number of its first line and whether it is the file's last split.

    Each split of a file is read by one task in order, so a line's number is the lines in earlier
    splits of the same file plus its ordinal within its own split.
    """
    w = Window.partitionBy("file").orderBy("_block")
    return (
        chunks.withColumn("_first_line", F.sum("_lines").over(w) - F.col("_lines") + 1)
        .withColumn("_last_split", F.col("_block") == F.max("_block").over(Window.partitionBy("file")))
        .select("file", "_block", "_first_line", "_min_mid", "_max_mid", "_last_split")
    )


def ingest_source(spark: SparkSession, settings: Settings, source: str, run_date: date) -> IngestResult:
    """Ingest one source for one run date; publish its event partitions and quarantine atomically."""
    mapping = load_mapping(source, settings.paths.data_root)
    files = mapping.files(settings.paths.data_root, run_date)
    if not files:
        raise FileNotFoundError(
            f"source {mapping.name}: no input files for {run_date} matching "
            f"{Path(settings.paths.data_root) / mapping.path}"
        )
    with stage("ingest", source=mapping.name, date=run_date.isoformat()) as counts:
        empty = [f for f in files if _is_empty(f)]
        files = [f for f in files if f not in empty]
        header_lines: set[str] = set()
        if not files:
            # Nothing but empty files: nothing to publish, and nothing is wrong with that alone (the
            # events suite judges whether the date has enough events).
            counts.update(rows_in=0, rows_out=0, empty_files=len(empty))
            return IngestResult(mapping.name, run_date, [], 0, 0, 0, 0, empty_files=[str(f) for f in empty])
        if mapping.format.header:
            headers = {}
            for f in files:
                names = read_header(f, mapping.format.delimiter)
                headers[str(f)] = names
                header_lines.add(read_first_line(f))
            distinct = {tuple(h) for h in headers.values()}
            if len(distinct) > 1:
                shown = {f: _shown(h) for f, h in headers.items()}
                raise BadInputError(f"source {mapping.name}: files disagree on their header: {shown}")
            header = list(distinct.pop())
            if mapping.format.columns and mapping.format.columns != header:
                raise BadInputError(
                    f"source {mapping.name}: header {_shown(header)} differs from format.columns "
                    f"{mapping.format.columns} ({', '.join(map(str, files))})"
                )
            missing = [c for c in mapping.columns.values() if c not in header]
            if missing:
                raise BadInputError(
                    f"source {mapping.name}: header {_shown(header)} lacks mapped columns {missing} "
                    f"({', '.join(map(str, files))})"
                )
        else:
            header = list(mapping.format.columns or [])

        margin = timedelta(minutes=settings.ingest.future_margin_minutes)
        forgotten = forgotten_users(settings.paths.warehouse_root, mapping.name)
        read = _ReadFiles(files)
        with atomic.scratch_dir(Path(settings.paths.warehouse_root), f"ingest-{mapping.name}") as scratch:
            while True:
                lines = _read_lines(spark, read.paths(), header_lines, read.names())
                # Cached: uncached, the filters below are pushed into the parse and the optimised
                # plan repeats it (bench/README.md, "Measurements behind the jobs' comments").
                parsed = parse_lines(
                    lines, mapping, header, run_date, future_margin=margin, forgotten=forgotten
                )
                # Only refused rows need their raw text (for the quarantine); dropping it from the
                # others halves what the cache holds.
                parsed = parsed.withColumn("value", F.when(F.col("reason").isNotNull(), F.col("value")))
                parsed = parsed.persist(StorageLevel.MEMORY_AND_DISK)
                try:
                    result = _publish(spark, settings, mapping, run_date, read, parsed)
                    break
                except Exception as exc:
                    # A gzip cut off mid-stream fails the Spark job; read the part before the cut.
                    if not _truncated_stream(exc) or not read.salvage(scratch):
                        raise
                finally:
                    parsed.unpersist()
        result.empty_files = [str(f) for f in empty]
        counts.update(
            rows_in=result.rows_in,
            rows_out=result.rows_out,
            quarantined=result.quarantined_total,
            duplicates=result.duplicates,
            deferred=result.deferred,
            forgotten=result.forgotten,
            partitions=len(result.partitions),
            users=result.users,
            items=result.items,
            empty_files=len(empty),
            **{f"q_{k}": v for k, v in sorted(result.quarantined.items())},
        )
    return result


def _publish(spark, settings, mapping, run_date, read: _ReadFiles, parsed) -> IngestResult:
    stats = (
        parsed.groupBy("file", "_block", "_is_header", "reason")
        .agg(F.count("*").alias("n"), F.min("_mid").alias("mn"), F.max("_mid").alias("mx"))
        .collect()
    )
    # Every line is in the cache now: a file that changed since it was listed was read half old,
    # half new.
    changed = read.changed()
    if changed:
        raise BadInputError(
            f"source {mapping.name} on {run_date}: {', '.join(changed)} changed while it was read; "
            "nothing published. Run again once the writer has finished."
        )
    files = read.files
    chunk_rows: dict[tuple, list] = {}
    by_reason: dict[str | None, int] = {}
    for r in stats:
        key = (r["file"], r["_block"])
        agg = chunk_rows.setdefault(key, [0, r["mn"], r["mx"]])
        agg[0] += r["n"]
        agg[1], agg[2] = min(agg[1], r["mn"]), max(agg[2], r["mx"])
        if not r["_is_header"]:
            by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + r["n"]
    rows_in = sum(by_reason.values())
    chunks = spark.createDataFrame(
        [(f, b, n, mn, mx) for (f, b), (n, mn, mx) in chunk_rows.items()],
        "file string, _block long, _lines long, _min_mid long, _max_mid long",
    )
    offsets = _line_numbers(chunks)

    bad = parsed.filter(~F.col("reason").isin(DEFERRED, FORGOTTEN) & ~F.col("_is_header"))
    unterminated = read.unterminated()
    bad = bad.join(F.broadcast(offsets), ["file", "_block"]).select(
        F.col("file"),
        (F.col("_first_line") + F.col("_mid") - F.col("_min_mid")).alias("line_number"),
        F.col("value").alias("raw_line"),
        F.when(
            (F.col("reason") == "wrong_field_count")
            & F.col("_last_split")
            & (F.col("_mid") == F.col("_max_mid"))
            & F.col("file").isin(unterminated),
            F.lit("truncated_last_line"),
        )
        .otherwise(F.col("reason"))
        .alias("reason"),
        F.col("detail"),
    )
    cut = read.truncated_rows()
    if cut:
        bad = bad.unionByName(spark.createDataFrame(cut, bad.schema))
        for _, _, _, reason, _ in cut:
            by_reason[reason] = by_reason.get(reason, 0) + 1
    quarantined: dict[str, int] = {}
    if any(r not in (None, DEFERRED, FORGOTTEN) for r in by_reason):
        qdir = (
            quarantine_dir(settings.paths.quarantine_root) / f"source={mapping.name}" / f"run_date={run_date}"
        )
        with atomic.staged_dir(qdir) as staged:
            bad.select(*QUARANTINE.data_columns).coalesce(1).sortWithinPartitions(
                "file", "line_number"
            ).write.parquet(str(staged))
        qdf = spark.read.parquet(str(qdir))
        quarantined = {r["reason"]: r["count"] for r in qdf.groupBy("reason").count().collect()}
    deferred = by_reason.get(DEFERRED, 0)
    forgotten = by_reason.get(FORGOTTEN, 0)
    good = by_reason.get(None, 0)
    bad_total = sum(quarantined.values())
    fraction = bad_total / rows_in if rows_in else 0.0
    if fraction > settings.ingest.max_bad_fraction:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(quarantined.items(), key=lambda kv: -kv[1]))
        raise BadInputError(
            f"source {mapping.name} on {run_date}: {bad_total} of {rows_in} rows ({fraction:.2%}) refused, "
            f"above ingest.max_bad_fraction={settings.ingest.max_bad_fraction:.2%}; no events published. "
            f"Reasons: {detail}. Rows are in {quarantine_dir(settings.paths.quarantine_root)}"
            f"/source={mapping.name}/run_date={run_date}"
        )

    # Range-partitioned by date, each date lands in one task: the duplicate check (grouping by
    # every column, the date among them) reuses that layout instead of shuffling the events again,
    # and the write gives one sorted file per date, so reruns write the same bytes. The explicit
    # partition count keeps adaptive execution from coalescing the dates into fewer, longer tasks.
    events = (
        parsed.filter(F.col("reason").isNull() & ~F.col("_is_header"))
        .select(*[c for c in EVENTS.column_names if c not in ("source",)])
        .repartitionByRange(int(spark.conf.get("spark.sql.shuffle.partitions")), "event_date")
        .dropDuplicates([c for c in EVENTS.column_names if c != "source"])
    )
    events = events.sortWithinPartitions(
        "event_date",
        "event_time",
        "user_id",
        "item_id",
        "behavior",
        "category_id",
        "brand",
        "price",
        "source_session_id",
    )
    if good == 0:  # nothing to publish (empty or all-refused files): no partition is touched
        return IngestResult(
            mapping.name,
            run_date,
            [str(f) for f in files],
            rows_in,
            0,
            0,
            deferred,
            quarantined,
            forgotten=forgotten,
        )
    target = events_dir(settings.paths.warehouse_root) / f"source={mapping.name}"
    with atomic.scratch_dir(target.parent, mapping.name) as staged:
        events.write.partitionBy("event_date").parquet(str(staged))
        written = spark.read.parquet(str(staged))
        summary = written.agg(
            F.count("*").alias("n"),
            F.countDistinct("user_id").alias("users"),
            F.countDistinct("item_id").alias("items"),
        ).first()
        partitions = [str(p.relative_to(target)) for p in atomic.publish_partitions(staged, target)]
    return IngestResult(
        source=mapping.name,
        run_date=run_date,
        files=[str(f) for f in files],
        rows_in=rows_in,
        rows_out=summary["n"],
        duplicates=good - summary["n"],
        deferred=deferred,
        quarantined=quarantined,
        partitions=partitions,
        users=summary["users"],
        items=summary["items"],
        forgotten=forgotten,
    )


def run_ingest(
    spark: SparkSession, settings: Settings, run_date: date, sources: list[str] | None = None
) -> list[IngestResult]:
    """Ingest every configured source (or ``sources``) for ``run_date``."""
    results = [ingest_source(spark, settings, s, run_date) for s in (sources or settings.pipeline.sources)]
    return results


def summary_json(results: list[IngestResult]) -> str:
    return json.dumps([r.to_dict() for r in results], indent=2)
