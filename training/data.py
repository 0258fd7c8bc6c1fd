"""The training bundle (``training/ds=<date or benchmark>``) as arrays for torch-side stages.

Reads only the tables documented in ``infra.tables`` (Parquet via pyarrow; no Spark needed) and
builds sparse user x item matrices per behaviour. Nothing here is dense in users x items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import scipy.sparse as sp

from infra.tables import (
    BEHAVIORS,
    HELDOUT,
    INTERACTIONS,
    ITEM_MAP,
    MANIFEST_FILE,
    PURCHASE,
    TRAIN_EVENTS,
    USER_MAP,
    VISITED,
)


def _read(path: Path, columns: list[str] | None = None):
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
        manifest: the bundle's manifest.json.
    """

    root: Path
    n_users: int
    n_items: int
    behaviors: list[str]
    matrices: dict[str, sp.csr_matrix]
    visited: sp.csr_matrix
    heldout: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    manifest: dict
    user_events: np.ndarray = field(repr=False)

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

    def long_tail_users(self, share: float = 0.2) -> np.ndarray:
        """The ``share`` of users with the fewest training events (ties broken by user index)."""
        order = np.lexsort((np.arange(self.n_users), self.user_events))
        return np.sort(order[: round(share * self.n_users)])


def load_training_data(root: Path) -> TrainingData:
    """Load ``training/ds=<...>`` written by ``funnelrec split``."""
    root = Path(root)
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    n_users = _read(root / USER_MAP.name, ["user_idx"]).num_rows
    n_items = _read(root / ITEM_MAP.name, ["item_idx"]).num_rows
    inter = _read(root / INTERACTIONS.name, ["user_idx", "item_idx", "behavior"]).to_pandas()
    matrices: dict[str, sp.csr_matrix] = {}
    for b in BEHAVIORS:
        part = inter[inter["behavior"] == b]
        if len(part) == 0 and b != PURCHASE:
            continue
        m = sp.csr_matrix(
            (np.ones(len(part), np.float32), (part["user_idx"].to_numpy(), part["item_idx"].to_numpy())),
            shape=(n_users, n_items),
        )
        m.sum_duplicates()
        m.data[:] = 1.0
        matrices[b] = m
    vis = _read(root / VISITED.name).to_pandas()
    visited = sp.csr_matrix(
        (np.ones(len(vis), np.float32), (vis["user_idx"].to_numpy(), vis["item_idx"].to_numpy())),
        shape=(n_users, n_items),
    )
    held = _read(root / HELDOUT.name, ["user_idx", "item_idx", "split", "visited"]).to_pandas()
    heldout = {
        s: (
            g["user_idx"].to_numpy(np.int64),
            g["item_idx"].to_numpy(np.int64),
            g["visited"].to_numpy(bool),
        )
        for s, g in held.groupby("split")
    }
    ev = _read(root / TRAIN_EVENTS.name, ["user_idx"]).column("user_idx").to_numpy()
    user_events = np.bincount(ev, minlength=n_users)
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
    )
