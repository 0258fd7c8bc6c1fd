"""``forget``: remove users' rows from every table that holds them, on request, and remember the
request so that a later ingest of old raw files drops them again.

The request is recorded first (``forget_requests``), so a run stopped half-way is finished by
running it again, and ``ingest`` drops the users' rows from then on (``forgotten`` in its counts:
neither events nor quarantine). Then every partition or bundle that holds one of the users is
rewritten without them, each atomically (``infra.atomic``: a reader sees the old folder or the new
one, never a mix); one that holds none is not touched, so a second run changes nothing:

==============================  =================================================================
``events/source=S/event_date=D``  the users' events (of source ``S`` only, when the request names one)
``quarantine/source=S/run_date=D``  refused rows whose raw line holds one of the ids as a whole token
                                (between characters an id cannot hold): a refused row may not have
                                a readable user field, so this errs on the side of removing
``sessionized/ds=D``            the users' sessions and session events
``training/ds=D``               the users' rows of interactions, visited, heldout and train_events;
                                their ``user_map`` row keeps its index under ``FORGOTTEN_ID_PREFIX``
                                plus the index (indices stay 0..n-1), and the manifest's checksums
                                and stats are computed again as ``split`` computes them
``serving/ds=D``                the users' serving context (the catalogue holds counts only)
``scores/ds=D``, ``scores_staged/ds=D``  the users' recommendations
``analytics/funnelrec.duckdb``  rebuilt for the latest published date (``dim_users`` is a table;
                                the views read the Parquet above)
==============================  =================================================================

Not rewritten: models, and the MLflow runs and registered versions that log them with their
training tables (a model trained on the old tables refuses the new ones: it ages out with
``retention``); Great Expectations results and Data Docs, which may quote sample values; benchmark
and in-memory bundles (``training/ds=<name>`` of kinds other than ``events``: not this shop's users).

Rows are filtered with Arrow, file by file and batch by batch, so memory stays bounded by a batch
and each file keeps its schema and row order; Spark is started only to recompute the manifest of a
training bundle that changed.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra import atomic
from infra.logs import stage
from infra.settings import Settings
from infra.tables import (
    EVENTS_BUNDLE,
    FORGET_REQUESTS,
    FORGOTTEN_ID_PREFIX,
    MANIFEST_FILE,
    SCORES_STAGED,
    SERVING,
    SERVING_CONTEXT,
    SESSION_EVENTS,
    SESSIONIZED,
    SESSIONS,
    TRAINING,
    USER_MAP,
    events_dir,
    forget_requests_dir,
    published_dates,
    quarantine_dir,
    read_manifest,
    scores_dir,
    write_manifest,
)

BATCH_ROWS = 65_536
#: Characters an id may hold under the default ``ids.pattern``: a quarantined line's tokens are the
#: runs of these, and an id is found in it only as a whole token.
_ID_CHARS = r"0-9A-Za-z_.:\-"
#: Tables of the training bundle that hold rows per user (by ``user_idx``).
_USER_ROWS = ("interactions", "visited", "heldout", "train_events")


@dataclass
class ForgetResult:
    request_id: str
    users: int
    #: table -> rows removed
    removed: dict[str, int] = field(default_factory=dict)
    #: folders rewritten, relative to the warehouse (or the quarantine root)
    rewritten: list[str] = field(default_factory=list)
    analytics_rebuilt: bool = False

    def to_dict(self) -> dict:
        return {
            "request_id": self.request_id,
            "users": self.users,
            "removed": self.removed,
            "rewritten": self.rewritten,
            "analytics_rebuilt": self.analytics_rebuilt,
        }


def read_user_list(path: Path) -> list[str]:
    """User ids from a file: one per line; blank lines and lines starting with ``#`` are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


# -- the requests ----------------------------------------------------------------------------------
def record_request(settings: Settings, users: list[str], source: str | None) -> str:
    """Append one request to ``forget_requests`` (a new file, renamed into place); returns its id."""
    request_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    at = datetime.now(UTC)
    table = pa.Table.from_pylist(
        [{"request_id": request_id, "user_id": u, "source": source, "requested_at": at} for u in users],
        schema=FORGET_REQUESTS.arrow_schema(),
    )
    root = forget_requests_dir(settings.paths.warehouse_root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{request_id}.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, root / f"request-{request_id}.parquet")
    return request_id


def forgotten_users(warehouse_root: Path, source: str) -> list[str]:
    """Every user id forgotten for ``source`` (requests naming it or no source), sorted."""
    root = forget_requests_dir(warehouse_root)
    files = sorted(root.glob("request-*.parquet")) if root.is_dir() else []
    if not files:
        return []
    table = pa.concat_tables(pq.read_table(f, columns=["user_id", "source"]) for f in files)
    mask = pc.or_kleene(pc.is_null(table["source"]), pc.equal(table["source"], source))
    return sorted(set(table.filter(pc.fill_null(mask, False))["user_id"].to_pylist()))


