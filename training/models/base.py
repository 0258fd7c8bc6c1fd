"""The model contract every recommender implements.

The trainer, the evaluator, the scorer and MLflow only ever call these methods, so none of them
special-cases a model:

- ``batches(rng, batch_size)``: training examples of one epoch (gradient-trained models);
- ``loss(batch)``: the training objective for a batch, as ``{"loss": total, <part>: value, ...}``;
- ``fit()``: closed-form / external training for models that are not trained by gradient steps
  (``trainable = False``: popularity, the ``implicit`` models);
- ``scores(users)``: (B, n_items) scores of a batch of users against every item;
- ``explain(users, items)``: per (user, item) the item type (visited / unvisited) and the expert or
  gate weights behind its score.

Models are found by name (``training.models.get_model``): ``training/models/<name>.py`` defines a
subclass with ``name = "<name>"`` and ``training/models/<name>.yaml`` its commented defaults.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from training.data import TrainingData


class PairSet:
    """Fast membership of (row, col) pairs in a sparse matrix: sorted int64 keys + binary search.
    ``values`` holds each stored pair's matrix value (duplicates summed), for ``lookup``."""

    def __init__(self, m: sp.spmatrix):
        coo = sp.coo_matrix(m)
        coo.sum_duplicates()
        self.n_cols = m.shape[1]
        keys = coo.row.astype(np.int64) * self.n_cols + coo.col.astype(np.int64)
        order = np.argsort(keys, kind="stable")
        self.keys, self.values = keys[order], coo.data[order]

    def _find(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.asarray(rows, np.int64) * self.n_cols + np.asarray(cols, np.int64)
        if not len(self.keys):
            return np.zeros(len(q), bool), np.zeros(len(q), np.int64)
        pos = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        return self.keys[pos] == q, pos

    def contains(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return self._find(rows, cols)[0]

    def lookup(self, rows: np.ndarray, cols: np.ndarray, default=0) -> np.ndarray:
        """Each pair's stored value, ``default`` where the pair is not stored."""
        found, pos = self._find(rows, cols)
        out = np.full(len(found), default, dtype=self.values.dtype)
        out[found] = self.values[pos[found]]
        return out


class Recommender(nn.Module):
    name: ClassVar[str] = ""
    #: Gradient-trained by the Trainer (True) or fitted once by ``fit()`` (False).
    trainable: ClassVar[bool] = True
    #: Names of the experts ``explain`` reports weights for (empty for single-tower models).
    experts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, data: TrainingData, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        self.n_users, self.n_items = data.n_users, data.n_items
        self._visited = data.visited  # CSR, kept off the state dict (rebuilt from the tables)
        self._visited_pairs = PairSet(data.visited)

    # -- training ----------------------------------------------------------------------------
    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError(f"{self.name} is not gradient-trained")

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{self.name} is not gradient-trained")

    def fit(self) -> None:
        raise NotImplementedError(f"{self.name} is gradient-trained: use the Trainer")

    # -- scoring -----------------------------------------------------------------------------
    def scores(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) user indices -> (B, n_items) scores; higher is better.

        A freshly allocated tensor (scoring masks it in place, without a copy), or a non-contiguous
        view such as a broadcast row (which scoring copies first); never a view of model state.
        """
        raise NotImplementedError

    def visited_rows(self, users: torch.Tensor) -> torch.Tensor:
        """(B, n_items) bool: whether each item is in each user's visited set."""
        return torch.from_numpy(self._visited[users.cpu().numpy()].toarray() > 0).to(users.device)

    def is_visited(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(P,) bool: whether each (user, item) pair is in the user's visited set."""
        vis = self._visited_pairs.contains(users.cpu().numpy(), items.cpu().numpy())
        return torch.from_numpy(vis).to(users.device)

    def explain(self, users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per row of (users, items), both (P,): ``visited`` (bool) and one weight per expert.

        Single-tower models report no expert weights.
        """
        return {"visited": self.is_visited(users, items)}

    def train(self, mode: bool = True):
        # Cached propagated embeddings are only valid until the parameters change.
        self._cache = None
        return super().train(mode)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")


def bpr_triplets(
    purchases: sp.csr_matrix,
    rng: np.random.Generator,
    batch_size: int,
    device,
    hard: sp.csr_matrix | None = None,
    hard_fraction: float = 0.0,
    negatives: int = 1,
    candidates: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of (user, bought item, not-bought item) triplets, every purchase once, shuffled.

    Negatives are uniform over items the user did not buy (resampled up to 10 times on collision).
    With ``hard`` (a users x items CSR, e.g. the visited sets) a ``hard_fraction`` of the rows draw
    their negative uniformly from the user's not-bought items of ``hard`` instead; rows whose
    ``hard`` items are all bought keep their uniform negative. With ``negatives`` > 1, ``neg`` is
    (B, negatives), each column drawn the same way. With ``candidates`` > 1, ``neg`` is
    (B, negatives, candidates): every negative slot draws that many candidates, all from the pool
    (hard or uniform) the slot drew, for the model to pick from (dynamic negative sampling) without
    changing the share of hard negatives.
    """
    coo = purchases.tocoo()
    bought = PairSet(purchases)
    order = rng.permutation(coo.nnz)
    users, pos = coo.row[order].astype(np.int64), coo.col[order].astype(np.int64)
    n_items = purchases.shape[1]
    pool = None
    if hard is not None and hard_fraction > 0:
        # The hard items the user did not buy, once per epoch: sampling from them never collides.
        pool = (hard > 0).astype(np.float32)
        pool = (pool - pool.multiply(purchases > 0)).tocsr()
        pool.eliminate_zeros()
    for start in range(0, len(users), batch_size):
        u, p = users[start : start + batch_size], pos[start : start + batch_size]
        nu = np.repeat(u, negatives * candidates)
        neg = rng.integers(0, n_items, len(nu))
        for _ in range(10):
            clash = bought.contains(nu, neg)
            if not clash.any():
                break
            neg[clash] = rng.integers(0, n_items, int(clash.sum()))
        if pool is not None:
            hard_slot = rng.random(len(u) * negatives) < hard_fraction
            _hard_negatives(pool, nu, neg, np.repeat(hard_slot, candidates), rng)
        if candidates > 1:
            neg = neg.reshape(len(u), negatives, candidates)
        elif negatives > 1:
            neg = neg.reshape(len(u), negatives)
        yield {
            "users": torch.from_numpy(u).to(device),
            "pos": torch.from_numpy(p).to(device),
            "neg": torch.from_numpy(neg).to(device),
        }


def _hard_negatives(
    pool: sp.csr_matrix, users: np.ndarray, neg: np.ndarray, pick: np.ndarray, rng: np.random.Generator
) -> None:
    """Overwrite ``neg[pick]`` in place with a uniform item of the user's ``pool`` row (rows
    left empty keep their negative)."""
    lo, hi = pool.indptr[users], pool.indptr[users + 1]
    idx = np.flatnonzero(pick & (hi > lo))
    neg[idx] = pool.indices[lo[idx] + (rng.random(len(idx)) * (hi[idx] - lo[idx])).astype(np.int64)]


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Mean of -log σ(pos - neg); ``neg`` is (B,) or (B, n) negatives per positive."""
    if neg.dim() == 2:
        pos = pos.unsqueeze(1)
    return -torch.nn.functional.logsigmoid(pos - neg).mean()
