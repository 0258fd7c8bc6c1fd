"""The training bundle (``training/ds=<date or benchmark>``) as arrays for torch-side stages.

Reads only the tables documented in ``infra.tables`` (Parquet via pyarrow; no Spark needed) and
builds sparse user x item matrices per behaviour. Nothing here is dense in users x items.

A bundle has two *views* of its training events (``jobs/split.py``): ``validation``, the rows the
validation fit sees (nothing at or after a validation purchase), and ``full``, every training row,
which the refit that is tested and served sees. Both share the id maps and the held-out pairs; the
matrices, visited sets and event counts differ. Benchmark bundles (``validation_design: holdout``)
have one view: the same data under both names.

``write_training_bundle`` publishes a bundle from tables held in memory (tests, the scoring
benchmark), with the catalogue's schemas and a complete manifest, as ``split`` publishes its own;
``tables_of`` gives those tables for a ``TrainingData`` built in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from infra import atomic
from infra.tables import (
    BEHAVIORS,
    FRAMES_BUNDLE,
    HELDOUT,
    HOLDOUT,
    INTERACTIONS,
    ITEM_MAP,
    PURCHASE,
    REFIT,
    TRAIN_EVENTS,
    TRAINING,
    USER_MAP,
    VISITED,
    TrainingManifest,
    read_manifest,
    write_manifest,
)
from training.sequences import NO_TIME, EventLog


def read_table(path: Path, columns: list[str] | None = None):
    """One table of a training bundle (its parquet file or folder), as Arrow."""
    if not path.exists():
        raise FileNotFoundError(f"training table missing: {path}")
    return pq.read_table(path, columns=columns)


@dataclass
class TrainingData:
    """Everything a model, the trainer and the evaluator need from one training bundle.

    Attributes:
        root: the bundle directory.
        n_users, n_items: catalogue sizes (rows of ``user_map`` / ``item_map``).
        behaviors: behaviours present in training, in funnel order, purchase last.
        matrices: behaviour -> CSR (n_users x n_items) of 0/1 interactions in training.
        visited: CSR of each user's visited set.
        heldout: split name -> (user_idx, item_idx, visited) arrays.
        manifest: the bundle's manifest (None for data built in memory).
    """

    root: Path
    n_users: int
    n_items: int
    behaviors: list[str]
    matrices: dict[str, sp.csr_matrix]
    visited: sp.csr_matrix
    heldout: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    manifest: TrainingManifest | None
    user_events: np.ndarray = field(repr=False)
    view: str = "full"

    @property
    def refit(self) -> bool:
        """Whether validation is measured on a separate validation fit (``validation_design``)."""
        return self.manifest is not None and self.manifest.validation_design == REFIT

    def check_evaluable(self, split: str) -> None:
        """Refuse to evaluate ``split`` on the wrong view: validation on the validation fit's data,
        test on every training event's."""
        if split not in self.heldout:
            raise ValueError(f"no held-out pairs for split {split!r}; have {sorted(self.heldout)}")
        need = "validation" if split == "validation" else "full"
        if self.refit and self.view != need:
            raise ValueError(
                f"the {split} split is evaluated on the {need} view of {self.root}, not the {self.view} view"
            )

    @property
    def purchases(self) -> sp.csr_matrix:
        return self.matrices[PURCHASE]

    @cached_property
    def union(self) -> sp.csr_matrix:
        """Any training behaviour (the 'global' graph of multi-behaviour models)."""
        out = sp.csr_matrix((self.n_users, self.n_items), dtype=np.float32)
        for m in self.matrices.values():
            out = out + m
        out.data[:] = 1.0
        return out.tocsr()

    def history(self, users: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The last ``length`` training events of each user in ``users`` (this view's rows), oldest
        first, left-padded: ``(items, behaviors, times)`` (``EventLog.windows``)."""
        if length == 0:  # a model that reads no history never loads the events
            empty = np.zeros((len(users), 0), np.int64)
            return empty, empty.copy(), empty.copy()
        return self.events.windows(users, length)

    @cached_property
    def events(self) -> EventLog:
        """Every user's training events of this view in the split's order (``event_seq``); a bundle
        without it (benchmarks without times, data built in memory) keeps its stored row order."""
        cols = ["user_idx", "item_idx", "behavior", "event_time", "event_seq", "validation_fit"]
        ev = read_table(self.root / TRAIN_EVENTS.name, cols).to_pandas()
        if self.view == "validation" and self.refit:
            ev = ev[ev["validation_fit"]]
        keys = ["user_idx", "event_seq"] if ev["event_seq"].notna().all() else ["user_idx"]
        ev = ev.sort_values(keys, kind="stable")
        indptr = np.zeros(self.n_users + 1, np.int64)
        np.cumsum(np.bincount(ev["user_idx"].to_numpy(), minlength=self.n_users), out=indptr[1:])
        times = ev["event_time"]
        seconds = np.full(len(ev), NO_TIME, np.int64)
        known = times.notna().to_numpy()
        if known.any():
            utc = pd.to_datetime(times[known], utc=True).dt.tz_localize(None)
            seconds[known] = utc.to_numpy().astype("datetime64[s]").astype(np.int64)
        funnel = {b: i for i, b in enumerate(BEHAVIORS)}
        return EventLog(
            indptr,
            ev["item_idx"].to_numpy(np.int64),
            ev["behavior"].map(funnel).to_numpy(np.int64),
            seconds,
        )

    @cached_property
    def has_times(self) -> bool:
        """Whether the training events carry times (benchmarks such as Tmall do not)."""
        return bool(len(self.events.times)) and bool((self.events.times != NO_TIME).all())

    def mask_for(self, split: str) -> sp.csr_matrix:
        """Items excluded from ranking when evaluating ``split`` (manifest's eval_mask).

        Validation masks the training purchases; test also masks the validation purchases, which
        happened before the test period.
        """
        if split == "validation":
            return self.purchases
        u, i, _ = self.heldout.get("validation", (np.array([], int), np.array([], int), None))
        val = sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=(self.n_users, self.n_items))
        out = (self.purchases + val).tocsr()
        out.data[:] = 1.0
        return out


VIEWS: tuple[str, ...] = ("full", "validation")


def ids(root: Path, key: str) -> np.ndarray:
    """The source ids of a bundle's ``user_map`` (``key="user"``) or ``item_map`` (``"item"``),
    indexed by their contiguous index."""
    table = {"user": USER_MAP, "item": ITEM_MAP}[key]
    t = read_table(Path(root) / table.name, [f"{key}_id", f"{key}_idx"]).to_pandas()
    out = np.empty(len(t), dtype=object)
    out[t[f"{key}_idx"].to_numpy()] = t[f"{key}_id"].to_numpy()
    return out


def binary_csr(user: np.ndarray, item: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """(n_users, n_items) CSR with 1 at every (user, item) pair, repeats counted once."""
    m = sp.csr_matrix((np.ones(len(user), np.float32), (user, item)), shape=(n_users, n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def load_training_data(root: Path, view: str = "full") -> TrainingData:
    """Load ``training/ds=<...>`` written by ``funnelrec split``, as seen by the ``view`` fit."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    root = Path(root)
    manifest = read_manifest(root)
    n_users = read_table(root / USER_MAP.name, ["user_idx"]).num_rows
    n_items = read_table(root / ITEM_MAP.name, ["item_idx"]).num_rows
    fit_view = view == "validation" and manifest.validation_design == REFIT
    if fit_view:
        cols = ["user_idx", "item_idx", "behavior", "validation_fit"]
        ev = read_table(root / TRAIN_EVENTS.name, cols).to_pandas()
        ev = ev[ev["validation_fit"]]
        inter = ev[["user_idx", "item_idx", "behavior"]]
        vis = inter[inter["behavior"] != PURCHASE]
        user_events = np.bincount(ev["user_idx"].to_numpy(), minlength=n_users)
    else:
        inter = read_table(root / INTERACTIONS.name, ["user_idx", "item_idx", "behavior"]).to_pandas()
        vis = read_table(root / VISITED.name).to_pandas()
        ev = read_table(root / TRAIN_EVENTS.name, ["user_idx"]).column("user_idx").to_numpy()
        user_events = np.bincount(ev, minlength=n_users)
    matrices: dict[str, sp.csr_matrix] = {}
    for b in BEHAVIORS:
        part = inter[inter["behavior"] == b]
        if len(part) == 0 and b != PURCHASE:
            continue
        matrices[b] = binary_csr(part["user_idx"].to_numpy(), part["item_idx"].to_numpy(), n_users, n_items)
    visited = binary_csr(vis["user_idx"].to_numpy(), vis["item_idx"].to_numpy(), n_users, n_items)
    held = read_table(root / HELDOUT.name, ["user_idx", "item_idx", "split", "visited"]).to_pandas()
    heldout = {
        s: (
            g["user_idx"].to_numpy(np.int64),
            g["item_idx"].to_numpy(np.int64),
            g["visited"].to_numpy(bool),
        )
        for s, g in held.groupby("split")
    }
    return TrainingData(
        root=root,
        n_users=n_users,
        n_items=n_items,
        behaviors=list(matrices),
        matrices=matrices,
        visited=visited,
        heldout=heldout,
        manifest=manifest,
        user_events=user_events,
        view=view,
    )


def tables_of(data: TrainingData) -> dict[str, pd.DataFrame]:
    """The bundle's tables of data built in memory: user ids ``u<idx>``, item ids ``i<idx>`` (no
    categories), one interaction and one training event per (user, item, behaviour) of its matrices
    (count 1, no times and no event order, every event seen by the one fit) and its held-out pairs (no times)."""
    pairs = []
    for behavior, m in data.matrices.items():
        coo = m.tocoo()
        pairs.append(pd.DataFrame({"user_idx": coo.row, "item_idx": coo.col, "behavior": behavior}))
    inter = pd.concat(pairs, ignore_index=True).astype({"user_idx": "int32", "item_idx": "int32"})
    inter = inter.sort_values(["user_idx", "item_idx", "behavior"], ignore_index=True)
    vis = data.visited.tocoo()
    held = pd.concat(
        [
            pd.DataFrame({"user_idx": u, "item_idx": i, "split": split, "visited": np.asarray(v, bool)})
            for split, (u, i, v) in data.heldout.items()
        ],
        ignore_index=True,
    )
    return {
        USER_MAP.name: pd.DataFrame(
            {"user_id": [f"u{u}" for u in range(data.n_users)], "user_idx": range(data.n_users)}
        ),
        ITEM_MAP.name: pd.DataFrame(
            {
                "item_id": [f"i{i}" for i in range(data.n_items)],
                "item_idx": range(data.n_items),
                "category_id": None,
            }
        ),
        INTERACTIONS.name: inter.assign(count=1, last_time=None),
        VISITED.name: pd.DataFrame({"user_idx": vis.row, "item_idx": vis.col}),
        HELDOUT.name: held.assign(event_time=None),
        TRAIN_EVENTS.name: inter.assign(
            event_time=None, session_id=None, event_seq=None, validation_fit=True
        ),
    }


def _checksum(table: pd.DataFrame) -> str:
    # Summed row hashes, like split's: the checksum does not depend on the order of the rows.
    total = pd.util.hash_pandas_object(table, index=False).to_numpy().sum(dtype=np.uint64)
    return f"{int(total):016x}-{len(table)}"


def _stats(t: dict[str, pd.DataFrame]) -> dict:
    held = t[HELDOUT.name]

    def split_stats(split: str) -> dict[str, int]:
        rows = held[held["split"] == split]
        visited = int(rows["visited"].sum())
        return {
            "pairs": len(rows),
            "visited": visited,
            "unvisited": len(rows) - visited,
            "users": rows["user_idx"].nunique(),
        }

    by_behavior = t[INTERACTIONS.name].groupby("behavior").size()
    return {
        "users": len(t[USER_MAP.name]),
        "items": len(t[ITEM_MAP.name]),
        "train_events": len(t[TRAIN_EVENTS.name]),
        "interaction_pairs_by_behavior": {b: int(n) for b, n in sorted(by_behavior.items())},
        "visited_pairs": len(t[VISITED.name]),
        "heldout": {split: split_stats(split) for split in ("validation", "test")},
    }


def write_training_bundle(
    warehouse_root: Path,
    ds: str,
    tables: dict[str, pd.DataFrame],
    protocol: str,
    sources: list[str],
    validation_design: str = HOLDOUT,
) -> Path:
    """Publish ``tables`` (one frame per table of the ``training`` bundle, with its columns) as
    ``training/ds=<ds>``, atomically, with its manifest (kind ``frames``): the checksums and stats of
    the tables as written. Returns the bundle directory."""
    names = {t.name: t for t in TRAINING.tables}
    if set(tables) != set(names):
        raise ValueError(f"a training bundle has the tables {sorted(names)}, got {sorted(tables)}")
    target = TRAINING.dir(warehouse_root, ds)
    with atomic.staged_dir(target) as staged:
        written = {}
        for name, frame in tables.items():
            table = names[name]
            (staged / name).mkdir(parents=True)
            arrow = pa.Table.from_pandas(
                frame[table.column_names], schema=table.arrow_schema(), preserve_index=False
            )
            pq.write_table(arrow, staged / name / "part-00000.parquet")
            written[name] = pq.read_table(staged / name).to_pandas()
        manifest = TrainingManifest(
            ds=ds,
            kind=FRAMES_BUNDLE,
            protocol=protocol,
            validation_design=validation_design,
            sources=list(sources),
            stats=_stats(written),
            checksums={name: _checksum(frame) for name, frame in written.items()},
        )
        write_manifest(staged, manifest)
    return target