def token_pattern(ids: Iterable[str]) -> str:
    """A regular expression (Java, Python and RE2 alike) that finds any of ``ids`` as a whole token."""
    alternatives = "|".join(re.escape(i) for i in sorted(set(ids), key=lambda i: (-len(i), i)))
    return rf"(?:^|[^{_ID_CHARS}])(?:{alternatives})(?:[^{_ID_CHARS}]|$)"


# -- rewriting a folder of Parquet files ---------------------------------------------------------
Mask = Callable[[pa.Table], pa.Array]  # rows to remove (true) of a batch


def _parquet_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.parquet") if p.is_file())


def _count(folder: Path, columns: list[str], mask: Mask) -> int:
    n = 0
    for f in _parquet_files(folder):
        for batch in pq.ParquetFile(f).iter_batches(BATCH_ROWS, columns=columns):
            n += pc.sum(mask(pa.Table.from_batches([batch]))).as_py() or 0
    return n


def _write_filtered(src: Path, dst: Path, mask: Mask) -> int:
    """Copy the Parquet files of ``src`` into the new folder ``dst`` without the rows ``mask``
    selects, file by file, keeping each file's name, schema and row order. Returns rows removed."""
    dst.mkdir(parents=True, exist_ok=True)
    removed = 0
    for f in _parquet_files(src):
        pf = pq.ParquetFile(f)
        # Spark writes timestamps as INT96 by default; Arrow reads them as nanoseconds and would
        # write those back as a type Spark cannot read: keep the file's own encoding.
        int96 = any(pf.schema.column(i).physical_type == "INT96" for i in range(len(pf.schema)))
        with pq.ParquetWriter(dst / f.name, pf.schema_arrow, use_deprecated_int96_timestamps=int96) as out:
            for batch in pf.iter_batches(BATCH_ROWS):
                t = pa.Table.from_batches([batch], schema=pf.schema_arrow)
                drop = mask(t)
                removed += pc.sum(drop).as_py() or 0
                out.write_table(t.filter(pc.invert(drop)))
    return removed


def _link_or_copy(src: Path, dst: Path) -> None:
    """Put the unchanged folder ``src`` at ``dst`` (hard links: published files are never written
    in place; copies where the filesystem cannot link). Hadoop's ``.crc`` side files are left out."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name.endswith(".crc"):
            continue
        if p.is_dir():
            _link_or_copy(p, dst / p.name)
            continue
        try:
            os.link(p, dst / p.name)
        except OSError:
            shutil.copy2(p, dst / p.name)


def _rewrite_partition(folder: Path, columns: list[str], mask: Mask) -> int:
    """Rewrite one partition folder without the rows ``mask`` selects, atomically; untouched (0)
    when it holds none."""
    if _count(folder, columns, mask) == 0:
        return 0
    with atomic.staged_dir(folder) as staged:
        return _write_filtered(folder, staged, mask)


def _in(column: str, values: pa.Array) -> Mask:
    return lambda t: pc.fill_null(pc.is_in(t[column], value_set=values), False)


def _leaves(root: Path, depth: int) -> list[Path]:
    """Partition folders ``depth`` levels below ``root`` (hidden and staging folders skipped)."""
    level = [root] if root.is_dir() else []
    for _ in range(depth):
        level = [
            c for p in level for c in sorted(p.iterdir()) if c.is_dir() and not c.name.startswith((".", "_"))
        ]
    return level


# -- the stage -----------------------------------------------------------------------------------
def run_forget(settings: Settings, users: list[str], source: str | None = None) -> ForgetResult:
    """Record the request, then remove ``users`` (ids of ``source``, or of every source) from every
    table of the module's docstring. Idempotent: a second run finds nothing to remove."""
    users = sorted({u.strip() for u in users if u and u.strip()})
    if not users:
        raise ValueError("no user id given: pass --user ID or --file with one id per line")
    if any(u.startswith(FORGOTTEN_ID_PREFIX) for u in users):
        raise ValueError(f"ids starting with {FORGOTTEN_ID_PREFIX!r} are the tombstones of forgotten users")
    wh = Path(settings.paths.warehouse_root)
    ids = pa.array(users, pa.string())
    with stage("forget", users=len(users), source=source or "*") as counts:
        result = ForgetResult(record_request(settings, users, source), len(users))

        def note(table: str, folder: Path, root: Path, n: int) -> None:
            if n:
                result.removed[table] = result.removed.get(table, 0) + n
                result.rewritten.append(str(folder.relative_to(root)))

        # events/source=S/event_date=D
        for folder in _leaves(events_dir(wh), 2):
            if source is None or folder.parent.name == f"source={source}":
                note("events", folder, wh, _rewrite_partition(folder, ["user_id"], _in("user_id", ids)))
        # quarantine/source=S/run_date=D
        qroot = quarantine_dir(settings.paths.quarantine_root)
        pattern = token_pattern(users)

        def raw_mask(t: pa.Table) -> pa.Array:
            return pc.fill_null(pc.match_substring_regex(t["raw_line"], pattern), False)

        for folder in _leaves(qroot, 2):
            if source is None or folder.parent.name == f"source={source}":
                note("quarantine", folder, qroot, _rewrite_partition(folder, ["raw_line"], raw_mask))
        # scores/ds=D and scores_staged/ds=D
        for root, table in ((scores_dir(wh), "scores"), (wh / SCORES_STAGED, SCORES_STAGED)):
            for folder in _leaves(root, 1):
                note(table, folder, wh, _rewrite_partition(folder, ["user_id"], _in("user_id", ids)))
        # the bundles
        for folder in _leaves(wh / SESSIONIZED.name, 1):
            for table, n in _rewrite_bundle(
                folder, {SESSIONS.name: _in("user_id", ids), SESSION_EVENTS.name: _in("user_id", ids)}
            ).items():
                note(table, folder, wh, n)
        for folder in _leaves(wh / SERVING.name, 1):
            for table, n in _rewrite_bundle(folder, {SERVING_CONTEXT.name: _in("user_id", ids)}).items():
                note(table, folder, wh, n)
        for folder in _leaves(wh / TRAINING.name, 1):
            for table, n in _forget_in_training(settings, folder, ids).items():
                note(table, folder, wh, n)
        result.rewritten = sorted(set(result.rewritten))
        dates = published_dates(wh)
        if result.removed and dates:
            from jobs.publish import build_analytics

            build_analytics(settings, dates[-1])
            result.analytics_rebuilt = True
        counts.update(
            request=result.request_id,
            folders=len(result.rewritten),
            **{f"removed_{k}": v for k, v in sorted(result.removed.items())},
        )
    return result


def _rewrite_bundle(folder: Path, masks: dict[str, Mask]) -> dict[str, int]:
    """Rewrite the bundle ``folder`` (tables in subfolders) without the rows each table's mask
    selects, as one atomic swap; untouched when no table holds any such row."""
    found = {t: _count(folder / t, ["user_id"], m) for t, m in masks.items() if (folder / t).is_dir()}
    if not any(found.values()):
        return {}
    removed: dict[str, int] = {}
    with atomic.staged_dir(folder) as staged:
        staged.mkdir(parents=True)
        for p in folder.iterdir():
            if p.is_dir() and p.name in masks:
                removed[p.name] = _write_filtered(p, staged / p.name, masks[p.name])
            elif p.is_dir():
                _link_or_copy(p, staged / p.name)
            elif not p.name.endswith(".crc"):
                shutil.copy2(p, staged / p.name)
    return removed


def _forget_in_training(settings: Settings, folder: Path, ids: pa.Array) -> dict[str, int]:
    """The users' rows out of one training bundle; their ``user_map`` rows become tombstones; the
    manifest's checksums and stats are those ``split`` computes of the new tables."""
    if not (folder / MANIFEST_FILE).is_file() or not (folder / USER_MAP.name).is_dir():
        return {}
    manifest = read_manifest(folder)
    if manifest.kind != EVENTS_BUNDLE:
        return {}
    users = pq.read_table(folder / USER_MAP.name, columns=["user_id", "user_idx"])
    hit = users.filter(_in("user_id", ids)(users))
    if hit.num_rows == 0:
        return {}
    gone = hit["user_idx"].combine_chunks()

    def tombstone(t: pa.Table) -> pa.Table:
        drop = _in("user_idx", gone)(t)
        i = t.schema.get_field_index("user_id")
        tomb = pc.binary_join_element_wise(FORGOTTEN_ID_PREFIX, pc.cast(t["user_idx"], pa.string()), "")
        return t.set_column(i, t.schema.field(i), pc.if_else(drop, tomb, t["user_id"]))

    removed: dict[str, int] = {}
    with atomic.staged_dir(folder) as staged:
        staged.mkdir(parents=True)
        for p in folder.iterdir():
            if p.is_dir() and p.name in _USER_ROWS:
                removed[p.name] = _write_filtered(p, staged / p.name, _in("user_idx", gone))
            elif p.is_dir() and p.name == USER_MAP.name:
                (staged / p.name).mkdir()
                for f in _parquet_files(p):
                    pq.write_table(tombstone(pq.read_table(f)), staged / p.name / f.name)
                removed[USER_MAP.name] = 0
            elif p.is_dir():
                _link_or_copy(p, staged / p.name)
            elif p.name != MANIFEST_FILE and not p.name.endswith(".crc"):
                shutil.copy2(p, staged / p.name)
        write_manifest(staged, _manifest_of(settings, staged, manifest))
    removed["user_map_tombstoned"] = hit.num_rows
    removed.pop(USER_MAP.name, None)
    return removed


def _manifest_of(settings: Settings, bundle: Path, manifest):
    """``manifest`` with the checksums, stats and leakage counts ``split`` computes of the tables in
    ``bundle``."""
    from infra.spark import get_spark
    from jobs.split import inspect_tables

    spark = get_spark(settings)
    tables = {t.name: t.read_spark(spark, bundle / t.name) for t in TRAINING.tables}
    seen = inspect_tables(tables, manifest.cutoff_time)
    return replace(
        manifest,
        checksums={name: f"{h}-{n}" for name, (h, n) in seen.checksums.items()},
        stats=seen.stats,
        leakage=seen.leaks,
    )
